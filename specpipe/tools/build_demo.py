"""The demo model pair's recipe: a Llama target and a draft distilled from it, trained on the stdlib.

Contract (DESIGN §4). `build_demo_pair(out_dir)` trains, from nothing but the running Python's
standard-library `.py` source (comments and docstrings stripped), a byte-level BPE tokenizer, a
target `LlamaForCausalLM` of >= 10M parameters and a draft about ten times smaller, distilled from
the target on its own continuations, greedy and sampled at temperature 1: the loss is the KL
divergence from the target's next-token distribution plus the cross-entropy on its argmax, so the
two agree often both at greedy and when sampling. It writes
`out_dir/{target,draft}` (each loads alone with `AutoModelForCausalLM` / `AutoTokenizer`
`.from_pretrained`: fp16 safetensors under a float32 config, so they load as float32), the
acceptance-length predictor beside the target (train_predictor.py), the draft's proposal
temperatures beside the draft (calibrate_draft.py), `out_dir/heldout.json` (the prompts) and `out_dir/build_info.json`: parameter counts, c = t_draft_step / t_verify on one CPU
thread, the greedy acceptance rate and mean accepted length on the held-out prompts, build time,
greedy samples, the Python and files used. A full build into the shipped folder
(specpipe/assets/demo) also refreshes the shipped held-out prompts (specpipe/assets/prompts).

Determinism: fixed seeds, a sorted file list, seeded data order and a fixed thread count while
training, so a rebuild on the same machine type and torch version is bit-for-bit identical
(build_info.json's timings aside). The held-out modules (corpus.HELDOUT_MODULES) never enter
training; the prompts are the first 1-3 lines of their functions and classes.

`specpipe build-demo` runs it; the files' layout is specpipe/demo_files.py's, and where the
runtime finds the pair specpipe/demo_pair.py's.
This module knows nothing of workers or sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specpipe import demo_files
from specpipe.demo_files import DEMO_VERSION, MODELS
from specpipe.predictor import weights_sha256
from specpipe.tools.corpus import (
    NUM_PROMPTS,
    encode_corpus,
    extract_prompts,
    read_source,
    stdlib_files,
    train_tokenizer,
)
from specpipe.tools.decode import accepted_runs, continue_tokens
from specpipe.tools.lm_training import (
    ModelSpec,
    deterministic,
    distill_batches,
    distill_loss,
    make_model,
    save_model,
    train_lm,
    window_batches,
)
from specpipe.tools.timing import median_step_seconds
from specpipe.tools.calibrate_draft import calibrate_draft
from specpipe.tools.train_predictor import DEFAULT_POSITIONS, train_predictor

BUILD_THREADS = 2  # the thread count while training: part of what makes the build bit-for-bit
TIMING_CONTEXT = 128  # tokens already in the KV cache when c is measured
DRAFT_BLOCK = 4  # draft tokens per verification, for c and the accepted length


@dataclasses.dataclass(frozen=True)
class Preset:
    vocab_size: int
    seq_len: int  # the target's training windows
    max_files: int | None  # None: every training file
    target: ModelSpec
    draft: ModelSpec
    distill_rounds: int  # rounds of batched generation by the target, for the draft: greedy, then as many sampled
    distill_batch: int
    distill_prompt_len: int
    distill_gen_len: int
    eval_prompts: int
    eval_new_tokens: int
    timing_repeats: int
    predictor_positions: int  # labelled rows the acceptance-length predictor trains on (about)


PRESETS = {
    # Verifying costs mostly per-layer overhead on a CPU, so the target is deep and narrow (20
    # layers: c ~ 0.1) and the draft has one layer; 640 target steps fill ~4 of the ~6.5 minutes.
    "full": Preset(
        8192,
        128,
        None,
        target=ModelSpec(192, 20, 3, 512, False, 640, 8, 3e-3),
        draft=ModelSpec(128, 1, 4, 384, True, 400, 24, 3e-3),
        distill_rounds=10,
        distill_batch=64,
        distill_prompt_len=48,
        distill_gen_len=80,
        eval_prompts=NUM_PROMPTS,
        eval_new_tokens=64,
        timing_repeats=60,
        predictor_positions=DEFAULT_POSITIONS,
    ),
    "mini": Preset(
        320,
        32,
        12,
        target=ModelSpec(32, 2, 2, 64, False, 12, 4, 3e-3),
        draft=ModelSpec(16, 1, 1, 32, True, 8, 4, 3e-3),
        distill_rounds=2,
        distill_batch=4,
        distill_prompt_len=8,
        distill_gen_len=8,
        eval_prompts=3,
        eval_new_tokens=6,
        timing_repeats=3,
        predictor_positions=512,
    ),
}


def distill_data(target, tokens: torch.Tensor, preset: Preset, seed: int, bar) -> torch.Tensor:
    """Rows to distill on, [2 * rounds * batch, prompt_len + gen_len - 1]: random corpus windows
    as prompts, continued by the target greedily (half the rounds) and by sampling at temperature
    1 (the other half), so the draft learns where both kinds of decoding go."""
    prompt_len = preset.distill_prompt_len
    starts = torch.randint(
        0,
        len(tokens) - prompt_len,
        (2 * preset.distill_rounds, preset.distill_batch),
        generator=torch.Generator().manual_seed(seed),
    )
    sampler = torch.Generator().manual_seed(seed + 1)
    rows = []
    for index, round_starts in enumerate(starts.tolist()):
        prompts = torch.stack([tokens[s : s + prompt_len] for s in round_starts])
        generator = sampler if index >= preset.distill_rounds else None
        sequence, _ = continue_tokens(target, prompts, preset.distill_gen_len, generator)
        rows.append(sequence[:, :-1])
        bar.update(1)
    return torch.cat(rows)


# --- measuring ------------------------------------------------------------------------------


def measure_cost_ratio(target, draft, context: torch.Tensor, repeats: int) -> dict:
    """Medians of one draft step (1 token) and one target verify (DRAFT_BLOCK + 1 tokens), both
    with a KV cache holding `context` ([1, TIMING_CONTEXT]), interleaved so noise hits both."""
    medians = median_step_seconds([("draft", draft, 1), ("verify", target, DRAFT_BLOCK + 1)], context, repeats)
    t_draft, t_verify = medians["draft"], medians["verify"]
    return {"c": t_draft / t_verify, "t_draft_step_ms": 1e3 * t_draft, "t_verify_ms": 1e3 * t_verify}


@torch.inference_mode()
def measure_acceptance(target, draft, tokenizer, prompts: list[str], num_new_tokens: int) -> dict:
    """Along the target's greedy continuation of each prompt: how often the draft's greedy next
    token equals the target's, and the accepted length of greedy speculative decoding with
    blocks of DRAFT_BLOCK draft tokens (the draft's prefix is always the target's)."""
    matches, accepted, sequences = [], [], []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        sequence, _ = continue_tokens(target, prompt_ids, num_new_tokens)
        draft_argmax = draft(input_ids=sequence[:, :-1]).logits.argmax(-1)
        start = prompt_ids.shape[1] - 1
        agree = draft_argmax[:, start:] == sequence[:, start + 1 :]  # [1, num_new_tokens]
        matches += agree[0].tolist()
        runs, position = accepted_runs(agree, DRAFT_BLOCK)[0].tolist(), 0
        while position < len(runs):
            accepted.append(runs[position])
            position += runs[position] + 1  # the accepted tokens plus the target's correction or bonus
        sequences.append(sequence[0])
    return {
        "acceptance_rate": sum(matches) / len(matches),
        "mean_accepted_len": sum(accepted) / len(accepted),
        "tokens_per_verify": 1 + sum(accepted) / len(accepted),
        "sequences": sequences,
    }


# --- the build ------------------------------------------------------------------------------


def _train_pair(out_dir: Path, preset: Preset, seed: int, bar) -> dict:
    """Tokenizer, target, distilled draft, saved under out_dir; returns what the build recorded."""
    root, train_files, heldout_files = stdlib_files()
    train_files = train_files[: preset.max_files]
    texts = [read_source(p) for p in train_files]
    bar.set_description("tokenizer")
    tokenizer = train_tokenizer(texts, preset.vocab_size)
    tokens = encode_corpus(tokenizer, texts)  # [num_tokens]
    bar.update(1)
    bar.set_description("target")
    target = make_model(preset.target, tokenizer, seed)
    target_batches = window_batches(tokens, preset.target.batch, preset.seq_len, seed + 1)
    target_loss = train_lm(target, target_batches, preset.target, bar)
    bar.set_description("distill data")
    inputs = distill_data(target, tokens, preset, seed + 2, bar)
    bar.set_description("draft")
    draft = make_model(preset.draft, tokenizer, seed + 3)
    draft_batches = distill_batches(target.eval(), inputs, preset.draft.batch, seed + 4)
    draft_loss = train_lm(draft, draft_batches, preset.draft, bar, loss_fn=distill_loss)
    for name, model in zip(MODELS, (target, draft)):
        save_model(model, tokenizer, out_dir / name)
    files_digest = hashlib.sha256()
    for path, text in zip(train_files, texts):
        files_digest.update(f"{path.relative_to(root).as_posix()}\n{text}".encode())
    return {
        "params_target": target.num_parameters(),
        "params_draft": draft.num_parameters(),
        "target_final_loss": target_loss,
        "draft_final_loss": draft_loss,
        "corpus_tokens": len(tokens),
        "distill_tokens": inputs.numel(),
        "train_files": len(train_files),
        "train_files_sha256": files_digest.hexdigest(),
        "heldout_modules": [p.relative_to(root).as_posix() for p in heldout_files],
        "prompts": extract_prompts(root, heldout_files)[: preset.eval_prompts],
    }


def _measure_pair(out_dir: Path, preset: Preset, prompts: list[str], bar) -> dict:
    """Acceptance, then c on one thread, on the weights as stored (loaded back as float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_description("acceptance")
    target, draft = (
        AutoModelForCausalLM.from_pretrained(out_dir / name, dtype=torch.float32).eval() for name in MODELS
    )
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "target")
    acceptance = measure_acceptance(target, draft, tokenizer, prompts, preset.eval_new_tokens)
    bar.update(1)
    bar.set_description("timing c")
    sequences = acceptance.pop("sequences")
    stream = torch.cat(sequences)  # [num_tokens]: real text, repeated if short (mini preset)
    context = stream.repeat(-(-TIMING_CONTEXT // len(stream)))[:TIMING_CONTEXT].unsqueeze(0)
    torch.set_num_threads(1)
    cost = measure_cost_ratio(target, draft, context, preset.timing_repeats)
    bar.update(1)
    samples = [tokenizer.decode(s) for s in sequences[:2]]
    return {**cost, **acceptance, "sample": samples[0], "samples": samples}


@contextlib.contextmanager
def _build_settings():
    """Fixed threads, deterministic kernels, no bars but ours; the caller's settings come back."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with deterministic(BUILD_THREADS):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def build_demo_pair(out_dir: Path, *, seed: int = 0, preset: str = "full", progress: bool = True) -> dict:
    """Builds tokenizer, target and draft into out_dir/{target,draft}, writes build_info.json
    and heldout.json there, and returns the build info (see the module docstring)."""
    import tokenizers
    import transformers

    recipe, out_dir = PRESETS[preset], Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 3 + recipe.target.steps + 2 * recipe.distill_rounds + recipe.draft.steps
    start = time.perf_counter()
    with _build_settings(), tqdm(total=total, disable=not progress, unit="step") as bar:
        info = {"demo_version": DEMO_VERSION, "preset": preset, "seed": seed, **_train_pair(out_dir, recipe, seed, bar)}
        info["train_seconds"] = time.perf_counter() - start
        prompts = info.pop("prompts")
        info.update(_measure_pair(out_dir, recipe, [p["prompt"] for p in prompts], bar))
        # The acceptance-length predictor of the `predictor` policy ships beside the target.
        info["accept_predictor"] = train_predictor(
            out_dir / "target", out_dir / "draft", seed=seed, progress=False, max_positions=recipe.predictor_positions
        )["metrics"]
        # The draft's proposal temperatures (specpipe/proposal.py) ship beside the draft.
        calibrated = calibrate_draft(out_dir / "target", out_dir / "draft", seed=seed)
        info["draft_temperature"] = {"temperatures": calibrated["temperatures"], "scales": calibrated["scales"]}
    weights = [out_dir / name / "model.safetensors" for name in MODELS]
    info.update(
        {
            "build_seconds": time.perf_counter() - start,
            "param_ratio": info["params_target"] / info["params_draft"],
            "num_prompts": len(prompts),
            "eval_new_tokens": recipe.eval_new_tokens,
            "draft_block": DRAFT_BLOCK,
            "timing_context": TIMING_CONTEXT,
            "timing_threads": 1,
            "build_threads": BUILD_THREADS,
            "vocab_size": recipe.vocab_size,
            "target_config": dataclasses.asdict(recipe.target),
            "draft_config": dataclasses.asdict(recipe.draft),
            "weights_sha256": {name: weights_sha256(out_dir / name) for name in MODELS},
            "weights_bytes": sum(path.stat().st_size for path in weights),
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "tokenizers_version": tokenizers.__version__,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus",
        }
    )
    (out_dir / "heldout.json").write_text(json.dumps(prompts, indent=1) + "\n")
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    refresh_shipped_prompts(out_dir, preset)
    return info


def refresh_shipped_prompts(out_dir: Path, preset: str) -> bool:
    """After a full build into the shipped folder, its held-out prompts become the package's
    (what `specpipe bench` and `specpipe demo` run); any other build leaves them. True if copied."""
    if Path(out_dir).resolve() != demo_files.DEMO_DIR or preset != "full":
        return False
    demo_files.PROMPTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    demo_files.PROMPTS_PATH.write_bytes((Path(out_dir) / "heldout.json").read_bytes())
    return True


def summary_lines(info: dict, out_dir: Path) -> list[str]:
    """What `specpipe build-demo` prints: the target's greedy samples, sizes, c and acceptance."""
    lines = [f"--- greedy sample from the target ---\n{sample}" for sample in info["samples"]]
    return lines + [
        f"target {info['params_target']:,} params, draft {info['params_draft']:,} "
        f"({info['param_ratio']:.1f}x smaller), weights {info['weights_bytes'] / 1e6:.1f} MB",
        f"c = t_draft_step / t_verify = {info['t_draft_step_ms']:.3f} ms / "
        f"{info['t_verify_ms']:.3f} ms = {info['c']:.3f} (one thread)",
        f"greedy acceptance rate {info['acceptance_rate']:.3f}, mean accepted length "
        f"{info['mean_accepted_len']:.2f} of {DRAFT_BLOCK} on {info['num_prompts']} prompts",
        f"built in {info['build_seconds']:.0f} s into {out_dir}",
    ]
