"""Checks the cross-process tests share (importable: `from checks import wait_idle`)."""

from __future__ import annotations

import re
import time
from pathlib import Path


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


# The start-up summary's line on the internal sockets (launch/endpoints.py: describe), e.g.
# `internal sockets: ipc in /tmp/specpipe-1-ab (mode 0700: this user only); TCP: target tcp://0.0.0.0:5; CURVE`.
INTERNAL_SOCKETS = re.compile(r"^internal sockets: (?:ipc in (\S+) \(mode 0700: this user only\)|none spawned)"
                              r"(?:; TCP: (.*?))?; (CURVE|no CURVE)$")


def internal_sockets(server) -> tuple[Path | None, dict[str, list[str]], bool]:
    """What a ServerProcess says of its internal sockets: (its private folder or None, {role:
    [its TCP endpoints]}, CURVE on)."""
    found = [match for line in server.summary if (match := INTERNAL_SOCKETS.match(line.strip()))]
    assert len(found) == 1, f"no (or several) internal-sockets lines in the summary: {server.summary}"
    folder, tcp, curve = found[0].groups()
    endpoints: dict[str, list[str]] = {}
    for item in (tcp.split(", ") if tcp else []):
        role, endpoint = item.split(" ", 1)
        endpoints.setdefault(role, []).append(endpoint)
    return (Path(folder) if folder else None), endpoints, curve == "CURVE"
