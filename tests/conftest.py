"""Shared fixtures: tiny models built from configs with fixed seeds and a tiny byte-level BPE
tokenizer, saved to folders so they load through `from_pretrained` like any hub model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tiny import build_llama, build_tokenizer, flatten, perturb


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders: 'target' (Llama, 2 layers, width 64), 'draft' (a different random Llama: low
    acceptance), 'draft_close' (the target plus noise: medium acceptance), 'draft_same' (identical
    to the target: everything accepted), 'draft_flat' (the target's logits scaled by 0.1: the same
    ranking of every token, flatter; where it is rejected, the target's correction is one of its
    next-best tokens, so specbranch's forks are promoted)."""
    root = tmp_path_factory.mktemp("tiny_models")
    tok_dir = root / "tokenizer"
    tokenizer = build_tokenizer(tok_dir)
    vocab, eos_id = len(tokenizer), tokenizer.eos_token_id
    build_llama(root / "target", tok_dir, seed=0, hidden=64, layers=2, vocab_size=vocab, eos_id=eos_id)
    build_llama(root / "draft", tok_dir, seed=1, hidden=32, layers=1, vocab_size=vocab, eos_id=eos_id)
    shutil.copytree(root / "target", root / "draft_same")
    perturb(root / "target", root / "draft_close", noise=0.3, seed=2)
    flatten(root / "target", root / "draft_flat", factor=0.1)
    return {
        "target": root / "target",
        "draft": root / "draft",
        "draft_same": root / "draft_same",
        "draft_close": root / "draft_close",
        "draft_flat": root / "draft_flat",
        "tokenizer": tok_dir,
    }
