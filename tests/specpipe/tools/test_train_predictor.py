"""Training the acceptance-length predictor (specpipe/tools/train_predictor.py): the label
construction on hand-checked cases (a stub draft, a draft identical to the target, a draft that
never agrees), deterministic training on the tiny models with its metrics, and `specpipe
train-predictor` writing what a second run of the library call writes."""

import json
import shutil
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from specpipe import predictor
from specpipe.launch import cli
from specpipe.tools import train_predictor as training

STEPS = 100  # fit steps in the tests: enough to leave the initialisation, a second on one thread
POSITIONS = 160


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


class StubDraft:
    """Predicts the next token of `sequence` except where told to disagree."""

    def __init__(self, wrong_at: set[int]):
        self.wrong_at = wrong_at

    def __call__(self, input_ids):
        vocab = 100
        logits = torch.zeros(*input_ids.shape, vocab)
        for p in range(input_ids.shape[1]):
            next_id = int(SEQUENCE[0, p + 1])
            logits[0, p, (next_id + 1) % vocab if p in self.wrong_at else next_id] = 1.0
        return SimpleNamespace(logits=logits)


SEQUENCE = torch.tensor([[10, 11, 20, 21, 22, 23, 24]])  # prompt [10, 11], then 5 greedy tokens


def test_labels_by_hand():
    """Rows t = 1, 2, 3 predicted tokens 20, 21, 22; agreement at p = 1..5 is T F T T F, so the
    block after token t + 1 (first judged at p = t + 1) accepts 0, 2 (capped), 1."""
    hidden = torch.arange(5.0)[None, :, None].expand(1, 5, 4)  # [1, gen_len, hidden]: row i holds i
    rows, labels = training.label_rows(StubDraft(wrong_at={2, 5}), SEQUENCE, hidden, max_len=2)
    assert labels.tolist() == [0, 2, 1]
    assert rows[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_identical_draft_labels_max_and_opposite_draft_labels_zero(tiny_models):
    target = load(tiny_models["target"])
    opposite = load(tiny_models["target"])
    with torch.no_grad():
        opposite.lm_head.weight.neg_()  # its argmax is the target's argmin: never agrees
    tokens = torch.randint(1, 250, (400,), generator=torch.Generator().manual_seed(0))
    for draft, label in ((target, predictor.MAX_LEN), (opposite, 0)):
        hidden, labels, windows = training.collect_examples(target, draft, tokens, num_windows=3, seed=0)
        assert hidden.shape == (3 * (training.GEN_LEN - predictor.MAX_LEN), target.config.hidden_size)
        assert labels.shape == windows.shape == hidden.shape[:1]
        assert (labels == label).all()


def test_training_is_deterministic_and_reports_metrics(tiny_models, tmp_path):
    folder = tmp_path / "target"
    shutil.copytree(tiny_models["target"], folder)
    info = training.train_predictor(
        folder, tiny_models["draft_close"], seed=0, max_positions=POSITIONS, progress=False, steps=STEPS
    )
    again = training.train_predictor(
        folder,
        tiny_models["draft_close"],
        tmp_path / "p.safetensors",
        seed=0,
        max_positions=POSITIONS,
        progress=False,
        steps=STEPS,
    )
    stem = folder / predictor.FILE_STEM
    assert (tmp_path / "p.safetensors").read_bytes() == stem.with_suffix(".safetensors").read_bytes()
    assert (tmp_path / "p.json").read_text() == stem.with_suffix(".json").read_text()
    assert json.loads(stem.with_suffix(".json").read_text())["metrics"] == info["metrics"] == again["metrics"]
    for split in ("train", "val", "heldout_modules"):
        metrics = info["metrics"][split]
        assert metrics["count"] > 0 and 0 <= metrics["accuracy"] <= 1 and metrics["mae"] >= 0
        assert {"baseline_mae_mean", "baseline_nll", "baseline_accuracy"} <= set(metrics)
    assert info["metrics"]["train"]["nll"] < info["metrics"]["train"]["baseline_nll"]
    assert training.summary_lines(info)[-1].startswith(f"saved {stem.with_suffix('.safetensors')} in ")


def test_the_command_trains_and_saves_beside_the_target(tiny_models, tmp_path, capsys):
    """`specpipe train-predictor` (the README's retraining command) with the default fit."""
    folder = tmp_path / "target"
    shutil.copytree(tiny_models["target"], folder)
    cli.main(
        [
            "train-predictor",
            "--target",
            str(folder),
            "--draft",
            str(tiny_models["draft_close"]),
            "--max-positions",
            str(POSITIONS),
        ]
    )
    saved = folder / f"{predictor.FILE_STEM}.safetensors"
    assert f"saved {saved} in " in capsys.readouterr().out
    assert json.loads(saved.with_suffix(".json").read_text())["fit_steps"] == training.FIT_STEPS
    assert predictor.load_predictor(folder) is not None
