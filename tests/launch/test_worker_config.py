"""A worker's settings from its flags: the Linear weights' memory order (auto: column-major for
the target and the draft on the CPU; row-major on GPUs; an explicit choice is kept), and the
draft's proposal temperature (--temperature-scale, serve's --draft-temperature-scale, the table
a draft worker starts with: the flag's factor, else the file beside a model draft's weights, else 1)."""

import argparse
import json

import pytest
import torch

from specpipe.config import WorkerConfig
from specpipe.launch.serve_flags import add_serve_args, worker_flags
from specpipe.launch.errors import UsageError
from specpipe.launch.worker import proposal_table, weight_layout
from specpipe.launch.worker_flags import parse_config
from specpipe.proposal import FILE_NAME as PROPOSAL_FILE
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.proposal import ProposalTemperatures


@pytest.mark.parametrize(
    "role, flags, device, layout",
    [
        ("target", [], "cpu", "column"),
        ("draft", [], "cpu", "column"),
        ("target", [], "cuda:0", "row"),
        ("draft", [], "cuda:0", "row"),
        ("target", ["--weight-layout", "row"], "cpu", "row"),
        ("draft", ["--weight-layout", "row"], "cpu", "row"),
        ("target", ["--weight-layout", "both"], "cuda:0", "both"),
    ],
)
def test_weight_layout(role, flags, device, layout):
    config = parse_config(role, ["--model", "m", *flags])
    assert weight_layout(config, torch.device(device)) == layout


def test_an_unknown_weight_layout_is_refused_with_the_flag_named(capsys):
    with pytest.raises(SystemExit):
        parse_config("target", ["--model", "m", "--weight-layout", "diagonal"])
    assert "--weight-layout" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["target", "draft"])
def test_every_launch_lays_the_weights_out_where_it_builds_the_engine(tiny_models, role):
    """build_engine (shared by `serve`'s workers, a worker alone and torchrun) lays the model's
    Linear weights out by the rule above before the engine takes the model: on the CPU both
    workers' parameters become column-major (transposed buffers, no second copy), and copies
    prepacked for oneDNN may be added (kept where measured faster, below): any of the target's
    Linears, only the draft's output embedding."""
    from specpipe.launch.worker import build_engine
    from specpipe.models import load_model

    config = parse_config(role, ["--model", str(tiny_models[role]), "--port", "0"])
    model = load_model(config.model)
    build_engine(config, model, "cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and not any(hasattr(m, "column_weight") for m in linears)
    assert not any(m.weight.is_contiguous() for m in linears) and all(m.weight.t().is_contiguous() for m in linears)
    head = model.get_output_embeddings()
    packed = [m for m in linears if type(m).__name__ == "PrepackedLinear"]
    assert all(role == "target" or m is head for m in packed)


# ---------------------------------------------------------------------------------------------
# The draft's proposal temperature (specpipe/proposal.py): --temperature-scale on the draft
# worker, --draft-temperature-scale on serve, and the table a draft worker starts with.


@pytest.mark.parametrize("text, scale", [("auto", None), ("1.3", 1.3), ("0.5", 0.5)])
def test_the_draft_worker_reads_its_temperature_scale(text, scale):
    config = parse_config("draft", ["--model", "m", "--temperature-scale", text])
    assert config.temperature_scale == scale
    assert parse_config("draft", ["--model", "m"]).temperature_scale is None  # auto by default


@pytest.mark.parametrize("text", ["0", "-1", "x", "nan", "inf"])
def test_a_bad_temperature_scale_is_refused_with_the_flag_named(capsys, text):
    with pytest.raises(SystemExit) as stopped:
        parse_config("draft", ["--model", "m", "--temperature-scale", text])
    assert stopped.value.code == 2
    assert "--temperature-scale" in capsys.readouterr().err


def draft_config(folder, **given) -> WorkerConfig:
    return WorkerConfig(role="draft", model=str(folder), bind="tcp://127.0.0.1:0", **given)


def save_table(folder, table: ProposalTemperatures) -> None:
    (folder / PROPOSAL_FILE).write_text(json.dumps(table.to_json()))


def test_an_explicit_temperature_scale_is_one_factor_at_every_temperature(tmp_path):
    save_table(tmp_path, ProposalTemperatures((0.5, 1.0), (1.6, 1.2)))  # the flag wins over the file
    assert proposal_table(draft_config(tmp_path, temperature_scale=1.3)) == ProposalTemperatures.uniform(1.3)


def test_auto_takes_the_table_beside_the_draft_weights(tmp_path):
    table = ProposalTemperatures((0.5, 0.7, 1.0), (1.6, 1.4, 1.2))
    save_table(tmp_path, table)
    assert proposal_table(draft_config(tmp_path)) == table


def test_auto_without_a_table_proposes_at_the_request_temperature(tmp_path):
    assert proposal_table(draft_config(tmp_path)) == ProposalTemperatures()
    assert proposal_table(draft_config("some-org/some-hub-model")).is_identity


def test_a_file_beside_the_draft_that_is_not_a_table_fails_the_start_naming_it_and_the_fix(tmp_path):
    (tmp_path / "draft_temperature.json").write_text('{"temperatures": [1.0]}')
    with pytest.raises(
        UsageError,
        match=r"draft_temperature\.json: not a draft temperature table \(no 'scales' field\).*calibrate-draft",
    ):
        proposal_table(draft_config(tmp_path))


def test_an_ngram_drafter_takes_no_table(tmp_path):
    """Its q is one-hot: no temperature moves it, and the folder is the target's anyway."""
    save_table(tmp_path, ProposalTemperatures((0.5, 1.0), (1.6, 1.2)))
    assert proposal_table(draft_config(tmp_path, drafter="ngram")) == ProposalTemperatures()


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specpipe serve")
    add_serve_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("text", ["0", "-1", "x"])
def test_serve_refuses_a_bad_draft_temperature_scale_with_the_flag_named(capsys, text):
    with pytest.raises(SystemExit) as stopped:
        parse_serve(["--draft-temperature-scale", text])
    assert stopped.value.code == 2
    assert "--draft-temperature-scale" in capsys.readouterr().err


def test_serve_passes_an_explicit_draft_temperature_scale_to_the_draft_only():
    flags = worker_flags(parse_serve(["--draft-temperature-scale", "1.4"]))
    draft = flags["draft"]
    assert draft[draft.index("--temperature-scale") + 1] == "1.4"
    assert "--temperature-scale" not in flags["target"]
    # What the draft worker then makes of it.
    assert parse_config("draft", ["--model", "m", *draft]).temperature_scale == 1.4
    ngram = worker_flags(parse_serve(["--draft", "ngram", "--draft-temperature-scale", "1.4"]))
    assert "--temperature-scale" not in ngram["draft"]  # its one-hot q has no temperature


@pytest.mark.parametrize("argv", [[], ["--draft-temperature-scale", "auto"]])
def test_serve_passes_no_temperature_scale_when_auto(argv):
    flags = worker_flags(parse_serve(argv))
    assert "--temperature-scale" not in flags["draft"] + flags["target"]


def test_a_layout_named_on_the_command_line_gets_no_prepacked_copies(tiny_models):
    """Only the auto layout adds oneDNN's prepacked copies: `--weight-layout column` is the plain
    column-major layout (the way out should oneDNN misbehave on a host)."""
    from specpipe.launch.worker import build_engine
    from specpipe.models import load_model

    config = parse_config("target", ["--model", str(tiny_models["target"]), "--port", "0", "--weight-layout", "column"])
    model = load_model(config.model)
    build_engine(config, model, "cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear and not m.weight.is_contiguous() for m in linears)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (torch's CPU build)")
@pytest.mark.parametrize(
    "role, groups, flags",
    [
        ("target", ["layers", "output embedding"], []),
        ("draft", ["output embedding"], []),
        ("target", ["layers", "output embedding"], ["--max-seq-len", "8"]),  # (slots shorter than the longest timing)
    ],
)
def test_the_auto_layout_measures_its_prepacked_copies_on_this_host(tiny_models, role, groups, flags, caplog):
    """With the auto layout each worker times its packed forward with and without each group of
    oneDNN copies at start-up (models.tune_prepacked) and says what it chose: a group it keeps
    takes its copies from a count it measured."""
    from specpipe.launch.worker import build_engine
    from specpipe.models import PREPACK_TUNE_TOKENS, PrepackedLinear, load_model

    config = parse_config(role, ["--model", str(tiny_models[role]), "--port", "0", *flags])
    model = load_model(config.model)
    with caplog.at_level("INFO", logger="specpipe.launch.worker"):
        engine, _ = build_engine(config, model, "cpu")
    chosen = [r.getMessage() for r in caplog.records if "oneDNN copies" in r.getMessage()]
    assert [message.split(":")[1].strip() for message in chosen] == groups
    assert all(message.startswith(f"{role}: ") for message in chosen)
    assert all(m.min_rows in PREPACK_TUNE_TOKENS for m in model.modules() if isinstance(m, PrepackedLinear))
    # What it logged, its Pongs carry (GetStats shows it per worker): the layout, the copies, the store.
    pong = worker_pb2.Pong()
    engine.fill_pong(pong)
    assert [f"{role}: {line}" for line in pong.setup if "oneDNN copies" in line] == chosen
    assert any("laid out column-major" in line for line in pong.setup)
    assert any(line.startswith("KV store: ") for line in pong.setup)
