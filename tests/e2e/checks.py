"""Checks the cross-process tests share (importable: `from checks import wait_idle`)."""

from __future__ import annotations

import time


def is_idle(stats) -> bool:
    """No live request on the server and no request or branch held by either worker."""
    return stats.live_requests == 0 and all(w.live_requests == 0 and w.live_branches == 0 for w in stats.workers)


def wait_idle(client, timeout: float = 2.0):
    """Poll GetStats until the server is idle or `timeout` passes: (idle, last stats)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if is_idle(stats) or time.monotonic() > deadline:
            return is_idle(stats), stats
        time.sleep(0.05)


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something true (returned) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
