"""The per-block trace: a developer's record of where a request's time goes, off by default.

With `SPECPIPE_TRACE_DIR=DIR` in the environment of `specpipe serve` (its workers inherit it),
each process appends one line per event to its own file `DIR/<role>-<pid>.trace`:
`<time.monotonic()> <event> <fields...>`. One host's processes share the monotonic clock, so the
files merge into one timeline (`python -m specpipe.tools.trace_report DIR` summarises it).

Events: every worker logs each command it takes (`cmd KIND`), each iteration's compute (`stepb`
/ `stepe ITEMS FED_TOKENS`) and the start of each wait with nothing to compute (`wait`); the
coordinator logs each block it sends (`send`), each verdict (`verdict`), each draft step it reads
(`dtoks`), each resync of the main line (`sync`), each prepared block a verdict armed (`arm`),
each rejection no prepared branch foresaw (`unforeseen`) and when it expects the forward holding
a main-line block to end (`due REQUEST BLOCK TIME`: as the block is sent, and again as the forward
before it ends). Without the variable every call is a no-op (one attribute test): the trace costs
the serving path nothing unless asked for.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TRACE_DIR_ENV = "SPECPIPE_TRACE_DIR"


class Tracer:
    def __init__(self):
        self.file = None

    def open(self, role: str, folder: str | None = None) -> None:
        """Start writing `<folder>/<role>-<pid>.trace` (folder: the environment's, if set)."""
        folder = folder or os.environ.get(TRACE_DIR_ENV)
        if folder and self.file is None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(folder) / f"{role}-{os.getpid()}.trace", "a", buffering=1)

    @property
    def on(self) -> bool:
        """Tracing: worth building a costly field only then."""
        return self.file is not None

    def __call__(self, event: str, *fields) -> None:
        if self.file is not None:
            self.file.write(f"{time.monotonic():.6f} {event} {' '.join(map(str, fields))}\n")


trace = Tracer()
