"""The acceptance-length predictor at run time: the save/load round trip (trained on the tiny
models by the offline tool, whose own tests are tests/specpipe/tools/test_train_predictor.py), and
the target engine filling `predicted_accept_length` from the hidden state of the row that
predicted the last committed token."""

import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe import predictor, wire
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.kv_store import KVStore
from specpipe.model_check import prepare_model
from specpipe.target_worker.engine import TargetEngine
from tiny import twin
from specpipe.tools.train_predictor import train_predictor

STEPS = 100  # fit steps in the tests: enough to leave the initialisation, a second on one thread
POSITIONS = 160


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """The tiny target copied to a folder of its own, with a predictor trained into it."""
    folder = tmp_path_factory.mktemp("predictor") / "target"
    shutil.copytree(tiny_models["target"], folder)
    info = train_predictor(
        folder, tiny_models["draft_close"], seed=0, max_positions=POSITIONS, progress=False, steps=STEPS
    )
    return folder, info


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
    assert predictor.load_predictor(tmp_path) is None  # none saved there
    assert predictor.load_predictor("some-org/some-hub-model") is None
    stale = tmp_path / "stale"
    shutil.copytree(folder, stale)
    meta = stale / f"{predictor.FILE_STEM}.json"
    meta.write_text(meta.read_text().replace(info["target_weights_sha256"], "0" * 64))
    assert predictor.load_predictor(stale) is None  # made for other weights


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
        draft = (
            greedy[len(before) : len(before) + rng.randint(1, 4)]
            if rng.random() < 0.6
            else [rng.randrange(200) for _ in range(3)]
        )
        verify = pb.Verify(
            request_id="r",
            block_id=block_id,
            start_length=len(before),
            draft_token_ids=draft,
            emit_bonus=rng.random() < 0.5,
            want_features=True,
            want_prediction=True,
        )
        engine.handle(pb.Command(verify=verify), [])
        ((_, verdict, frames),) = engine.step()[0]
        cases.add((from_kept_row, verdict.num_accepted == 0, verdict.next_token_id >= 0))
        with torch.no_grad():
            reference = model(torch.tensor([state.tokens[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
        features = wire.get_tensor(verdict.features, frames)
        torch.testing.assert_close(features, reference, atol=1e-4, rtol=1e-4)
        assert verdict.predicted_accept_length == pytest.approx(accept.predict(reference), abs=1e-3)
        assert 0.0 <= verdict.predicted_accept_length <= predictor.MAX_LEN
        bare.handle(pb.Command(verify=verify), [])
        ((_, bare_verdict, _),) = bare.step()[0]
        assert bare_verdict.predicted_accept_length == -1.0  # no predictor loaded
        assert bare_verdict.num_accepted == verdict.num_accepted
    # Seen: a correction at the first token right after a block kept without bonus (the row
    # predicting it came from the previous verify), and a block kept without bonus.
    assert {(True, True, True), (False, False, False)} <= cases, cases
