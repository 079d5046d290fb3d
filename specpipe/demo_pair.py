"""The demo model pair: a Llama target and a draft distilled from it, trained on the stdlib.

Contract (DESIGN §4). `build_demo_pair(out_dir)` trains, from nothing but the running Python's
standard-library `.py` source (comments and docstrings stripped), a byte-level BPE tokenizer, a
target `LlamaForCausalLM` of >= 10M parameters and a draft about ten times smaller, distilled from
the target on its own continuations, greedy and sampled at temperature 1: the loss is the KL
divergence from the target's next-token distribution plus the cross-entropy on its argmax, so the
two agree often both at greedy and when sampling. It writes
`out_dir/{target,draft}` (each loads alone with `AutoModelForCausalLM` / `AutoTokenizer`
`.from_pretrained`: fp16 safetensors under a float32 config, so they load as float32),
`out_dir/heldout.json` (the prompts) and `out_dir/build_info.json`: parameter counts,
c = t_draft_step / t_verify on one CPU thread, the greedy acceptance rate and mean accepted length
on the held-out prompts, build time, greedy samples, the Python and files used.

Determinism: fixed seeds, a sorted file list, seeded data order and a fixed thread count while
training, so a rebuild on the same machine type and torch version is bit-for-bit identical
(build_info.json's timings aside). The held-out modules (HELDOUT_MODULES) never enter training;
the prompts are the first 1-3 lines of their functions and classes.

`demo_pair_dir()` returns the shipped pair (specpipe/assets/demo) when present, else the user
cache, building it there on first use. This module knows nothing of workers or sockets.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEMO_VERSION = "2"  # bump when the recipe changes: names the user-cache folder
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
PROMPTS_PATH = Path(__file__).resolve().parent / "assets" / "prompts" / "heldout.json"
EOS_TOKEN = "<|endoftext|>"
# Kept out of training; the prompts come from them. All exist in Python 3.10 to 3.14.
HELDOUT_MODULES = ("bisect.py", "colorsys.py", "fnmatch.py", "fractions.py", "graphlib.py",
                   "heapq.py", "sched.py", "shlex.py", "statistics.py", "textwrap.py")
# Not Python as people write it (tests, codec tables, doc dumps), or machine-specific.
SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data",
                "turtledemo", "__pycache__", "lib2to3"}
BUILD_THREADS = 2  # the thread count while training: part of what makes the build bit-for-bit
TIMING_CONTEXT = 128  # tokens already in the KV cache when c is measured
DRAFT_BLOCK = 4  # draft tokens per verification, for c and the accepted length
NUM_PROMPTS = 32
MODELS = ("target", "draft")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A Llama's shape, and its training: `steps` AdamW steps of `batch` sequences."""
    hidden: int
    layers: int
    heads: int
    intermediate: int
    tie_embeddings: bool
    steps: int
    batch: int
    lr: float


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


PRESETS = {
    # Verifying costs mostly per-layer overhead on a CPU, so the target is deep and narrow (20
    # layers: c ~ 0.1) and the draft has one layer; 640 target steps fill ~4 of the ~6.5 minutes.
    "full": Preset(8192, 128, None, target=ModelSpec(192, 20, 3, 512, False, 640, 8, 3e-3),
                   draft=ModelSpec(128, 1, 4, 384, True, 400, 24, 3e-3),
                   distill_rounds=10, distill_batch=64, distill_prompt_len=48, distill_gen_len=80,
                   eval_prompts=NUM_PROMPTS, eval_new_tokens=64, timing_repeats=60),
    "mini": Preset(320, 32, 12, target=ModelSpec(32, 2, 2, 64, False, 12, 4, 3e-3),
                   draft=ModelSpec(16, 1, 1, 32, True, 8, 4, 3e-3),
                   distill_rounds=2, distill_batch=4, distill_prompt_len=8, distill_gen_len=8,
                   eval_prompts=3, eval_new_tokens=6, timing_repeats=3),
}


# --- data -----------------------------------------------------------------------------------

def stdlib_files() -> tuple[Path, list[Path], list[Path]]:
    """(stdlib root, training files, held-out files), each sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if not (set(rel.parts[:-1]) & SKIPPED_DIRS or rel.parts[0].startswith("config-")
                or rel.name.startswith("_sysconfigdata")):
            (heldout if rel.as_posix() in HELDOUT_MODULES else train).append(path)
    return root, train, heldout


def strip_source(source: str) -> str:
    """The code without comments and docstrings (a body left empty gets `pass`), so that a model
    this small spends its few steps on Python rather than on English."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    lines, dropped = source.splitlines(), set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            dropped.update(range(body[0].lineno - 1, body[0].end_lineno))
            if len(body) == 1:
                lines[body[0].lineno - 1] = " " * body[0].col_offset + "pass"
                dropped.discard(body[0].lineno - 1)
    kept = [line for i, line in enumerate(lines)
            if i not in dropped and not line.lstrip().startswith("#")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(kept).strip("\n") + "\n")


def _read(path: Path) -> str:
    return strip_source(path.read_text(encoding="utf-8", errors="replace"))


def extract_prompts(root: Path, files: list[Path], count: int = NUM_PROMPTS) -> list[dict]:
    """The first 1-3 lines of functions and classes in `files`, `count` of them, evenly spaced."""
    candidates = []  # (file, name, first line, that file's lines)
    for path in files:
        source = _read(path)
        nodes = [n for top in ast.parse(source).body for n in [top, *getattr(top, "body", [])]
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        candidates += [(path.relative_to(root).as_posix(), node.name, node.lineno,
                        source.splitlines()) for node in nodes]
    prompts = []
    for i in range(count):
        file, name, lineno, lines = candidates[int(i * len(candidates) / count)]
        chunk = lines[lineno - 1:lineno + i % 3]  # 1, 2 or 3 lines
        chunk = chunk[:next((j for j, line in enumerate(chunk) if not line.strip()), len(chunk))]
        # No trailing newline: byte-level BPE merges "\n" with the next line's indentation.
        prompts.append({"file": file, "name": name, "prompt": "\n".join(chunk)})
    return prompts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (any UTF-8 round-trips) wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=None, pad_token=EOS_TOKEN,
                                   model_max_length=2048, clean_up_tokenization_spaces=False)


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream, [num_tokens]: every file followed by EOS."""
    ids = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts):
        ids += [*encoding.ids, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


# --- models ---------------------------------------------------------------------------------

def make_model(spec: ModelSpec, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden,
                         intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                         max_position_embeddings=2048, tie_word_embeddings=spec.tie_embeddings,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, dtype="float32")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_lm(model, batches, spec: ModelSpec, bar, loss_fn=None) -> float:
    """AdamW with warmup and cosine decay on `batches() -> (inputs, labels)`; the last loss.
    `loss_fn(logits, labels)`: cross-entropy on next-token labels unless given."""
    loss_fn = loss_fn or (lambda logits, labels: F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    warmup = max(1, spec.steps // 20)
    for step in range(spec.steps):
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / spec.steps))
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * (min(1.0, (step + 1) / warmup) * cosine)
        inputs, labels = batches()  # [batch, seq_len] each ([batch, seq_len, vocab] logits to distill)
        loss = loss_fn(model(input_ids=inputs).logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return loss.item()


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_target || q_draft) per position, plus the cross-entropy on the target's argmax: the
    first makes q match p where sampling goes, the second keeps greedy agreement high."""
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return kl + F.nll_loss(log_q.flatten(0, 1), target_logits.argmax(-1).flatten())


def window_batches(tokens: torch.Tensor, batch: int, seq_len: int, seed: int):
    """Seeded random windows of the token stream [num_tokens]: the same batches every build."""
    generator = torch.Generator().manual_seed(seed)

    def batches():
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=generator)
        windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
    return batches


def distill_batches(target, inputs: torch.Tensor, batch: int, seed: int):
    """Seeded random rows of inputs [rows, seq_len], with the target's logits over them."""
    generator = torch.Generator().manual_seed(seed)

    def batches():
        rows = inputs[torch.randint(0, len(inputs), (batch,), generator=generator)]
        with torch.no_grad():
            return rows, target(input_ids=rows).logits
    return batches


@torch.inference_mode()
def continue_tokens(model, input_ids: torch.Tensor, num_new_tokens: int, generator=None) -> torch.Tensor:
    """Greedy decoding with a KV cache (sampling at temperature 1 from `generator` when given).
    input_ids: [batch, prompt_len] (no padding). Returns [batch, prompt_len + num_new_tokens]."""
    from transformers import DynamicCache

    def choose(logits):  # [batch, vocab] -> [batch, 1]
        if generator is None:
            return logits.argmax(-1, keepdim=True)
        return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)

    cache = DynamicCache(config=model.config)
    prefill_logits = model(input_ids=input_ids, cache=cache, use_cache=True).logits
    tokens = [input_ids, choose(prefill_logits[:, -1])]
    for _ in range(num_new_tokens - 1):
        logits = model(input_ids=tokens[-1], cache=cache, use_cache=True).logits
        tokens.append(choose(logits[:, -1]))
    return torch.cat(tokens, dim=1)


def distill_data(target, tokens: torch.Tensor, preset: Preset, seed: int, bar) -> torch.Tensor:
    """Rows to distill on, [2 * rounds * batch, prompt_len + gen_len - 1]: random corpus windows
    as prompts, continued by the target greedily (half the rounds) and by sampling at temperature
    1 (the other half), so the draft learns where both kinds of decoding go."""
    prompt_len = preset.distill_prompt_len
    starts = torch.randint(0, len(tokens) - prompt_len,
                           (2 * preset.distill_rounds, preset.distill_batch),
                           generator=torch.Generator().manual_seed(seed))
    sampler = torch.Generator().manual_seed(seed + 1)
    rows = []
    for index, round_starts in enumerate(starts.tolist()):
        prompts = torch.stack([tokens[s:s + prompt_len] for s in round_starts])
        generator = sampler if index >= preset.distill_rounds else None
        sequence = continue_tokens(target, prompts, preset.distill_gen_len, generator)
        rows.append(sequence[:, :-1])
        bar.update(1)
    return torch.cat(rows)


def save_model(model, tokenizer, folder: Path) -> None:
    """fp16 safetensors (half the bytes) under a float32 config (so it loads as float32)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


# --- measuring ------------------------------------------------------------------------------

@torch.inference_mode()
def measure_cost_ratio(target, draft, context: torch.Tensor, repeats: int) -> dict:
    """Medians of one draft step (1 token) and one target verify (DRAFT_BLOCK + 1 tokens), both
    with a KV cache holding `context` ([1, TIMING_CONTEXT]), interleaved so noise hits both."""
    from transformers import DynamicCache

    block = context[:, -DRAFT_BLOCK - 1:]
    runs = [(draft, block[:, :1], DynamicCache(config=draft.config), []),
            (target, block, DynamicCache(config=target.config), [])]
    for model, _, cache, _ in runs:
        model(input_ids=context, cache=cache, use_cache=True)
    for _ in range(repeats + 3):  # the first three warm up
        for model, ids, cache, times in runs:
            start = time.perf_counter()
            model(input_ids=ids, cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache.crop(-ids.shape[1])
    t_draft, t_verify = (statistics.median(times[3:]) for *_, times in runs)
    return {"c": t_draft / t_verify, "t_draft_step_ms": 1e3 * t_draft,
            "t_verify_ms": 1e3 * t_verify}


@torch.inference_mode()
def measure_acceptance(target, draft, tokenizer, prompts: list[str], num_new_tokens: int) -> dict:
    """Along the target's greedy continuation of each prompt: how often the draft's greedy next
    token equals the target's, and the accepted length of greedy speculative decoding with
    blocks of DRAFT_BLOCK draft tokens (the draft's prefix is always the target's)."""
    matches, accepted, sequences = [], [], []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        sequence = continue_tokens(target, prompt_ids, num_new_tokens)
        draft_argmax = draft(input_ids=sequence[:, :-1]).logits.argmax(-1)
        start = prompt_ids.shape[1] - 1
        agree = (draft_argmax[0, start:] == sequence[0, start + 1:]).tolist()
        matches += agree
        position = 0
        while position < len(agree):
            run = 0
            while run < DRAFT_BLOCK and position + run < len(agree) and agree[position + run]:
                run += 1
            accepted.append(run)
            position += run + 1  # the accepted tokens plus the target's correction or bonus
        sequences.append(sequence[0])
    return {"acceptance_rate": sum(matches) / len(matches),
            "mean_accepted_len": sum(accepted) / len(accepted),
            "tokens_per_verify": 1 + sum(accepted) / len(accepted), "sequences": sequences}


# --- the build ------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_pair(out_dir: Path, preset: Preset, seed: int, bar) -> dict:
    """Tokenizer, target, distilled draft, saved under out_dir; returns what the build recorded."""
    root, train_files, heldout_files = stdlib_files()
    train_files = train_files[:preset.max_files]
    texts = [_read(p) for p in train_files]
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
    return {"params_target": target.num_parameters(), "params_draft": draft.num_parameters(),
            "target_final_loss": target_loss, "draft_final_loss": draft_loss,
            "corpus_tokens": len(tokens), "distill_tokens": inputs.numel(),
            "train_files": len(train_files), "train_files_sha256": files_digest.hexdigest(),
            "heldout_modules": [p.relative_to(root).as_posix() for p in heldout_files],
            "prompts": extract_prompts(root, heldout_files)[:preset.eval_prompts]}


def _measure_pair(out_dir: Path, preset: Preset, prompts: list[str], bar) -> dict:
    """Acceptance, then c on one thread, on the weights as stored (loaded back as float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_description("acceptance")
    target, draft = (AutoModelForCausalLM.from_pretrained(out_dir / name, dtype=torch.float32)
                     .eval() for name in MODELS)
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

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             hf_logging.is_progress_bar_enabled())
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        if saved[2]:
            hf_logging.enable_progress_bar()


def build_demo_pair(out_dir: Path, *, seed: int = 0, preset: str = "full",
                    progress: bool = True) -> dict:
    """Builds tokenizer, target and draft into out_dir/{target,draft}, writes build_info.json
    and heldout.json there, and returns the build info (see the module docstring)."""
    import tokenizers
    import transformers

    recipe, out_dir = PRESETS[preset], Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 3 + recipe.target.steps + 2 * recipe.distill_rounds + recipe.draft.steps
    start = time.perf_counter()
    with _build_settings(), tqdm(total=total, disable=not progress, unit="step") as bar:
        info = {"demo_version": DEMO_VERSION, "preset": preset, "seed": seed,
                **_train_pair(out_dir, recipe, seed, bar)}
        info["train_seconds"] = time.perf_counter() - start
        prompts = info.pop("prompts")
        info.update(_measure_pair(out_dir, recipe, [p["prompt"] for p in prompts], bar))
        # The acceptance-length predictor of the `predictor` policy ships beside the target.
        from specpipe.predictor import train_predictor
        info["accept_predictor"] = train_predictor(
            out_dir / "target", out_dir / "draft", seed=seed, progress=False,
            max_positions=16384 if preset == "full" else 512)["metrics"]
    weights = [out_dir / name / "model.safetensors" for name in MODELS]
    info.update({
        "build_seconds": time.perf_counter() - start,
        "param_ratio": info["params_target"] / info["params_draft"],
        "num_prompts": len(prompts), "eval_new_tokens": recipe.eval_new_tokens,
        "draft_block": DRAFT_BLOCK, "timing_context": TIMING_CONTEXT, "timing_threads": 1,
        "build_threads": BUILD_THREADS, "vocab_size": recipe.vocab_size,
        "target_config": dataclasses.asdict(recipe.target),
        "draft_config": dataclasses.asdict(recipe.draft),
        "weights_sha256": {name: _sha256(path) for name, path in zip(MODELS, weights)},
        "weights_bytes": sum(path.stat().st_size for path in weights),
        "python_version": platform.python_version(), "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cpus"})
    (out_dir / "heldout.json").write_text(json.dumps(prompts, indent=1) + "\n")
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# --- where the pair lives -------------------------------------------------------------------

def _is_pair(folder: Path) -> bool:
    return all((folder / name / "model.safetensors").is_file() for name in MODELS)


def demo_pair_dir(build_if_missing: bool = True) -> Path:
    """Folder holding target/ and draft/: the shipped assets if present, else the user cache
    (~/.cache/specpipe/demo-<version>), building it there (with progress bar) if missing."""
    if _is_pair(DEMO_DIR):
        return DEMO_DIR
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cached = cache_root / "specpipe" / f"demo-{DEMO_VERSION}"
    if _is_pair(cached) and (cached / "build_info.json").is_file():
        return cached
    if not build_if_missing:
        raise FileNotFoundError(f"no demo pair in {DEMO_DIR} or {cached}; "
                                "build it with `specpipe build-demo`")
    cached.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the demo pair into %s (first use, a few minutes)", cached)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".building-") as scratch:
        build_demo_pair(Path(scratch) / "pair")
        if not _is_pair(cached):  # another process may have finished first
            os.replace(Path(scratch) / "pair", cached)
    return cached


def load_heldout_prompts() -> list[str]:
    """The held-out prompts the benchmark and the demo use (shipped with the package)."""
    return [entry["prompt"] for entry in json.loads(PROMPTS_PATH.read_text())]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m specpipe.demo_pair",
                                     description="Build the demo target/draft pair.")
    parser.add_argument("--out", type=Path, default=DEMO_DIR,
                        help="output folder (default: the package's shipped assets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    args = parser.parse_args(argv)
    info = build_demo_pair(args.out, seed=args.seed, preset=args.preset)
    if args.out.resolve() == DEMO_DIR and args.preset == "full":  # the shipped prompts too
        PROMPTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        PROMPTS_PATH.write_bytes((args.out / "heldout.json").read_bytes())
    for sample in info["samples"]:
        print(f"--- greedy sample from the target ---\n{sample}")
    print(f"target {info['params_target']:,} params, draft {info['params_draft']:,} "
          f"({info['param_ratio']:.1f}x smaller), weights {info['weights_bytes'] / 1e6:.1f} MB\n"
          f"c = t_draft_step / t_verify = {info['t_draft_step_ms']:.3f} ms / "
          f"{info['t_verify_ms']:.3f} ms = {info['c']:.3f} (one thread)\n"
          f"greedy acceptance rate {info['acceptance_rate']:.3f}, mean accepted length "
          f"{info['mean_accepted_len']:.2f} of {DRAFT_BLOCK} on {info['num_prompts']} prompts\n"
          f"built in {info['build_seconds']:.0f} s into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
