"""The tools' training text: the running Python's standard-library source, and its tokenizer.

Contract. `stdlib_files()` lists the `.py` files (sorted, so every machine with the same Python
agrees) split into training files and the held-out modules (HELDOUT_MODULES), which never enter
training; `read_source` strips comments and docstrings; `extract_prompts` takes the held-out
prompts (the first 1-3 lines of functions and classes); `train_tokenizer` fits the byte-level BPE
the demo pair ships with; `encode_corpus` / `sample_corpus` turn texts into one token stream.
Knows nothing of models: it only reads files and tokenizes.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"
NUM_PROMPTS = 32  # held-out prompts shipped with the pair (what the benchmark and the demo run)
# Kept out of training; the prompts come from them. All exist in Python 3.10 to 3.14.
HELDOUT_MODULES = (
    "bisect.py",
    "colorsys.py",
    "fnmatch.py",
    "fractions.py",
    "graphlib.py",
    "heapq.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "textwrap.py",
)
# Not Python as people write it (tests, codec tables, doc dumps), or machine-specific.
SKIPPED_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "turtledemo",
    "__pycache__",
    "lib2to3",
}


def stdlib_files() -> tuple[Path, list[Path], list[Path]]:
    """(stdlib root, training files, held-out files), each sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if not (
            set(rel.parts[:-1]) & SKIPPED_DIRS
            or rel.parts[0].startswith("config-")
            or rel.name.startswith("_sysconfigdata")
        ):
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
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            dropped.update(range(body[0].lineno - 1, body[0].end_lineno))
            if len(body) == 1:
                lines[body[0].lineno - 1] = " " * body[0].col_offset + "pass"
                dropped.discard(body[0].lineno - 1)
    kept = [line for i, line in enumerate(lines) if i not in dropped and not line.lstrip().startswith("#")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(kept).strip("\n") + "\n")


def read_source(path: Path) -> str:
    """A file's code as the models train on it (strip_source)."""
    return strip_source(path.read_text(encoding="utf-8", errors="replace"))


def extract_prompts(root: Path, files: list[Path], count: int = NUM_PROMPTS) -> list[dict]:
    """The first 1-3 lines of functions and classes in `files`, `count` of them, evenly spaced."""
    candidates = []  # (file, name, first line, that file's lines)
    for path in files:
        source = read_source(path)
        nodes = [
            n
            for top in ast.parse(source).body
            for n in [top, *getattr(top, "body", [])]
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        candidates += [
            (path.relative_to(root).as_posix(), node.name, node.lineno, source.splitlines()) for node in nodes
        ]
    prompts = []
    for i in range(count):
        file, name, lineno, lines = candidates[int(i * len(candidates) / count)]
        chunk = lines[lineno - 1 : lineno + i % 3]  # 1, 2 or 3 lines
        chunk = chunk[: next((j for j, line in enumerate(chunk) if not line.strip()), len(chunk))]
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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=EOS_TOKEN,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream, [num_tokens]: every text followed by EOS."""
    ids = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts):
        ids += [*encoding.ids, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def sample_corpus(tokenizer, files: list[Path], num_files: int, seed: int) -> torch.Tensor:
    """[num_tokens]: a seeded sample of `files` (sorted paths), raw text (comments and docstrings
    kept), tokenized into one stream."""
    generator = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(files), generator=generator)[:num_files].tolist())
    texts = [files[i].read_text(encoding="utf-8", errors="replace") for i in chosen]
    return encode_corpus(tokenizer, texts)
