"""`specpipe generate` against a real server (the session's tiny-model server): it streams the
text and ends with the stats, and a request the server refuses ends with ONE line on stderr
carrying the status and the server's message, and a non-zero exit. The client's own mistakes and a
missing server are in tests/launch/test_cli_errors.py; TLS and token mismatches in
test_production.py (its server has both)."""

from __future__ import annotations

import subprocess
import sys

CLI_TIMEOUT_S = 120


def generate(addr: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specpipe.launch.cli", "generate", "--addr", addr, *flags],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def test_generate_streams_and_reports(serve):
    out = generate(serve("draft").addr, "def f(", "--max-new-tokens", "8", "--mode", "sequential")
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().startswith("[finish: ") and "8 tokens" in out.stderr


def test_a_refused_request_is_one_line_with_the_status_and_the_servers_message(serve):
    out = generate(serve("draft").addr, "def f(", "--max-new-tokens", "100000")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert lines[0].startswith("specpipe generate: error: INVALID_ARGUMENT from ")
    assert "max_new_tokens = 100000 exceeds the server's cap of 4096" in lines[0]
