"""The target worker's tests share the tiny target twice: routed through the KV store (the
engine's) and plain (the reference)."""

import pytest

from specpipe.model_check import prepare_model
from tiny import load, twin


@pytest.fixture(scope="module")
def models(tiny_models):
    """(engine model routed through the store, plain reference)."""
    reference = load(tiny_models["target"])
    model = twin(reference)
    prepare_model(model)
    return model, reference
