"""The explicit acceptance-length predictor (SpecBranch's "explicit signal", DESIGN §1 point 3).

A small MLP over the target's last-layer hidden state h_t (the row whose logits predicted token
t + 1) that foresees how many draft tokens the target will accept in a block that starts right
after token t + 1: classes 0 .. MAX_LEN, the last meaning ">= MAX_LEN". (Cheap scalars of the
same row, the target's top-1 probability and entropy, were tried as extra inputs: they added
nothing over the hidden state on the demo pair, so the input is the hidden state alone.)

Label, exactly: along a sequence whose tokens after t + 1 are the target's greedy continuation,
let agree[p] = (draft argmax after tokens[:p + 1] == target argmax after tokens[:p + 1]). The
label at t is the number of consecutive True in agree[t + 1], agree[t + 2], ..., capped at MAX_LEN:
the greedy accepted length of a block drafted from tokens[:t + 2] (once a draft token is accepted
both models see the same prefix, so teacher forcing on the target's continuation is exact). In the
target worker t + 1 is the last committed token: the correction or bonus the verdict emitted, or
the last accepted draft token when no bonus was asked for. Under sampling the real accepted length
is shorter; the prediction stays the greedy one.

This module is the runtime half: the model and `load_predictor(target_dir)`, which finds
`<target>/accept_predictor.safetensors` + `accept_predictor.json` beside the target's weights
(None when absent or made for other weights). Training is an offline tool
(specpipe/tools/train_predictor.py, `specpipe train-predictor`). This module knows nothing of
workers, sockets or the coordinator's policy.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_LEN = 8  # classes 0..MAX_LEN; blocks are rarely longer, and ">= 8" is all a policy needs
NUM_UNITS = 128  # one hidden layer: the cost per verify must stay negligible
FILE_STEM = "accept_predictor"


class AcceptPredictor(torch.nn.Module):
    """hidden [..., hidden_size] -> logits [..., max_len + 1] over the accepted length."""

    def __init__(self, hidden_size: int, max_len: int = MAX_LEN, num_units: int = NUM_UNITS):
        super().__init__()
        self.hidden_size, self.max_len = hidden_size, max_len
        self.layer1 = torch.nn.Linear(hidden_size, num_units)  # input standardisation folded in (see training)
        self.layer2 = torch.nn.Linear(num_units, max_len + 1)
        self.register_buffer("lengths", torch.arange(max_len + 1, dtype=torch.float32), persistent=False)

    def __repr__(self) -> str:
        return (
            f"AcceptPredictor(hidden_size={self.hidden_size}, max_len={self.max_len}, "
            f"num_units={self.layer1.out_features})"
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.gelu(self.layer1(hidden.float())))

    def probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., max_len + 1]: P(accepted length = k), the last class meaning >= max_len."""
        return self(hidden).softmax(-1)

    def expected_length(self, hidden: torch.Tensor) -> torch.Tensor:
        """[...]: the expected accepted length (the last class counted as max_len)."""
        return self.probs(hidden) @ self.lengths

    @torch.inference_mode()
    def predict(self, hidden: torch.Tensor) -> float:
        """One row, hidden [hidden_size] -> the expected accepted length in [0, max_len]."""
        assert hidden.shape == (self.hidden_size,), f"one hidden state of {self.hidden_size}, got {tuple(hidden.shape)}"
        return float(self.expected_length(hidden))


def weights_sha256(model_dir) -> str | None:
    """The SHA-256 of a model folder's model.safetensors (None when there is none): what a saved
    predictor records, so that it is never loaded for other weights."""
    weights = Path(model_dir) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def load_predictor(target_dir, path=None) -> AcceptPredictor | None:
    """The predictor saved beside the target's weights, or None: when there is none (a hub id, a
    folder without one), or when it was trained for other weights (it would mislead)."""
    from safetensors.torch import load_file

    target_dir = Path(target_dir)
    path = Path(path) if path is not None else target_dir / f"{FILE_STEM}.safetensors"
    if not path.is_file() or not path.with_suffix(".json").is_file():
        return None
    info = json.loads(path.with_suffix(".json").read_text())
    expected = info.get("target_weights_sha256")
    if expected is not None and weights_sha256(target_dir) not in (None, expected):
        log.warning("ignoring %s: it was trained for other target weights", path)
        return None
    model = AcceptPredictor(info["hidden_size"], info["max_len"], info["num_units"])
    model.load_state_dict(load_file(path))
    return model.eval()
