"""The demo pair's files: where the shipped pair and its held-out prompts live, what a pair's
folder holds, and the recipe version that names the user cache.

A leaf: it imports nothing of the project, so that both the runtime (specpipe/demo_pair.py,
which finds the pair) and the offline build (specpipe/tools/build_demo.py, which writes it) can
read it without importing each other. Knows nothing of how a pair is trained or served.
"""

from __future__ import annotations

from pathlib import Path

DEMO_VERSION = "2"  # bump when the recipe changes: names the user-cache folder
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"  # the shipped pair
PROMPTS_PATH = Path(__file__).resolve().parent / "assets" / "prompts" / "heldout.json"  # its held-out prompts
MODELS = ("target", "draft")  # a pair's folder holds one model folder of each name


def is_pair(folder: Path) -> bool:
    """Whether `folder` holds both models' weights."""
    return all((folder / name / "model.safetensors").is_file() for name in MODELS)
