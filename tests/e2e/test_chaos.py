"""Failover under load (issue 22): workers lost while 8 clients stream, and a request that could
stall the coordinator.

Method: a real `specpipe serve` of its own per test (its workers get killed), 8 client threads
streaming greedy requests over prompts whose greedy references are known (Hugging Face), while
the main thread does the damage:
- the draft SIGKILLed (twice, waiting for its restart in between) and SIGSTOPped past the
  heartbeat timeout, then SIGCONTed: every request must end OK with exactly the reference output
  (in flight requests go on target-only), and the draft must be re-admitted;
- the target SIGKILLed: requests in flight end UNAVAILABLE (never INTERNAL, never a hang), the
  server serves again once the target is restarted, and GetStats never reports a down worker's
  old live requests;
- a 3 MB and a 3.9 MB prompt sent among the streams: refused INVALID_ARGUMENT at once, while no
  worker is marked down and every stream finishes OK.

The default run covers the default schedule (specbranch) on a pinned server (what `specpipe demo`
and the bench run); `-m slow` runs every speculative mode, pinned and unpinned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from specpipe import Client
from specpipe.launch.local import ServerProcess

from checks import paused, wait_for
from tiny import PROMPTS

CLIENTS = 8
MAX_NEW = 48
CHAOS_PROMPTS = [PROMPTS[0], PROMPTS[1], PROMPTS[3], [42, 42, 7, 99, 250], [3, 1, 4, 1, 5, 9, 2, 6]]
PINNED = ["--target-cpus", "0", "--draft-cpus", "1", "--coordinator-cpus", "1"]
UNPINNED = ["--pin", "none"]  # serve pins by default (--pin auto): unpinned must say so
# A restarted worker imports torch and loads its model again: seconds when the machine is idle,
# much longer on a loaded 2-core box.
RESTART_S = 90
HEARTBEAT_TIMEOUT_S = 1.5  # the coordinator's default
CALL_TIMEOUT_S = 120  # no request may hang: one that takes this long fails the test

FULL_MATRIX = [
    pytest.param(
        mode, pin, marks=() if (mode, pin) == ("specbranch", "pinned") else pytest.mark.slow, id=f"{mode}-{pin}"
    )
    for mode in ("sequential", "pipelined", "specbranch")
    for pin in ("pinned", "unpinned")
]


@dataclass
class Outcomes:
    """What the client threads saw, per status code; greedy mismatches listed apart."""

    codes: dict[str, int] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    max_gap_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, code: str) -> None:
        with self.lock:
            self.codes[code] = self.codes.get(code, 0) + 1


def stream_until(
    stop: threading.Event, client: Client, mode: str, references: dict, outcomes: Outcomes, index: int
) -> None:
    """One client: requests back to back until `stop`, each checked against its reference."""
    turn = index
    while not stop.is_set():
        prompt_ids = CHAOS_PROMPTS[turn % len(CHAOS_PROMPTS)]
        turn += 1
        tokens, last_at = [], time.monotonic()
        try:
            for chunk in client.generate(
                prompt_ids=prompt_ids, max_new_tokens=MAX_NEW, mode=mode, timeout=CALL_TIMEOUT_S
            ):
                tokens += chunk.token_ids
                now = time.monotonic()
                with outcomes.lock:
                    outcomes.max_gap_s = max(outcomes.max_gap_s, now - last_at)
                last_at = now
        except grpc.RpcError as err:
            outcomes.add(err.code().name)
            time.sleep(0.05)  # as a client backs off; keeps the counts readable
            continue
        outcomes.add("OK")
        if tokens != references[tuple(prompt_ids)]:
            with outcomes.lock:
                outcomes.mismatches.append(f"{prompt_ids}: {tokens}")


class Load:
    """CLIENTS threads streaming against `addr` until stopped."""

    def __init__(self, addr: str, mode: str, references: dict):
        self.stop, self.outcomes = threading.Event(), Outcomes()
        self.clients = [Client(addr) for _ in range(CLIENTS)]
        self.threads = [
            threading.Thread(
                target=stream_until, daemon=True, args=(self.stop, client, mode, references, self.outcomes, index)
            )
            for index, client in enumerate(self.clients)
        ]
        for thread in self.threads:
            thread.start()

    def finish(self) -> Outcomes:
        self.stop.set()
        for thread in self.threads:
            thread.join(CALL_TIMEOUT_S + 10)
            assert not thread.is_alive(), "a client hung"
        for client in self.clients:
            client.close()
        return self.outcomes


def references_for(hf_greedy) -> dict:
    return {tuple(p): hf_greedy(p, MAX_NEW) for p in CHAOS_PROMPTS}


def worker(client: Client, role: str):
    return next(w for w in client.stats().workers if w.role == role)


def wait_completed(outcomes: Outcomes, more: int, timeout: float = 60) -> None:
    """Let `more` further requests finish (so the damage lands on running requests)."""
    done = sum(outcomes.codes.values())
    wait_for(lambda: sum(outcomes.codes.values()) >= done + more, timeout, f"{more} more requests")


def start_server(tiny_models, pin: str, log_path) -> ServerProcess:
    server = ServerProcess(
        [
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(tiny_models["draft_close"]),
            *(PINNED if pin == "pinned" else UNPINNED),
        ],
        stderr=open(log_path, "w"),
        log_level="INFO",
    )
    server.log_path = log_path
    return server


@pytest.fixture(scope="module")
def pinned_server(tiny_models, tmp_path_factory):
    """One pinned server for the default tests (each start costs seconds of the suite's budget):
    every test leaves it whole, its workers restarted or re-admitted."""
    with start_server(tiny_models, "pinned", tmp_path_factory.mktemp("chaos") / "server.log") as server:
        yield server


@contextlib.contextmanager
def server_for(request, tiny_models, pin: str, tmp_path):
    """The module's pinned server once whole (its log read from `log_from`), else a server of
    this test's own."""
    if pin == "pinned":
        server = request.getfixturevalue("pinned_server")
        wait_for(lambda: Client(server.addr).stats().status == "ok", RESTART_S, "the shared server whole")
        server.log_from = server.log_path.stat().st_size
        yield server
    else:
        with start_server(tiny_models, pin, tmp_path / "server.log") as server:
            server.log_from = 0
            yield server


def log_since(server) -> str:
    """What the server logged since this test began with it."""
    with open(server.log_path, errors="replace") as log:
        log.seek(server.log_from)
        return log.read()


@pytest.mark.parametrize("mode, pin", FULL_MATRIX)
def test_draft_killed_and_hung_under_load_costs_no_request(request, tiny_models, hf_greedy, tmp_path, mode, pin):
    references = references_for(hf_greedy)
    with server_for(request, tiny_models, pin, tmp_path) as server:
        control = Client(server.addr)
        load = Load(server.addr, mode, references)
        try:
            for _ in range(2):  # killed, restarted, killed again
                wait_completed(load.outcomes, CLIENTS)
                os.kill(worker(control, "draft").pid, signal.SIGKILL)
                wait_for(
                    lambda: control.stats().status == "degraded: draft unavailable", 10, "the draft to be marked down"
                )
                wait_for(lambda: control.stats().status == "ok", RESTART_S, "the restarted draft")
            wait_completed(load.outcomes, CLIENTS)
            hung = worker(control, "draft").pid
            with paused(hung):  # hung past the heartbeat timeout
                wait_for(lambda: not worker(control, "draft").healthy, 10, "the hung draft to be marked down")
                assert worker(control, "draft").live_requests == 0, "a down worker's old count reads as live"
                wait_completed(load.outcomes, CLIENTS)  # served target-only meanwhile
            wait_for(lambda: control.stats().status == "ok", 30, "the draft to be re-admitted after SIGCONT")
            wait_completed(load.outcomes, CLIENTS)
        finally:
            outcomes = load.finish()
        print(f"\n[chaos] draft lost, {mode}, {pin}: {outcomes.codes}")
        assert outcomes.codes.keys() == {"OK"}, outcomes.codes
        assert not outcomes.mismatches, outcomes.mismatches[:3]
        token_ids, _, last = control.complete(prompt_ids=PROMPTS[0], max_new_tokens=MAX_NEW, mode=mode)
        assert token_ids == references[tuple(PROMPTS[0])] and last.stats.draft_tokens > 0, "speculating again"


@pytest.mark.parametrize("pin", ["pinned", pytest.param("unpinned", marks=pytest.mark.slow)])
def test_target_killed_under_load_fails_running_requests_unavailable_then_serves(
    request, tiny_models, hf_greedy, tmp_path, pin
):
    references = references_for(hf_greedy)
    with server_for(request, tiny_models, pin, tmp_path) as server:
        control = Client(server.addr)
        load = Load(server.addr, "specbranch", references)
        try:
            wait_completed(load.outcomes, CLIENTS)
            os.kill(worker(control, "target").pid, signal.SIGKILL)
            wait_for(lambda: control.stats().status == "unavailable: target down", 10, "the target marked down")
            target = worker(control, "target")
            assert (target.healthy, target.live_requests, target.live_branches) == (False, 0, 0), target
            wait_for(lambda: control.stats().status == "ok", RESTART_S, "the restarted target")
            wait_completed(load.outcomes, CLIENTS)
        finally:
            outcomes = load.finish()
        print(f"\n[chaos] target lost, {pin}: {outcomes.codes}")
        assert set(outcomes.codes) <= {"OK", "UNAVAILABLE"} and outcomes.codes.get("UNAVAILABLE"), outcomes.codes
        assert not outcomes.mismatches, outcomes.mismatches[:3]
        assert "restart of the target worker failed" not in log_since(server)


def test_huge_prompts_are_refused_at_once_without_stalling_other_streams(request, tiny_models, hf_greedy, tmp_path):
    references = references_for(hf_greedy)
    with server_for(request, tiny_models, "pinned", tmp_path) as server:
        control = Client(server.addr)
        load = Load(server.addr, "specbranch", references)
        try:
            wait_completed(load.outcomes, CLIENTS)
            for size in (3_000_000, 3_900_000):
                began = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    control.complete("x = 1\n" * (size // 6), max_new_tokens=8)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "prompt has" in err.value.details() and "characters" in err.value.details()
                print(f"\n[chaos] {size / 1e6:.1f} MB prompt refused in {time.monotonic() - began:.3f} s")
            wait_completed(load.outcomes, CLIENTS)
        finally:
            outcomes = load.finish()
        assert outcomes.codes.keys() == {"OK"}, outcomes.codes
        assert not outcomes.mismatches, outcomes.mismatches[:3]
        stats = control.stats()
        assert stats.status == "ok" and all(w.healthy for w in stats.workers)
        assert "marked down" not in log_since(server), "the coordinator blamed its own stall on a worker"
        # A stall of the coordinator's loop shows as a gap in every stream; a few verifies' worth is
        # normal under 8 clients on 2 cores. Reported; bounded well under the heartbeat timeout.
        print(f"[chaos] longest gap between chunks of the other streams: {outcomes.max_gap_s:.3f} s")
        assert outcomes.max_gap_s < HEARTBEAT_TIMEOUT_S
