"""Fitting the draft's proposal temperatures for a target/draft pair (the runtime half, and why:
specpipe/proposal.py).

`calibrate_draft` samples corpus windows (standard-library source, never the held-out modules; or
the caller's text files), continues each with the target sampling at every request temperature
of the table, scores both models on the same continuations in one forward each, and at each
temperature picks the factor of SCALES under which a draft token drawn from the draft's law is
most often accepted (mean sum_x min(p, q_s), `proposal.acceptance_by_scale`). A factor that does
not beat 1 by MIN_GAIN stays 1. It saves `<draft>/draft_temperature.json` beside the draft's
weights, with the acceptance of every factor it tried. Deterministic given the seed (one thread).
`specpipe calibrate-draft` runs it; the demo build runs it too. Knows nothing of workers or sockets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from specpipe.predictor import weights_sha256
from specpipe.proposal import FILE_NAME, ProposalTemperatures, acceptance_by_scale
from specpipe.sampling import SamplingParams
from specpipe.tools.corpus import sample_corpus, stdlib_files
from specpipe.tools.decode import continue_tokens
from specpipe.tools.lm_training import deterministic

TEMPERATURES = (0.3, 0.5, 0.7, 1.0, 1.5)  # request temperatures the table holds
# Factors tried at each: a geometric grid from 0.5 to 3, with 1 in it.
SCALES = tuple(round(2 ** (k / 8), 3) for k in range(-8, 13))
MIN_GAIN = 0.01  # a factor must raise the acceptance by this share over 1 to be kept
PROMPT_LEN = 32  # corpus tokens before the target's sampled continuation
GEN_LEN = 64  # sampled tokens per window: the rows scored
WINDOWS = 16  # windows per temperature, decoded together
NUM_FILES = 48  # corpus files sampled (tokenizing all of them is slow)
THREADS = 1


def calibrate_draft(
    target_dir, draft_dir, out_path=None, *, seed: int = 0, corpus_files=None, windows: int = WINDOWS
) -> dict:
    """Fit the table and save it (default `<draft_dir>/draft_temperature.json`); returns the saved
    content plus the path and the time taken."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir, draft_dir = Path(target_dir), Path(draft_dir)
    out_path = Path(out_path) if out_path is not None else draft_dir / FILE_NAME
    start = time.perf_counter()
    with deterministic(THREADS):
        target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
        files = [Path(f) for f in corpus_files] if corpus_files else stdlib_files()[1]
        tokens = sample_corpus(AutoTokenizer.from_pretrained(target_dir), files, min(NUM_FILES, len(files)), seed)
        if len(tokens) <= PROMPT_LEN:
            raise ValueError(f"the corpus has {len(tokens)} tokens: at least {PROMPT_LEN + 1} are needed")
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - PROMPT_LEN, (windows,), generator=generator)
        prompts = torch.stack([tokens[s : s + PROMPT_LEN] for s in starts.tolist()])
        fits = {}
        for temperature in TEMPERATURES:
            fits[temperature] = _fit(target, draft, prompts, temperature, generator)
    scales = tuple(fit["chosen"] for fit in fits.values())
    table = ProposalTemperatures(TEMPERATURES, scales)
    info = {
        "format": 1,
        **table.to_json(),
        "acceptance": {
            str(t): {"scales": list(SCALES), "rates": fit["rates"], "at_1": fit["at_1"], "at_chosen": fit["at_chosen"]}
            for t, fit in fits.items()
        },
        "seed": seed,
        "windows": windows,
        "prompt_len": PROMPT_LEN,
        "gen_len": GEN_LEN,
        "min_gain": MIN_GAIN,
        "target_weights_sha256": weights_sha256(target_dir),
        "draft_weights_sha256": weights_sha256(draft_dir),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(info, indent=1) + "\n")  # no timings: a rebuild gives the same file
    return {**info, "path": str(out_path), "seconds": time.perf_counter() - start}


@torch.inference_mode()
def _fit(target, draft, prompts: torch.Tensor, temperature: float, generator: torch.Generator) -> dict:
    """The acceptance of every factor at one request temperature, over the target's own sampled
    continuations of `prompts`, and the factor chosen."""
    sequences, _ = continue_tokens(target, prompts, GEN_LEN, generator=generator, temperature=temperature)
    rows = slice(PROMPT_LEN - 1, -1)  # the rows that predicted the continuation's tokens
    vocab = min(target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size)
    target_logits = target(sequences).logits[:, rows, :vocab].flatten(0, 1)
    draft_logits = draft(sequences).logits[:, rows, :vocab].flatten(0, 1)
    rates = acceptance_by_scale(target_logits, draft_logits, SamplingParams(temperature), list(SCALES)).tolist()
    at_1 = rates[SCALES.index(1.0)]
    best = max(range(len(SCALES)), key=lambda i: rates[i])
    chosen = SCALES[best] if rates[best] > at_1 * (1 + MIN_GAIN) else 1.0
    return {"rates": rates, "at_1": at_1, "at_chosen": rates[SCALES.index(chosen)], "chosen": chosen}


def summary_lines(info: dict) -> list[str]:
    """What `specpipe calibrate-draft` prints: per request temperature, the factor chosen and the
    acceptance it gives against drawing at the request's own temperature."""
    lines = []
    for temperature, scale in zip(info["temperatures"], info["scales"]):
        fit = info["acceptance"][str(temperature)]
        lines.append(
            f"temperature {temperature:g}: draw the draft at x{scale:g}  acceptance {fit['at_1']:.3f} -> {fit['at_chosen']:.3f}"
        )
    lines.append(f"saved {info['path']} ({info['seconds']:.1f} s)")
    return lines
