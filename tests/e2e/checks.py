"""Checks the cross-process tests share (importable: `from checks import wait_idle`)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from specpipe.proto.specpipe.worker.v1 import worker_pb2

# The least gap between the target's best and second-best logit at every step of a greedy
# reference. Speculative decoding computes the same positions in forwards of other shapes (a block
# of k tokens, a padded batch), whose float32 rounding differs from one CPU to another (Intel or
# AMD, with or without AVX-512) by ~1e-5 on these logits; a greedy-equality test is only a test of
# the system, not of rounding luck, where every step's argmax wins by far more than that.
GREEDY_MARGIN = 1e-3


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The model's own greedy tokens (through EOS), on the model's device. Fails, naming the step,
    if any step's top-2 logit gap is under GREEDY_MARGIN: such a prompt would make the comparison
    depend on the device's rounding (pick another prompt)."""
    import torch

    eos, device = model.config.eos_token_id, model.device
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids], device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
            pad_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
    for step, logits in enumerate(out.logits[: len(tokens)]):
        best, second = torch.topk(logits[0].double(), 2).values.tolist()
        assert best - second >= GREEDY_MARGIN, (
            f"prompt {prompt_ids}: greedy step {step} wins by {best - second:.2e} < {GREEDY_MARGIN:g}; "
            f"its argmax depends on float rounding: choose another prompt"
        )
    return tokens


# How long a server may take to free a finished, cancelled or failed request on both workers. It
# is done at once (the release goes out as the request ends, the next heartbeat reports it); the
# bound is for a loaded 2-core box, and a wait returns as soon as the server is idle.
FREED_S = 10.0


def is_idle(stats) -> bool:
    """No live request on the server and no request or branch held by either worker."""
    return stats.live_requests == 0 and all(w.live_requests == 0 and w.live_branches == 0 for w in stats.workers)


def wait_idle(client, timeout: float = FREED_S):
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


@contextlib.contextmanager
def paused(pid: int):
    """Process `pid` SIGSTOPped for the block (SIGCONT after it, whatever happens). A worker paused
    well under the coordinator's 1.5 s heartbeat timeout stays admitted, and no request it serves
    can finish meanwhile, however fast the machine: what a test needs to act while a request is
    surely still running. Paused past the timeout, it is a hung worker."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def worker(stats, role: str):
    """The WorkerStats of `role` ("draft" / "target") in a StatsResponse."""
    return next(w for w in stats.workers if w.role == role)


def listening_endpoints(pid: int) -> set[str]:
    """The TCP endpoints (`tcp://HOST:PORT`) process `pid` listens on: a worker's control socket,
    and the target's data-plane socket."""
    return {
        f"tcp://{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a server's metrics endpoint."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# The text log format of `specpipe serve` (launch/cli.py): "2025-01-02 03:04:05,678 LEVEL ...".
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_lines(path: Path, needle: str) -> list[str]:
    """The lines of a server's log that contain `needle`."""
    return [line for line in Path(path).read_text(errors="replace").splitlines() if needle in line]


def log_time(line: str) -> float:
    """The time stamp of a text log line, in seconds (for differences between two lines)."""
    match = LOG_TIME.match(line)
    assert match, f"no time stamp on the log line {line!r}"
    return time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000


def draft_probs(shape: list[int], frames: list[bytes], frame: int = 0) -> list[bytes]:
    """A DraftProbs message for the target's data plane (ZeroMQ parts): one key, of no request;
    a float32 q header of `shape` naming tensor frame `frame`; then `frames`."""
    message = worker_pb2.DraftProbs(
        handles=[10**9],
        branch_ids=[0],
        epochs=[1],
        positions=[3],
        probs=worker_pb2.Tensor(dtype="float32", shape=shape, frame=frame),
    )
    return [message.SerializeToString(), *frames]


# The start-up summary's line on the internal sockets (launch/endpoints.py: describe), e.g.
# `internal sockets: ipc in /tmp/specpipe-1-ab (mode 0700: this user only); TCP: target tcp://0.0.0.0:5; CURVE`.
INTERNAL_SOCKETS = re.compile(
    r"^internal sockets: (?:ipc in (\S+) \(mode 0700: this user only\)|none spawned)"
    r"(?:; TCP: (.*?))?; (CURVE|no CURVE)$"
)


def internal_sockets(server) -> tuple[Path | None, dict[str, list[str]], bool]:
    """What a ServerProcess says of its internal sockets: (its private folder or None, {role:
    [its TCP endpoints]}, CURVE on)."""
    found = [match for line in server.summary if (match := INTERNAL_SOCKETS.match(line.strip()))]
    assert len(found) == 1, f"no (or several) internal-sockets lines in the summary: {server.summary}"
    folder, tcp, curve = found[0].groups()
    endpoints: dict[str, list[str]] = {}
    for item in tcp.split(", ") if tcp else []:
        role, endpoint = item.split(" ", 1)
        endpoints.setdefault(role, []).append(endpoint)
    return (Path(folder) if folder else None), endpoints, curve == "CURVE"


# `specpipe serve`'s own defaults (launch/serve_flags.py): a test that names one gets the server started
# without it, so tests that differ only in saying a default share one server (each start costs
# seconds of the suite's budget). test_serving.py::test_serve_defaults_are_what_the_tests_assume checks them.
SERVE_DEFAULTS = {"--policy": "adaptive", "--num-draft-tokens": "8", "--transport": "zmq"}


def without_defaults(flags: tuple[str, ...]) -> tuple[str, ...]:
    """`flags` less every `FLAG VALUE` pair that says a default of SERVE_DEFAULTS."""
    out, i = [], 0
    while i < len(flags):
        if i + 1 < len(flags) and SERVE_DEFAULTS.get(flags[i]) == flags[i + 1]:
            i += 2
            continue
        out.append(flags[i])
        i += 1
    return tuple(out)
