"""Fitting the draft's proposal temperatures (specpipe/tools/calibrate_draft.py) on tiny pairs whose
best factor is known: a draft identical to the target is best drawn at the request's own
temperature (every factor but 1 loses acceptance), a draft whose logits are the target's times 0.1
is best drawn as sharp as the grid allows (its law equals the target's at factor 0.1). The table is
saved beside the draft where the worker finds it, and `specpipe calibrate-draft` is the entry."""

import json
from pathlib import Path

import pytest

from specpipe.launch import cli
from specpipe.proposal import FILE_NAME, load_table
from specpipe.tools import calibrate_draft as calibrate

CORPUS = [Path(__file__)]  # any text: a test file is text the tiny tokenizer reads


@pytest.fixture(scope="module")
def fitted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated")
    return {
        name: calibrate.calibrate_draft(
            tiny_models["target"], tiny_models[name], out / f"{name}.json", corpus_files=CORPUS, windows=2
        )
        for name in ("draft_same", "draft_flat")
    }


def test_a_draft_equal_to_the_target_is_drawn_at_the_request_temperature(fitted):
    info = fitted["draft_same"]
    assert info["scales"] == [1.0] * len(calibrate.TEMPERATURES)
    for fit in info["acceptance"].values():
        assert fit["at_1"] == pytest.approx(1.0, abs=1e-5)
        assert max(fit["rates"]) == pytest.approx(fit["at_1"], abs=1e-5)


def test_a_flatter_draft_is_drawn_sharper_and_accepted_more(fitted):
    info = fitted["draft_flat"]
    assert info["scales"] == [min(calibrate.SCALES)] * len(calibrate.TEMPERATURES)
    for fit in info["acceptance"].values():
        assert fit["at_chosen"] > fit["at_1"] * (1 + calibrate.MIN_GAIN)
        assert fit["rates"] == sorted(fit["rates"], reverse=True)  # the sharper, the closer to the target


def test_the_table_is_saved_beside_the_draft_and_the_cli_prints_it(tiny_models, tmp_path, capsys):
    draft = tmp_path / "draft"
    draft.mkdir()
    for path in Path(tiny_models["draft_flat"]).iterdir():
        (draft / path.name).write_bytes(path.read_bytes())
    cli.main(
        [
            "calibrate-draft",
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(draft),
            "--corpus",
            *map(str, CORPUS),
        ]
    )
    table = load_table(draft)
    assert table is not None and table.temperatures == calibrate.TEMPERATURES
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith(f"saved {draft / FILE_NAME}")
    assert printed[calibrate.TEMPERATURES.index(1.0)].startswith(
        f"temperature 1: draw the draft at x{min(calibrate.SCALES):g}"
    )
    assert json.loads((draft / FILE_NAME).read_text())["draft_weights_sha256"] is not None


def test_the_fit_is_deterministic(tiny_models, fitted, tmp_path):
    again = calibrate.calibrate_draft(
        tiny_models["target"], tiny_models["draft_flat"], tmp_path / "again.json", corpus_files=CORPUS, windows=2
    )
    assert Path(again["path"]).read_text() == Path(fitted["draft_flat"]["path"]).read_text()
