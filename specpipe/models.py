"""Model and tokenizer loading, and the draft/target tokenizer check.

Loads any causal LM that `AutoModelForCausalLM.from_pretrained` accepts: a local folder always, a
hub id where the hub is reachable. Models come back in eval mode with gradients off, on the asked
device and dtype. This module knows nothing about caches, sockets or verification.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# How many differing vocabulary entries a mismatch error lists before it stops: enough to see the
# pattern, short enough to read.
MAX_LISTED_DIFFERENCES = 5


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be used: the message says which and why."""


class TokenizerMismatchError(ModelLoadError):
    """Draft and target tokenizers differ, so draft token ids would mean other text to the target."""


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda:0 when CUDA is there, else cpu; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch build ({torch.__version__}) has no CUDA: install a CUDA build (the Dockerfile's "
            f"default target)"
            if torch.version.cuda is None
            else "no GPU is visible (CUDA_VISIBLE_DEVICES, the container's --gpus / the pod's GPU request, the driver)"
        )
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available: {why}")
    return device


def _check_local(path: str | Path) -> None:
    """A path that is plainly local (absolute, ./ or ../) must exist: say so, rather than let
    transformers report it as a malformed hub id."""
    text = str(path)
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().is_dir():
        raise ModelLoadError(f"model folder {text!r} does not exist")


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32") -> PreTrainedModel:
    """Load a causal LM for inference. `path` is a local folder or a hub id."""
    _check_local(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {str(path)!r}: {err}") from err
    except Exception as err:  # a corrupt weights file, a missing package: still the model's, not ours
        raise ModelLoadError(f"cannot load model {str(path)!r}: {type(err).__name__}: {err}") from err
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    logger.info(
        "loaded %s (%.1fM parameters) on %s as %s",
        path,
        sum(p.numel() for p in model.parameters()) / 1e6,
        device,
        dtype,
    )
    return model


# A forward of at most this many tokens multiplies by the row-major weight when a Linear keeps both
# orders ("both"); longer ones by the column-major copy (for a CPU whose kernels multiply one or two
# tokens faster row-major: one host measured 0.93x column against row at 1 token and 0.97x at 2).
ROW_MAJOR_MAX_TOKENS = 2


class TwoLayoutLinear(torch.nn.Linear):
    """A Linear that keeps its weight in both memory orders ("both" in `use_weight_layout`): the
    row-major parameter for a forward of at most ROW_MAJOR_MAX_TOKENS tokens, a column-major copy
    (a buffer that is not saved: the state dict is unchanged; it moves with the module) for longer
    ones."""

    column_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.numel() <= ROW_MAJOR_MAX_TOKENS * self.in_features
        return torch.nn.functional.linear(x, self.weight if small else self.column_weight, self.bias)


# From this many rows on, a CPU model's output embedding multiplies through oneDNN with its weight
# prepacked (`prepack_linears`), and (`layers`) its other Linears from PREPACKED_LAYER_MIN_ROWS;
# fewer rows take the plain Linear (oneDNN's call costs ~10 us more, which small multiplies lose).
PREPACKED_MIN_ROWS = 3
PREPACKED_LAYER_MIN_ROWS = 8
# The layers' prepacked copies double their Linear weights' memory: only while the copies take at
# most this share of the machine's memory.
PREPACK_MEMORY_SHARE = 0.05


class PrepackedLinear(torch.nn.Linear):
    """A Linear that also keeps its weight prepacked for oneDNN's matrix multiply (a plain
    attribute, not in the state dict) and uses it, on the CPU, for a forward of at least
    `min_rows` rows."""

    packed_weight: torch.Tensor
    min_rows: int = PREPACKED_MIN_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.min_rows * self.in_features or x.device.type != "cpu":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def prepack_linears(model: PreTrainedModel, layers: bool = False, memory_bytes: int = 0) -> int:
    """Give a float32 CPU model's output embedding a prepacked copy of its weight for oneDNN
    (`PrepackedLinear`, from PREPACKED_MIN_ROWS rows), and with `layers` every other plain Linear
    too (from PREPACKED_LAYER_MIN_ROWS rows) while their copies take at most PREPACK_MEMORY_SHARE
    of `memory_bytes` (default: this machine's). Returns how many it prepacked (none where oneDNN
    is missing or the model is not a float32 one on the CPU). The row counts are starting points: a
    worker then times the copies on its host (`tune_prepacked`) and keeps them where they pay.

    Why: MKL's multiply of a few rows repacks the whole weight at every call, worst for the wide
    vocabulary projection. Demo pair, one thread, interleaved, the whole forward, the output
    embedding alone: target 2-3 tokens 1.03x, 5 tokens 1.06x, 9 tokens 1.07x; draft 3 rows 1.06x,
    4 rows 1.28x, 8 rows 1.40x, 2 rows 0.96x (hence PREPACKED_MIN_ROWS); served, one client, against
    the plain head: greedy specbranch 1.064x, sequential 1.074x. The target's layers too: all of
    them 1.04x at 9 tokens, 1.14x at 17, 0.75x at 1 (hence PREPACKED_LAYER_MIN_ROWS); served
    against the head alone: 8 greedy specbranch clients 1.07x, one client 1.07x, 16
    autoregressive clients 1.02x. The logits differ from the plain multiply's by rounding (the
    start-up check in model_check holds them to the model's own)."""
    head = model.get_output_embeddings()
    chosen = [head] if type(head) is torch.nn.Linear else []
    if layers:
        others = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
        copy_bytes = sum(m.weight.numel() * m.weight.element_size() for m in others)
        memory_bytes = memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if copy_bytes <= PREPACK_MEMORY_SHARE * memory_bytes:
            chosen += others
    modules = [m for m in chosen if m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if not modules or not torch.backends.mkldnn.is_available():
        return 0
    try:
        for module in modules:
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().contiguous())
    except (AttributeError, RuntimeError) as err:  # (an op this torch build lacks)
        logger.info("Linear weights not prepacked: %s", err)
        return 0
    for module in modules:
        module.__class__ = PrepackedLinear
        if module is not head:
            module.min_rows = PREPACKED_LAYER_MIN_ROWS
    return len(modules)


# What `tune_prepacked` times: forwards of these many tokens (every token's logits kept), each
# this many times per copy's use, interleaved; the median decides.
PREPACK_TUNE_TOKENS = (1, 2, 3, 4, 8, 16)
PREPACK_TUNE_REPEATS = 5


def tune_prepacked(
    model: PreTrainedModel,
    forward_seconds: Callable[[int], float],
    tokens: Sequence[int] = PREPACK_TUNE_TOKENS,
    repeats: int = PREPACK_TUNE_REPEATS,
) -> dict[str, int | None]:
    """Measure on this host whether the model's prepacked copies (`prepack_linears`) pay, and
    from how many rows: for each group, the other Linears then the output embedding, the forward
    of each count in `tokens` is timed (`forward_seconds(n)`: one forward of n tokens, every
    token's logits kept) with the group multiplying its copies and its plain weights, interleaved,
    `repeats` times each. The group takes its copies from the smallest count from which they were
    faster at every larger count measured; where they never were, its copies are dropped (their
    memory freed) and it is a plain Linear again. Returns {group: its min_rows, or None where
    dropped} for the groups the model has.

    Why measured: hosts disagree. The demo target's layers, one thread, a forward of 9 tokens:
    the AMD EPYC of 2026-12-02 (05:00) 1.04x faster with their copies, the Intel Xeon (AMX) of
    2026-12-02 (11:00) 0.79x; served there, one greedy specbranch client, 1.20x without them."""
    head = model.get_output_embeddings()
    packed = [module for module in model.modules() if isinstance(module, PrepackedLinear)]
    groups = {
        "layers": [module for module in packed if module is not head],
        "output embedding": [module for module in packed if module is head],
    }
    chosen: dict[str, int | None] = {}
    for name, modules in groups.items():
        if not modules:
            continue
        forward_seconds(max(tokens))  # (warm-up: allocations, caches)
        times: dict[tuple[int, bool], list[float]] = {(n, on): [] for n in tokens for on in (True, False)}
        for _ in range(repeats):
            for n in tokens:
                for on in (True, False):
                    for module in modules:
                        module.min_rows = 1 if on else sys.maxsize
                    times[n, on].append(forward_seconds(n))
        min_rows = None
        for n in sorted(tokens, reverse=True):  # from the largest count down, while the copies win
            if statistics.median(times[n, True]) >= statistics.median(times[n, False]):
                break
            min_rows = n
        for module in modules:
            if min_rows is None:
                del module.packed_weight
                module.__dict__.pop("min_rows", None)
                module.__class__ = torch.nn.Linear
            else:
                module.min_rows = min_rows
        chosen[name] = min_rows
    return chosen


def use_weight_layout(model: PreTrainedModel, layout: str) -> int:
    """Lay every Linear's weight out in memory as `layout` says: "column" stores it transposed (a
    contiguous [in, out] buffer, seen as the same [out, in] weight; the same values, the same
    memory), "both" keeps the row-major weight and adds a column-major copy beside it (twice the
    Linear weights' memory; `TwoLayoutLinear` picks by the forward's token count), "row" leaves
    it. Returns how many weights were laid out anew.

    Why: on the CPU, a Linear over several tokens multiplies faster with the weight in column-major
    order (torch 2.13, MKL/oneDNN; demo target, one thread, interleaved: a forward of 6 tokens
    1.08x, 9 tokens 1.12x, 17-64 tokens 1.17x faster). At 1-2 tokens hosts differ: an earlier
    host measured column-major 0.93x at 1 token (hence "both"); the AMD EPYC of 2026-12-02 (one
    thread, interleaved, the demo target's forward) 1.27x at 1 token, 1.21x at 2, 1.02x at 9
    through the model's own layers, and served, one autoregressive client with the target's layers
    written out (lean_forward.py), "column" 1.28x of "both". Column-major is auto's choice on the
    CPU (launch/worker.py, weight_layout). A tied output embedding is laid out with its input
    embedding (the lookup of a few rows does not mind the order)."""
    if layout == "row":
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or not module.weight.is_contiguous():
            continue  # not a Linear, or laid out already
        if layout == "column":
            module.weight.data = module.weight.data.t().contiguous().t()
        elif type(module) is torch.nn.Linear:  # (a subclass may have a forward of its own)
            # A buffer, not kept in the state dict: it follows the module's .to() (device, dtype).
            module.register_buffer("column_weight", module.weight.detach().t().contiguous().t(), persistent=False)
            module.__class__ = TwoLayoutLinear
        else:
            continue
        changed += 1
    return changed


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    _check_local(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load tokenizer {str(path)!r}: {err}") from err


def check_same_tokenizer(draft: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> None:
    """Raise TokenizerMismatchError naming what differs: vocabulary size, the first differing
    entries, or the special tokens. Equal vocabularies and specials mean equal token ids."""
    draft_vocab, target_vocab = draft.get_vocab(), target.get_vocab()
    if len(draft_vocab) != len(target_vocab):
        raise TokenizerMismatchError(
            f"tokenizer vocabulary sizes differ: draft has {len(draft_vocab)}, target {len(target_vocab)}"
        )
    differing = [token for token, token_id in target_vocab.items() if draft_vocab.get(token) != token_id]
    if differing:
        listed = ", ".join(
            f"{token!r} (target id {target_vocab[token]}, draft id {draft_vocab.get(token)})"
            for token in sorted(differing)[:MAX_LISTED_DIFFERENCES]
        )
        raise TokenizerMismatchError(f"tokenizer vocabularies differ in {len(differing)} entries, e.g. {listed}")
    for special in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(draft, special) != getattr(target, special):
            raise TokenizerMismatchError(
                f"tokenizer {special} differs: draft {getattr(draft, special)}, target {getattr(target, special)}"
            )


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output head: the width of the logits (may exceed the tokenizer's vocabulary)."""
    return model.get_output_embeddings().weight.shape[0]


def context_length(model: PreTrainedModel) -> int:
    """The longest sequence the model's positions allow."""
    config = model.config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ModelLoadError(f"cannot tell the context length of {type(model).__name__}")
