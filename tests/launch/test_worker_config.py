"""A worker's settings from its flags: the Linear weights' memory order (auto: both orders for a
target on the CPU whose copy fits TWO_LAYOUT_MEMORY_SHARE of the memory, else column-major;
column-major for a draft on the CPU; row-major on GPUs; an explicit choice is kept)."""

import pytest
import torch

from specpipe.config import TWO_LAYOUT_MEMORY_SHARE
from specpipe.launch.worker import parse_config, weight_layout


@pytest.mark.parametrize(
    "role, flags, device, layout",
    [
        ("target", [], "cpu", "both"),
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
    assert weight_layout(config, torch.device(device), copy_bytes=10**6) == layout


def test_a_cpu_target_keeps_both_layouts_only_while_the_copy_fits_its_share_of_memory():
    config = parse_config("target", ["--model", "m"])
    memory = 10**9
    fits = int(TWO_LAYOUT_MEMORY_SHARE * memory)
    assert weight_layout(config, torch.device("cpu"), copy_bytes=fits, memory_bytes=memory) == "both"
    assert weight_layout(config, torch.device("cpu"), copy_bytes=fits + 1, memory_bytes=memory) == "column"


def test_an_unknown_weight_layout_is_refused_with_the_flag_named(capsys):
    with pytest.raises(SystemExit):
        parse_config("target", ["--model", "m", "--weight-layout", "diagonal"])
    assert "--weight-layout" in capsys.readouterr().err


@pytest.mark.parametrize("role, both", [("target", True), ("draft", False)])
def test_every_launch_lays_the_weights_out_where_it_builds_the_engine(tiny_models, role, both):
    """build_engine (shared by `serve`'s workers, a worker alone and torchrun) lays the model's
    Linear weights out by the rule above before the engine takes the model: the target keeps its
    row-major parameters beside column-major copies, the draft's parameters become column-major."""
    from specpipe.launch.worker import build_engine
    from specpipe.models import load_model

    config = parse_config(role, ["--model", str(tiny_models[role]), "--port", "0"])
    model = load_model(config.model)
    build_engine(config, model, "cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(hasattr(m, "column_weight") == both for m in linears)
    assert all(m.weight.is_contiguous() == both for m in linears)  # (the draft's: transposed buffers)
