"""Model loading and the draft/target tokenizer check."""

import pytest
import torch

from specpipe.models import (
    ModelLoadError,
    TokenizerMismatchError,
    check_same_tokenizer,
    context_length,
    load_model,
    load_tokenizer,
    vocab_size,
)
from tiny import build_tokenizer


def test_load_model_from_folder(tiny_models):
    model = load_model(tiny_models["target"], device="cpu", dtype="float32")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert vocab_size(model) == len(load_tokenizer(tiny_models["target"]))
    assert context_length(model) == 512


def test_load_model_dtype(tiny_models):
    model = load_model(tiny_models["target"], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_model_path_and_dtype(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder .*missing' does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(tmp_path, dtype="float8")


def test_same_tokenizer_passes(tiny_models):
    check_same_tokenizer(load_tokenizer(tiny_models["draft"]), load_tokenizer(tiny_models["target"]))


def test_different_tokenizer_is_refused_with_what_differs(tiny_models, tmp_path):
    other = build_tokenizer(tmp_path / "other", vocab_size=280)
    with pytest.raises(TokenizerMismatchError, match="vocabulary sizes differ: draft has 280"):
        check_same_tokenizer(other, load_tokenizer(tiny_models["target"]))
