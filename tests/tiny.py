"""Tiny models and a tiny tokenizer, built from configs with fixed seeds (no files, no hub), and
the token-id prompts the cross-process tests use. Importable from any test (`from tiny import ...`);
the fixtures that build them live in conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Prompts as token ids of the tiny tokenizer (vocabulary 300).
PROMPTS = [[5, 17, 42, 8], [100, 3], [250, 251, 252, 253, 254, 255, 7], [1]]

EOS = "<|endoftext|>"
TOKENIZER_TEXT = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\nfor line in sys.stdin:\n    print(line.strip())\n",
    "héllo wörld ✓ 数学 — naïve café\n",
]


def build_tokenizer(folder: Path, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    fast.save_pretrained(folder)
    return fast


def build_llama(
    folder: Path, tokenizer_dir: Path, *, seed: int, hidden: int, layers: int, vocab_size: int, eos_id: int
) -> None:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Sharper logits than the default init: greedy runs of a random model then have real structure.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    for name in tokenizer_dir.iterdir():
        shutil.copy(name, folder / name.name)


def perturb(source: Path, folder: Path, noise: float, seed: int) -> None:
    """A copy of the model in `source` with Gaussian noise on every weight: a draft that agrees
    with its target often but not always (medium acceptance)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * param.std() * torch.randn_like(param))
    model.save_pretrained(folder)
    for name in source.iterdir():
        if name.name.startswith("tokenizer") or name.name.startswith("special"):
            shutil.copy(name, folder / name.name)


def flatten(source: Path, folder: Path, factor: float) -> None:
    """A copy of the model in `source` with its logits scaled by `factor` (< 1: flatter): every
    next-token distribution ranks the tokens as the source's does, with less mass on the best. As a
    draft, it is rejected where it is less sure than its target, and the target's correction is
    then always among the draft's next-best tokens: SpecBranch's forks there are promoted."""
    model = LlamaForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    model.save_pretrained(folder)
    for name in source.iterdir():
        if name.name.startswith("tokenizer") or name.name.startswith("special"):
            shutil.copy(name, folder / name.name)


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def fresh_logits(model, tokens: list[int]) -> torch.Tensor:
    """[vocab] next-token logits of a fresh forward over `tokens` (no cache): the reference."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


def tiny_architecture(name: str, vocab_size: int = 300, seed: int = 0):
    """A random tiny causal LM of a model family people serve, built from its config (no files)."""
    import transformers

    torch.manual_seed(seed)
    gqa = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=vocab_size,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**gqa),
        "qwen2": lambda: transformers.Qwen2Config(**gqa),
        "qwen3": lambda: transformers.Qwen3Config(**gqa, head_dim=16),
        "mistral": lambda: transformers.MistralConfig(**gqa, sliding_window=6),  # the window is exercised
        "phi3": lambda: transformers.Phi3Config(**gqa, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": lambda: transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            vocab_size=vocab_size,
        ),
        "opt": lambda: transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=512,
            vocab_size=vocab_size,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    }
    model = AutoModelForCausalLM.from_config(configs[name]()).eval()
    with torch.no_grad():  # sharper logits: greedy runs with real structure
        model.get_output_embeddings().weight.mul_(8.0)
        # Non-zero biases, as trained models have (the init's zeros would hide a bias a packed
        # forward drops).
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.05)
    return model


ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gpt2", "gpt_neox", "opt"]


def twin(model):
    """A second instance with the same weights: one is routed through the slot store, the other
    stays the plain reference (prepare_model changes a model's attention implementation)."""
    import copy

    return copy.deepcopy(model)


def store_logits(model, store, slot: int, cached: int, tokens: list[int]) -> torch.Tensor:
    """Next-token logits from `store`'s slot (its first `cached` positions valid) plus the rest of
    `tokens` fed, computed in a scratch slot so the slot itself is left as it is."""
    from specpipe.kv_store import Row, forward_packed

    scratch = store.allocate()
    try:
        store.copy_prefix(slot, scratch, cached)
        fed = tokens[cached:]
        with torch.inference_mode():
            return forward_packed(
                model, store, [Row(scratch, cached, len(fed))], torch.tensor(fed), keep=[len(fed) - 1]
            ).logits[0]
    finally:
        store.free(scratch)


def record_packed_rows(monkeypatch, module) -> list:
    """Wrap `module`'s forward_packed so the rows of every forward it runs are recorded (the forward
    still runs); returns the record, one list of Rows per forward."""
    packed = []
    real = module.forward_packed

    def recording(model, store, rows, *args, **kwargs):
        packed.append(rows)
        return real(model, store, rows, *args, **kwargs)

    monkeypatch.setattr(module, "forward_packed", recording)
    return packed


def in_slot_order(rows) -> bool:
    return [row.slot for row in rows] == sorted(row.slot for row in rows)
