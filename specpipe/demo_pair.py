"""Where the demo model pair lives: what the runtime needs of it, and nothing more.

Contract (DESIGN §4). `demo_pair_dir()` returns the folder holding `target/` and `draft/`: the
shipped pair (specpipe/assets/demo) when present, else the user cache
(~/.cache/specpipe/demo-<DEMO_VERSION>), building it there on first use (the one place the
runtime reaches the offline tools, lazily: specpipe/tools/build_demo.py has the recipe).
`load_heldout_prompts()` returns the shipped held-out prompts the benchmark and the demo run.
The files' layout is specpipe/demo_files.py's. Cheap to import (no torch): the CLI and the
launchers import it before anything heavy. This module knows nothing of how the pair is trained,
nor of workers or sockets.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from specpipe import demo_files
from specpipe.demo_files import is_pair

log = logging.getLogger(__name__)


def demo_pair_dir(build_if_missing: bool = True) -> Path:
    """Folder holding target/ and draft/: the shipped assets if present, else the user cache
    (~/.cache/specpipe/demo-<version>), building it there (with progress bar) if missing."""
    if is_pair(demo_files.DEMO_DIR):
        return demo_files.DEMO_DIR
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cached = cache_root / "specpipe" / f"demo-{demo_files.DEMO_VERSION}"
    if is_pair(cached) and (cached / "build_info.json").is_file():
        return cached
    if not build_if_missing:
        raise FileNotFoundError(
            f"no demo pair in {demo_files.DEMO_DIR} or {cached}; build it with `specpipe build-demo`"
        )
    from specpipe.tools import build_demo  # offline tooling, only for this first-use build

    cached.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the demo pair into %s (first use, a few minutes)", cached)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".building-") as scratch:
        build_demo.build_demo_pair(Path(scratch) / "pair")
        if not is_pair(cached):  # another process may have finished first
            os.replace(Path(scratch) / "pair", cached)
    return cached


def load_heldout_prompts() -> list[str]:
    """The held-out prompts the benchmark and the demo use (shipped with the package)."""
    return [entry["prompt"] for entry in json.loads(demo_files.PROMPTS_PATH.read_text())]
