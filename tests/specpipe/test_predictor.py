"""The acceptance-length predictor: the label construction on hand-checked cases (a stub draft,
a draft identical to the target, a draft that never agrees), deterministic training on the tiny
models, the save/load round trip, and the target engine filling `predicted_accept_length` from
the hidden state of the row that predicted the last committed token."""
import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe import predictor, wire
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.kv_store import KVStore, prepare_model
from specpipe.target_worker.engine import TargetEngine
from tiny import twin

STEPS = 100    # fit steps in the tests: enough to leave the initialisation, a second on one thread
POSITIONS = 160


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """The tiny target copied to a folder of its own, with a predictor trained into it."""
    folder = tmp_path_factory.mktemp("predictor") / "target"
    shutil.copytree(tiny_models["target"], folder)
    info = predictor.train_predictor(folder, tiny_models["draft_close"], seed=0, max_positions=POSITIONS,
                                     progress=False, steps=STEPS)
    return folder, info


def test_accepted_runs_by_hand():
    agree = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert predictor.accepted_runs(agree, max_len=3).tolist() == [[2, 1, 0, 3, 3, 2]]


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


SEQUENCE = torch.tensor([[10, 11, 20, 21, 22, 23, 24]])   # prompt [10, 11], then 5 greedy tokens


def test_labels_by_hand():
    """Rows t = 1, 2, 3 predicted tokens 20, 21, 22; agreement at p = 1..5 is T F T T F, so the
    block after token t + 1 (first judged at p = t + 1) accepts 0, 2 (capped), 1."""
    hidden = torch.arange(5.0)[None, :, None].expand(1, 5, 4)      # [1, gen_len, hidden]: row i holds i
    rows, labels = predictor.label_rows(StubDraft(wrong_at={2, 5}), SEQUENCE, hidden, max_len=2)
    assert labels.tolist() == [0, 2, 1]
    assert rows[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_identical_draft_labels_max_and_opposite_draft_labels_zero(tiny_models):
    target = load(tiny_models["target"])
    opposite = load(tiny_models["target"])
    with torch.no_grad():
        opposite.lm_head.weight.neg_()             # its argmax is the target's argmin: never agrees
    tokens = torch.randint(1, 250, (400,), generator=torch.Generator().manual_seed(0))
    for draft, label in ((target, predictor.MAX_LEN), (opposite, 0)):
        hidden, labels, windows = predictor.collect_examples(target, draft, tokens, num_windows=3, seed=0)
        assert hidden.shape == (3 * (predictor.GEN_LEN - predictor.MAX_LEN), target.config.hidden_size)
        assert labels.shape == windows.shape == hidden.shape[:1]
        assert (labels == label).all()


def test_training_is_deterministic_and_reports_metrics(trained, tiny_models, tmp_path):
    folder, info = trained
    again = predictor.train_predictor(folder, tiny_models["draft_close"], tmp_path / "p.safetensors", seed=0,
                                      max_positions=POSITIONS, progress=False, steps=STEPS)
    stem = folder / predictor.FILE_STEM
    assert (tmp_path / "p.safetensors").read_bytes() == stem.with_suffix(".safetensors").read_bytes()
    assert (tmp_path / "p.json").read_text() == stem.with_suffix(".json").read_text()
    assert json.loads(stem.with_suffix(".json").read_text())["metrics"] == info["metrics"] == again["metrics"]
    for split in ("train", "val", "heldout_modules"):
        metrics = info["metrics"][split]
        assert metrics["count"] > 0 and 0 <= metrics["accuracy"] <= 1 and metrics["mae"] >= 0
        assert {"baseline_mae_mean", "baseline_nll", "baseline_accuracy"} <= set(metrics)
    assert info["metrics"]["train"]["nll"] < info["metrics"]["train"]["baseline_nll"]


def test_save_load_round_trip_predict_and_stale_files(trained, tmp_path):
    folder, info = trained
    model = predictor.load_predictor(folder)
    assert model is not None and model.hidden_size == info["hidden_size"] and model.max_len == predictor.MAX_LEN
    hidden = torch.randn(5, model.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs, expected = model.probs(hidden), model.expected_length(hidden)
    assert probs.shape == (5, predictor.MAX_LEN + 1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    value = model.predict(hidden[0])
    assert isinstance(value, float) and 0.0 <= value <= predictor.MAX_LEN
    assert value == pytest.approx(float(expected[0]), abs=1e-6)
    assert predictor.load_predictor(tmp_path) is None                      # none saved there
    assert predictor.load_predictor("some-org/some-hub-model") is None
    stale = tmp_path / "stale"
    shutil.copytree(folder, stale)
    meta = stale / f"{predictor.FILE_STEM}.json"
    meta.write_text(meta.read_text().replace(info["target_weights_sha256"], "0" * 64))
    assert predictor.load_predictor(stale) is None                         # made for other weights


def test_target_engine_fills_the_prediction(trained, tiny_models):
    """Random blocks (some the target's own greedy tokens, so all accepted, with and without the
    bonus): each verdict's features are the hidden state of the row that predicted its last
    committed token, and predicted_accept_length is the predictor's value there."""
    folder, _ = trained
    model, accept = load(tiny_models["target"]), predictor.load_predictor(folder)
    served = twin(model)
    prepare_model(served)
    engine = TargetEngine(served, KVStore(2, 256), predictor=accept)
    bare = TargetEngine(served, KVStore(2, 256))
    rng = random.Random(5)
    for e in (engine, bare):
        e.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=[4, 8, 15, 16])), [])
    cases = set()
    for block_id in range(16):
        state = engine.requests["r"]
        before, from_kept_row = list(state.tokens), state.next_logits is not None
        greedy = list(before)
        with torch.no_grad():
            for _ in range(4):
                greedy.append(int(model(torch.tensor([greedy])).logits[0, -1].argmax()))
        draft = greedy[len(before):len(before) + rng.randint(1, 4)] if rng.random() < 0.6 else \
            [rng.randrange(200) for _ in range(3)]
        verify = pb.Verify(request_id="r", block_id=block_id, start_length=len(before), draft_token_ids=draft,
                           emit_bonus=rng.random() < 0.5, want_features=True, want_prediction=True)
        engine.handle(pb.Command(verify=verify), [])
        (_, verdict, frames), = engine.step()[0]
        cases.add((from_kept_row, verdict.num_accepted == 0, verdict.next_token_id >= 0))
        with torch.no_grad():
            reference = model(torch.tensor([state.tokens[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
        features = wire.get_tensor(verdict.features, frames)
        torch.testing.assert_close(features, reference, atol=1e-4, rtol=1e-4)
        assert verdict.predicted_accept_length == pytest.approx(accept.predict(reference), abs=1e-3)
        assert 0.0 <= verdict.predicted_accept_length <= predictor.MAX_LEN
        bare.handle(pb.Command(verify=verify), [])
        (_, bare_verdict, _), = bare.step()[0]
        assert bare_verdict.predicted_accept_length == -1.0                  # no predictor loaded
        assert bare_verdict.num_accepted == verdict.num_accepted
    # Seen: a correction at the first token right after a block kept without bonus (the row
    # predicting it came from the previous verify), and a block kept without bonus.
    assert {(True, True, True), (False, False, False)} <= cases, cases
