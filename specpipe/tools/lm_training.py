"""Small Llama language models and their training, for the demo pair (build_demo.py).

Contract. `make_model` builds a seeded `LlamaForCausalLM` of a ModelSpec's shape for a tokenizer;
`train_lm` runs AdamW with warmup and cosine decay on seeded batches (`window_batches`: windows of
a token stream; `distill_batches`: rows with the teacher's logits, for `distill_loss`);
`save_model` writes fp16 safetensors under a float32 config; `deterministic` fixes the thread
count and the kernels while training, which with the seeds makes a build bit-for-bit. Knows
nothing of the corpus (token ids in) or of the recipe (specs in).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Llama's shape, and its training: `steps` AdamW steps of `batch` sequences."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    tie_embeddings: bool
    steps: int
    batch: int
    lr: float


@contextlib.contextmanager
def deterministic(threads: int):
    """torch on `threads` threads with deterministic kernels; the caller's settings come back."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def make_model(spec: ModelSpec, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_lm(model, batches, spec: ModelSpec, bar, loss_fn=None) -> float:
    """AdamW with warmup and cosine decay on `batches() -> (inputs, labels)`; the last loss.
    `loss_fn(logits, labels)`: cross-entropy on next-token labels unless given."""
    loss_fn = loss_fn or (lambda logits, labels: F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, spec.steps // 20)
    for step in range(spec.steps):
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / spec.steps))
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * (min(1.0, (step + 1) / warmup) * cosine)
        inputs, labels = batches()  # [batch, seq_len] each ([batch, seq_len, vocab] logits to distill)
        loss = loss_fn(model(input_ids=inputs).logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return loss.item()


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_target || q_draft) per position, plus the cross-entropy on the target's argmax: the
    first makes q match p where sampling goes, the second keeps greedy agreement high."""
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return kl + F.nll_loss(log_q.flatten(0, 1), target_logits.argmax(-1).flatten())


def window_batches(tokens: torch.Tensor, batch: int, seq_len: int, seed: int):
    """Seeded random windows of the token stream [num_tokens]: the same batches every build."""
    generator = torch.Generator().manual_seed(seed)

    def batches():
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=generator)
        windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    return batches


def distill_batches(target, inputs: torch.Tensor, batch: int, seed: int):
    """Seeded random rows of inputs [rows, seq_len], with the target's logits over them."""
    generator = torch.Generator().manual_seed(seed)

    def batches():
        rows = inputs[torch.randint(0, len(inputs), (batch,), generator=generator)]
        with torch.no_grad():
            return rows, target(input_ids=rows).logits

    return batches


def save_model(model, tokenizer, folder: Path) -> None:
    """fp16 safetensors (half the bytes) under a float32 config (so it loads as float32)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
