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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    fast.save_pretrained(folder)
    return fast


def build_llama(folder: Path, tokenizer_dir: Path, *, seed: int, hidden: int, layers: int,
                vocab_size: int, eos_id: int) -> None:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=eos_id, bos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=False)
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


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def fresh_logits(model, tokens: list[int]) -> torch.Tensor:
    """[vocab] next-token logits of a fresh forward over `tokens` (no cache): the reference."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


def cached_logits(model, holder) -> torch.Tensor:
    """Next-token logits from `holder.cache` (a specpipe KVCache) plus its not-yet-cached
    `holder.tokens`, without changing the cache."""
    probe = holder.cache.fork()
    with torch.no_grad():
        return probe.forward(model, torch.tensor([holder.tokens[probe.length:]])).logits[0, -1]
