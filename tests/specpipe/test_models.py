"""Model loading and the draft/target tokenizer check."""

import pytest
import torch

from specpipe.models import (
    ModelLoadError,
    TokenizerMismatchError,
    check_same_tokenizer,
    context_length,
    load_model,
    PREPACK_MEMORY_SHARE,
    PREPACKED_LAYER_MIN_ROWS,
    PREPACKED_MIN_ROWS,
    ROW_MAJOR_MAX_TOKENS,
    PrepackedLinear,
    TwoLayoutLinear,
    load_tokenizer,
    prepack_linears,
    tune_prepacked,
    use_weight_layout,
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


@pytest.mark.parametrize("role", ["target", "draft"])  # (the tiny draft ties its output embedding)
def test_column_major_weights_keep_the_model_and_its_memory(tiny_models, role):
    """use_weight_layout("column"): every Linear weight is the same [out, in] values over a
    transposed buffer (its transpose is contiguous), no weight is copied beside it, a tied output
    embedding stays tied, and the logits are those of the row-major model (to rounding); a second
    call, or "row", changes nothing."""
    row_major = load_model(tiny_models[role])
    model = load_model(tiny_models[role])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = sum(p.numel() for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert use_weight_layout(model, "row") == 0
    assert use_weight_layout(model, "column") == len(linears) > 0
    for module in linears:
        assert module.weight.t().is_contiguous() and not module.weight.is_contiguous()
    assert use_weight_layout(model, "column") == 0
    assert sum(p.numel() for p in model.parameters()) == before
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.tensor([[5, 9, 2, 7, 7, 1, 3, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, row_major(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("role", ["target", "draft"])
def test_both_layouts_keep_the_model_and_add_a_column_major_copy(tiny_models, role):
    """use_weight_layout("both"): every Linear keeps its row-major parameter and gets a column-major
    copy of the same values beside it (not a parameter: the state dict and the parameter count are
    unchanged, a tied output embedding stays tied), and the logits of a forward of 1 token and of 8
    are those of the row-major model (to rounding); a second call changes nothing."""
    row_major = load_model(tiny_models[role])
    model = load_model(tiny_models[role])
    keys, before = set(model.state_dict()), sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert use_weight_layout(model, "both") == len(linears) > 0
    for module in linears:
        assert type(module) is TwoLayoutLinear and module.weight.is_contiguous()
        assert module.column_weight.t().is_contiguous() and torch.equal(module.column_weight, module.weight)
    assert use_weight_layout(model, "both") == 0
    assert set(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == before
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    with torch.no_grad():
        for ids in (torch.tensor([[5]]), torch.tensor([[5, 9, 2, 7, 7, 1, 3, 8]])):
            torch.testing.assert_close(model(ids).logits, row_major(ids).logits, atol=1e-4, rtol=0)


def test_the_column_major_copy_follows_the_model_to_another_dtype(tiny_models):
    """The copy is a buffer: moving the model (dtype, device) moves it too, still column-major and
    equal to the weight, and still out of the state dict."""
    model = load_model(tiny_models["target"])
    keys = set(model.state_dict())
    use_weight_layout(model, "both")
    model.to(torch.float64)
    linears = [m for m in model.modules() if isinstance(m, TwoLayoutLinear)]
    assert linears and set(model.state_dict()) == keys
    for module in linears:
        assert module.column_weight.dtype == torch.float64 and module.column_weight.t().is_contiguous()
        assert torch.equal(module.column_weight, module.weight)


def test_a_two_layout_linear_takes_the_row_major_weight_for_short_forwards_only():
    """Up to ROW_MAJOR_MAX_TOKENS tokens the row-major parameter multiplies, beyond them the
    column-major copy (told apart here by giving the copy other values)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 4)
    use_weight_layout(torch.nn.Sequential(module), "both")
    module.column_weight = torch.zeros_like(module.column_weight)
    short = torch.randn(1, ROW_MAJOR_MAX_TOKENS, 6)
    long = torch.randn(1, ROW_MAJOR_MAX_TOKENS + 1, 6)
    with torch.no_grad():
        torch.testing.assert_close(module(short), short @ module.weight.t() + module.bias)
        torch.testing.assert_close(module(long), module.bias.expand(1, ROW_MAJOR_MAX_TOKENS + 1, 4))


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (torch's CPU build)")


@needs_onednn
@pytest.mark.parametrize("layout", ["row", "column"])
def test_a_prepacked_output_embedding_gives_the_plain_logits(tiny_models, layout):
    """prepack_linears: the head becomes a PrepackedLinear, the state dict is unchanged, and every
    row count gives the plain multiply's logits (to rounding), 2-D or 3-D input."""
    model = load_model(tiny_models["draft"])  # (a tied head: the embedding keeps its own weight)
    use_weight_layout(model, layout)
    keys = set(model.state_dict())
    head = model.get_output_embeddings()
    assert prepack_linears(model) == 1 and type(head) is PrepackedLinear
    assert set(model.state_dict()) == keys and not prepack_linears(model)  # (done once)
    with torch.no_grad():
        for rows in range(1, 10):
            x = torch.randn(rows, head.in_features)
            plain = torch.nn.functional.linear(x, head.weight, head.bias)
            torch.testing.assert_close(head(x), plain, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(head(x[None]), plain[None], atol=1e-4, rtol=1e-5)


@needs_onednn
def test_a_prepacked_output_embedding_multiplies_the_packed_copy_from_its_row_count():
    """Under PREPACKED_MIN_ROWS rows the plain weight multiplies, from there the prepacked copy
    (told apart here by prepacking zeros)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 32, bias=False)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    assert prepack_linears(model) == 1
    head.packed_weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(32, 8))
    short, long = torch.randn(PREPACKED_MIN_ROWS - 1, 8), torch.randn(PREPACKED_MIN_ROWS, 8)
    with torch.no_grad():
        torch.testing.assert_close(head(short), short @ head.weight.t())
        assert torch.count_nonzero(head(long)) == 0


def test_only_a_float32_cpu_linear_head_is_prepacked(tiny_models):
    model = load_model(tiny_models["target"], dtype="bfloat16")
    assert not prepack_linears(model, layers=True)
    assert not any(isinstance(m, PrepackedLinear) for m in model.modules())


@needs_onednn
def test_a_target_s_layers_are_prepacked_from_more_rows_while_the_copies_fit():
    """With `layers`, every plain Linear is prepacked, the output embedding used from
    PREPACKED_MIN_ROWS rows, the others from PREPACKED_LAYER_MIN_ROWS (told apart by prepacking
    zeros), each giving the plain logits otherwise; past PREPACK_MEMORY_SHARE of the memory only
    the output embedding is."""
    from tiny import tiny_architecture

    model = tiny_architecture("llama")
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    head = model.get_output_embeddings()
    weights = sum(m.weight.numel() * 4 for m in linears if m is not head)
    assert prepack_linears(model, layers=True, memory_bytes=int(weights / PREPACK_MEMORY_SHARE)) == len(linears)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer) is PrepackedLinear and layer.min_rows == PREPACKED_LAYER_MIN_ROWS
    assert head.min_rows == PREPACKED_MIN_ROWS
    layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight))
    short = torch.randn(PREPACKED_LAYER_MIN_ROWS - 1, layer.in_features)
    long = torch.randn(PREPACKED_LAYER_MIN_ROWS, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(short), short @ layer.weight.t(), atol=1e-4, rtol=1e-5)
        assert torch.count_nonzero(layer(long)) == 0
    too_big = tiny_architecture("llama")
    assert prepack_linears(too_big, layers=True, memory_bytes=int(weights / PREPACK_MEMORY_SHARE) - 1) == 1
    assert type(too_big.get_output_embeddings()) is PrepackedLinear
    assert type(too_big.model.layers[0].mlp.up_proj) is torch.nn.Linear


@needs_onednn
@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "gpt_neox", "opt"])
def test_a_model_with_its_linears_prepacked_gives_its_own_logits(name):
    """Every family's Linears prepacked (biased ones too: Qwen2's q/k/v, OPT's, GPT-NeoX's), the
    model's own forward over 1 to 12 tokens gives the plain model's logits (to rounding): the
    prepacked multiply is the same function, used from its row thresholds on."""
    from tiny import tiny_architecture, twin

    reference = tiny_architecture(name)
    model = twin(reference)
    assert prepack_linears(model, layers=True, memory_bytes=1 << 40) > 1
    assert any(isinstance(m, PrepackedLinear) and m.bias is not None for m in model.modules()) == (
        name in ("qwen2", "gpt_neox", "opt")
    )
    with torch.no_grad():
        for length in (1, 3, 8, 12):
            ids = torch.arange(5, 5 + length)[None]
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def copies_used(modules, rows: int) -> bool:
    return all(isinstance(m, PrepackedLinear) and rows >= m.min_rows for m in modules)


@needs_onednn
@pytest.mark.parametrize(
    "layers_win, head_win, expected",
    [
        # The layers' copies faster from 4 rows, the head's never: the head is plain again.
        ({4, 8, 16}, set(), {"layers": 4, "output embedding": None}),
        # Faster at 1-2 rows, slower at 3, faster from 4: from 4 (every larger count must win).
        ({1, 2, 4, 8, 16}, {16}, {"layers": 4, "output embedding": 16}),
        # Faster everywhere but at the largest count: never.
        ({1, 2, 3, 4, 8}, {1, 2, 3, 4, 8, 16}, {"layers": None, "output embedding": 1}),
    ],
)
def test_prepacked_copies_are_used_from_the_rows_they_were_measured_faster(layers_win, head_win, expected):
    """tune_prepacked: each group (the layers, then the output embedding) takes its copies from
    the smallest measured count from which they were faster at every larger one, or drops them
    (a plain Linear again, its copy's memory freed); the model still gives its own logits. The
    clock here is made up from which copies a forward of n tokens multiplies."""
    from tiny import tiny_architecture, twin

    reference = tiny_architecture("llama")
    model = twin(reference)
    assert prepack_linears(model, layers=True, memory_bytes=1 << 40) > 1
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, PrepackedLinear) and m is not head]

    def forward_seconds(n: int) -> float:
        seconds = 1.0
        for modules, wins in ((layers, layers_win), ([head], head_win)):
            if copies_used(modules, n):
                seconds += -0.1 if n in wins else 0.1
        return seconds

    assert tune_prepacked(model, forward_seconds) == expected
    for modules, name in ((layers, "layers"), ([head], "output embedding")):
        min_rows = expected[name]
        for m in modules:
            if min_rows is None:
                assert type(m) is torch.nn.Linear and not hasattr(m, "packed_weight")
            else:
                assert type(m) is PrepackedLinear and m.min_rows == min_rows
    with torch.no_grad():
        for length in (1, 3, 8, 12):
            ids = torch.arange(5, 5 + length)[None]
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_nothing_to_tune_without_prepacked_copies(tiny_models):
    model = load_model(tiny_models["target"])
    assert tune_prepacked(model, lambda n: pytest.fail("timed a forward with nothing to tune")) == {}
