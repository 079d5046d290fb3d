"""Training the acceptance-length predictor (the model and its label: specpipe/predictor.py).

`train_predictor` builds the dataset from the demo pair's training corpus (standard-library
source, never the held-out modules): seeded corpus windows continued greedily by the target,
each row's hidden state labelled with the accepted run of the draft after it. It fits the MLP
deterministically and saves `<target>/accept_predictor.safetensors` + `accept_predictor.json`
beside the target's weights, with metrics against model-free baselines. `specpipe
train-predictor` runs it; the demo build (build_demo.py) runs it too. Knows nothing of workers,
sockets or the coordinator's policy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specpipe.predictor import FILE_STEM, MAX_LEN, AcceptPredictor, weights_sha256
from specpipe.tools.corpus import sample_corpus, stdlib_files
from specpipe.tools.decode import accepted_runs, continue_tokens
from specpipe.tools.lm_training import deterministic

# One thread: bit-for-bit given the seed, and immune to the stalls two OpenMP threads suffer when
# the two cores are shared (measured 20x slower generation under load).
TRAIN_THREADS = 1
PROMPT_LEN = 32  # corpus tokens before the target's greedy continuation
GEN_LEN = 64  # greedy tokens per window: GEN_LEN - MAX_LEN labelled rows each
WINDOW_BATCH = 64  # windows generated together (batching amortises the per-step overhead)
NUM_FILES = 96  # training files sampled for the corpus (tokenizing all of them is slow)
VAL_FRACTION = 0.2  # windows (not rows: neighbours correlate) kept for validation
TEST_WINDOWS = 32  # windows from the held-out modules: an out-of-distribution check
FIT_STEPS = 1500  # about 5 s on one thread; the validation loss is flat from ~1000 on
FIT_BATCH = 256
FIT_LR = 3e-3
FIT_WEIGHT_DECAY = 0.1
DEFAULT_POSITIONS = 16384  # labelled training rows (about): the shipped predictor's
# Bins of the expected length (fractions of max_len) in which the metrics compare the mean
# prediction with the mean actual length: is a predicted 3 really a 3?
CALIBRATION_EDGES = (0.0, 0.375, 0.625, 0.75, 0.875, 0.9375)


# --- the dataset ------------------------------------------------------------------------------


@torch.inference_mode()
def label_rows(
    draft, sequences: torch.Tensor, hidden: torch.Tensor, max_len: int = MAX_LEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """From `continue_tokens(..., keep_hidden=True)`'s output (sequences [batch, prompt_len +
    gen_len], hidden [batch, gen_len, hidden_size]): (hidden [n, hidden_size], labels [n]) for
    the rows t whose label window fits (gen_len - max_len per sequence, first the row that chose
    the first greedy token)."""
    gen_len = hidden.shape[1]
    prompt_len = sequences.shape[1] - gen_len
    assert gen_len > max_len, "need more greedy tokens than max_len"
    draft_argmax = draft(input_ids=sequences[:, :-1]).logits.argmax(-1)  # [batch, T - 1]
    agree = draft_argmax[:, prompt_len - 1 :] == sequences[:, prompt_len:]  # [batch, gen_len]
    runs = accepted_runs(agree, max_len)  # runs[:, j]: block from row prompt_len - 1 + j
    labels = runs[:, 1 : gen_len - max_len + 1]  # row i's block starts one row later; whole windows only
    return hidden[:, : labels.shape[1]].flatten(0, 1).float(), labels.flatten()


def collect_examples(
    target, draft, tokens: torch.Tensor, num_windows: int, seed: int, bar=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded corpus windows (tokens [N]) continued greedily by the target, labelled.
    Returns (hidden [n, hidden_size], labels [n], window index [n])."""
    assert len(tokens) > PROMPT_LEN, "corpus shorter than one prompt"
    starts = torch.randint(0, len(tokens) - PROMPT_LEN, (num_windows,), generator=torch.Generator().manual_seed(seed))
    all_hidden, all_labels, all_windows = [], [], []
    for first in range(0, num_windows, WINDOW_BATCH):
        batch_starts = starts[first : first + WINDOW_BATCH].tolist()
        prompts = torch.stack([tokens[s : s + PROMPT_LEN] for s in batch_starts])
        hidden, labels = label_rows(draft, *continue_tokens(target, prompts, GEN_LEN, keep_hidden=True))
        all_hidden.append(hidden)
        all_labels.append(labels)
        all_windows.append(torch.arange(first, first + len(batch_starts)).repeat_interleave(GEN_LEN - MAX_LEN))
        if bar is not None:
            bar.update(len(batch_starts))
    return torch.cat(all_hidden), torch.cat(all_labels), torch.cat(all_windows)


# --- fitting ----------------------------------------------------------------------------------


def fit(
    hidden: torch.Tensor, labels: torch.Tensor, seed: int, steps: int = FIT_STEPS, max_len: int = MAX_LEN
) -> AcceptPredictor:
    """Cross-entropy with AdamW (cosine schedule) on seeded minibatches of (hidden [n, d], labels [n]),
    standardised; the standardisation is then folded into the first layer, so that inference is
    two small matrix-vector products (fewer ops: the cost per verify is dispatch, not arithmetic)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AcceptPredictor(hidden.shape[1], max_len)
    mean, std = hidden.mean(0), hidden.std(0).nan_to_num(1.0).clamp_min(1e-6)  # [d] each
    hidden = (hidden - mean) / std
    optimizer = torch.optim.AdamW(model.parameters(), lr=FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = FIT_LR * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randint(0, len(hidden), (min(FIT_BATCH, len(hidden)),), generator=generator)
        loss = F.cross_entropy(model(hidden[rows]), labels[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # layer1((h - mean) / std) == (W / std) h + (b - (W / std) mean)
        model.layer1.weight.div_(std)
        model.layer1.bias.sub_(model.layer1.weight @ mean)
    return model.eval()


@torch.inference_mode()
def evaluate(model: AcceptPredictor, hidden: torch.Tensor, labels: torch.Tensor, train_labels: torch.Tensor) -> dict:
    """The model against the model-free prior fitted on train_labels: cross-entropy vs the
    label histogram, accuracy vs the majority class, MAE of the expected length vs the constant
    mean (and vs the median, the best constant for MAE), correlation of expected length and label,
    and the mean actual length per bin of the expected length (calibration)."""
    if not len(labels):
        return {"count": 0}
    logits, expected, target = model(hidden), model.expected_length(hidden), labels.float()
    histogram = torch.bincount(train_labels, minlength=model.max_len + 1).float() + 1.0  # add-one: no log 0
    prior_log_probs = (histogram / histogram.sum()).log()
    spread = target.std() > 0 and expected.std() > 0
    return {
        "count": len(labels),
        "label_mean": target.mean().item(),
        "nll": F.cross_entropy(logits, labels).item(),
        "baseline_nll": -prior_log_probs[labels].mean().item(),
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "baseline_accuracy": (labels == histogram.argmax()).float().mean().item(),
        "mae": (expected - target).abs().mean().item(),
        "baseline_mae_mean": (target - train_labels.float().mean()).abs().mean().item(),
        "baseline_mae_median": (target - train_labels.float().median()).abs().mean().item(),
        "correlation": torch.corrcoef(torch.stack([expected, target]))[0, 1].item() if spread else 0.0,
        "calibration": _calibration(expected, target, model.max_len),
    }


def _calibration(expected: torch.Tensor, target: torch.Tensor, max_len: int) -> list[dict]:
    """Per bin of the expected length [n] (CALIBRATION_EDGES): the mean prediction and the mean
    actual length [n] there."""
    edges = [max_len * f for f in CALIBRATION_EDGES] + [math.inf]
    calibration = []
    for low, high in zip(edges, edges[1:]):
        rows = (expected >= low) & (expected < high)
        if rows.any():
            calibration.append(
                {
                    "predicted_from": low,
                    "count": int(rows.sum()),
                    "mean_predicted": expected[rows].mean().item(),
                    "mean_actual": target[rows].mean().item(),
                }
            )
    return calibration


# --- training, saving -------------------------------------------------------------------------


def _split(windows: torch.Tensor, seed: int) -> torch.Tensor:
    """[n] bool, True for the rows of the validation windows (a seeded VAL_FRACTION of them)."""
    num_windows = int(windows.max()) + 1
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed))
    val_windows = order[: max(1, int(num_windows * VAL_FRACTION))]
    return torch.isin(windows, val_windows)


def _fit_and_evaluate(
    target_dir: Path, draft_dir: Path, num_windows: int, num_test: int, seed: int, steps: int, progress: bool
) -> tuple[AcceptPredictor, dict, float]:
    """The dataset (training-corpus windows, and held-out-module windows for testing only), the
    fit and its metrics per split; also the seconds spent building the data."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    _, train_files, heldout_files = stdlib_files()
    with tqdm(total=num_windows + num_test, disable=not progress, desc="accept predictor", unit="window") as bar:
        tokens = sample_corpus(tokenizer, train_files, min(NUM_FILES, num_windows), seed)
        hidden, labels, windows = collect_examples(target, draft, tokens, num_windows, seed + 1, bar)
        heldout = sample_corpus(tokenizer, heldout_files, len(heldout_files), seed)
        test_hidden, test_labels, _ = collect_examples(target, draft, heldout, num_test, seed + 2, bar)
    data_seconds = time.perf_counter() - start
    is_val = _split(windows, seed + 3)
    model = fit(hidden[~is_val], labels[~is_val], seed + 4, steps)
    train_labels = labels[~is_val]
    metrics = {
        "train": evaluate(model, hidden[~is_val], train_labels, train_labels),
        "val": evaluate(model, hidden[is_val], labels[is_val], train_labels),
        "heldout_modules": evaluate(model, test_hidden, test_labels, train_labels),
    }
    return model, metrics, data_seconds


def train_predictor(
    target_dir,
    draft_dir,
    out_path=None,
    *,
    seed: int = 0,
    max_positions: int = DEFAULT_POSITIONS,
    progress: bool = True,
    steps: int = FIT_STEPS,
) -> dict:
    """Builds the dataset (about max_positions labelled rows from training-corpus windows, plus
    up to TEST_WINDOWS windows from the held-out modules, for evaluation only), fits the
    predictor for `steps` on TRAIN_THREADS threads, deterministically given the seed, and saves
    it to out_path (default `<target_dir>/accept_predictor.safetensors`, its JSON beside).
    Returns the JSON's content (metrics per split) plus the path and timings."""
    from safetensors.torch import save_file

    target_dir, draft_dir = Path(target_dir), Path(draft_dir)
    out_path = Path(out_path) if out_path is not None else target_dir / f"{FILE_STEM}.safetensors"
    num_windows = max(2, -(-max_positions // (GEN_LEN - MAX_LEN)))
    num_test = min(TEST_WINDOWS, num_windows)
    start = time.perf_counter()
    with deterministic(TRAIN_THREADS):
        model, metrics, data_seconds = _fit_and_evaluate(
            target_dir, draft_dir, num_windows, num_test, seed, steps, progress
        )
    info = {
        "format": 1,
        "hidden_size": model.hidden_size,
        "max_len": model.max_len,
        "num_units": model.layer1.out_features,
        "inputs": "target last hidden state (post final norm)",
        "seed": seed,
        "windows": num_windows,
        "test_windows": num_test,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "fit_steps": steps,
        "target_weights_sha256": weights_sha256(target_dir),
        "draft_weights_sha256": weights_sha256(draft_dir),
        "metrics": metrics,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_path, metadata={"format": "pt"})
    # No timings in the JSON: a rebuild must give identical files.
    out_path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return {**info, "path": str(out_path), "data_seconds": data_seconds, "seconds": time.perf_counter() - start}


def summary_lines(info: dict) -> list[str]:
    """What `specpipe train-predictor` prints: the metrics of each split against the baselines,
    the calibration, and where the predictor was saved."""
    lines = []
    for split, m in info["metrics"].items():
        lines.append(
            f"{split:>15}: n={m['count']:5d}  mean label {m['label_mean']:.2f}  cross-entropy "
            f"{m['nll']:.3f} (prior {m['baseline_nll']:.3f})  accuracy {m['accuracy']:.3f} (majority "
            f"{m['baseline_accuracy']:.3f})  MAE {m['mae']:.3f} (constant mean {m['baseline_mae_mean']:.3f}, "
            f"median {m['baseline_mae_median']:.3f})  corr {m['correlation']:.3f}"
        )
        lines.append(
            " " * 17
            + "predicted -> actual mean length: "
            + ", ".join(
                f"{row['mean_predicted']:.2f} -> {row['mean_actual']:.2f} ({row['count']})" for row in m["calibration"]
            )
        )
    lines.append(f"saved {info['path']} in {info['seconds']:.0f} s ({info['data_seconds']:.0f} s building the data)")
    return lines
