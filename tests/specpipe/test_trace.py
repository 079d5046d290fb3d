"""The per-block trace (specpipe/trace.py) and its report (specpipe/tools/trace_report.py).

Method: the tracer is exercised off (no folder: writes nothing) and on (one line per event); the
report runs over a hand-written trace of three processes whose every gap and hop is known, so
each figure it prints is checked exactly (times in whole milliseconds: no rounding to depend on).
"""

from __future__ import annotations

import os

import pytest

from specpipe.tools import trace_report
from specpipe.trace import TRACE_DIR_ENV, Tracer


def test_off_without_a_folder_and_one_line_per_event_with_one(tmp_path, monkeypatch):
    monkeypatch.delenv(TRACE_DIR_ENV, raising=False)
    tracer = Tracer()
    tracer.open("draft")
    tracer("stepb")  # off: nothing to write to, no error
    assert tracer.file is None
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path / "trace"))
    tracer.open("draft")
    tracer("stepe", 3, 7)
    tracer("cmd", "sync")
    lines = (tmp_path / "trace" / f"draft-{os.getpid()}.trace").read_text().splitlines()
    assert [line.split()[1:] for line in lines] == [["stepe", "3", "7"], ["cmd", "sync"]]
    assert float(lines[0].split()[0]) <= float(lines[1].split()[0])  # monotonic seconds


# One request. Target forwards (ms): 0-10, 11-21 (its block was queued: no wait, though a command
# came in the gap), 24-34 (it waited 3 ms for a block), 41-51 (a rejection nothing foresaw: 7 ms),
# 60-70 (a new request's prefill: 9 ms).
TARGET = """
0.000 stepb
0.010 stepe 1 4
0.0105 cmd verify
0.011 stepb
0.021 stepe 1 5
0.0215 wait
0.022 cmd verify
0.024 stepb
0.034 stepe 1 3
0.035 stepb
0.035 stepe 1 0
0.0355 wait
0.040 cmd verify
0.041 stepb
0.051 stepe 1 2
0.052 wait
0.055 cmd prefill
0.060 stepb
0.070 stepe 1 9
"""
COORDINATOR = """
0.0345 verdict r 3 0 1
0.0350 sync r 2
0.0350 unforeseen r 0
0.0380 dtoks r 0:2:30
0.0390 dtoks r 0:2:31
0.0395 send r 5 30 2 0
"""
DRAFT = """
0.0100 stepb
0.0105 stepe 2 0
0.0360 cmd sync
0.0362 stepb
0.0370 stepe 1 1
0.0400 stepb
0.0415 stepe 2 2
"""


def test_the_report_finds_every_gap_s_cause_and_every_hop(tmp_path):
    for name, body in (("target-1", TARGET), ("coordinator-2", COORDINATOR), ("draft-3", DRAFT)):
        (tmp_path / f"{name}.trace").write_text(body.lstrip())
    result = trace_report.report(tmp_path)
    assert [round(s * 1e3) for s in result.steps["target"]] == [10, 10, 10, 10, 10]
    assert [round(s * 1e4) for s in result.steps["draft"]] == [8, 15]  # (one without a forward left out)
    assert {rows: [round(s * 1e4) for s in v] for rows, v in result.draft_rows.items()} == {1: [8], 2: [15]}
    gaps = {cause: [round(s * 1e3) for s in seconds] for cause, seconds in result.gaps.items()}
    assert gaps == {
        "no wait": [1],
        "waited for a block": [3],
        "unforeseen rejection": [7],
        "new request": [9],
    }
    assert result.target_busy == pytest.approx(50 / (70 - 9))
    hops = {hop: [round(s * 1e4) for s in seconds] for hop, seconds in result.rejection_hops.items()}
    assert hops == {  # (tenths of a millisecond)
        "verdict to the coordinator": [5],
        "the coordinator's turn": [5],
        "the resync to the draft": [10],
        "the draft's first token": [20],
        "the rest of the block": [15],
        "the block to the target": [5],
        "the target's turn": [10],
        "total": [70],
    }
    text = trace_report.text(result)
    assert "  2 row(s): 1, median   1.500 ms" in text
    assert "target busy: 82.0%" in text and "idle, unforeseen rejection: 1 gaps" in text


# Four waits for a block (target forwards, ms: 0-10, 12-22, 25-35, 40-50, 51-61), each after
# another verdict: block 1 (4 tokens) accepted whole, block 2 (4) rejected at its second token with
# no resync (a fork held the token), prepared block 3 (2) rejected at its first, then none.
WAITS_TARGET = """
0.000 stepb
0.010 stepe 1 4
0.0101 wait
0.0115 cmd verify
0.012 stepb
0.022 stepe 1 5
0.0221 wait
0.0245 cmd verify
0.025 stepb
0.035 stepe 1 3
0.0351 wait
0.0395 cmd verify
0.040 stepb
0.050 stepe 1 3
0.0501 wait
0.0505 cmd verify
0.051 stepb
0.061 stepe 1 2
"""
WAITS_COORDINATOR = """
0.001 send r 1 10 4 0
0.0103 verdict r 1 0 4
0.011 send r 2 15 4 0
0.0223 verdict r 2 0 1
0.024 send r 3 17 2 1
0.0353 verdict r 3 0 0
0.039 send r 4 18 3 0
"""


def test_the_report_sorts_the_waits_for_a_block_by_the_verdict_before(tmp_path):
    (tmp_path / "target-1.trace").write_text(WAITS_TARGET.lstrip())
    (tmp_path / "coordinator-2.trace").write_text(WAITS_COORDINATOR.lstrip())
    result = trace_report.report(tmp_path)
    assert {cause: [round(s * 1e3) for s in v] for cause, v in result.gaps.items()} == {
        "waited for a block": [2, 3, 5, 1]
    }
    assert {kind: [round(s * 1e3) for s in v] for kind, v in result.waits.items()} == {
        "after a full acceptance": [2],
        "after a rejection a fork held": [3],
        "after a rejection in a prepared block": [5],
        "no verdict read meanwhile": [1],
    }
    assert "    after a rejection in a prepared block: 1, median   5.000 ms" in trace_report.text(result)


# Two requests' blocks as the coordinator sent them (send: id, start, tokens, conditional; verdict:
# id, stale, accepted), one of each context.
BLOCKS = """
0.001 send a 1 10 2 0
0.002 send a 2 12 6 0
0.003 send a 3 15 3 1
0.010 verdict a 1 0 2
0.020 verdict a 2 0 3
0.030 verdict a 3 0 3
0.031 send a 4 19 5 0
0.040 verdict a 4 0 1
0.041 sync a 3
0.041 unforeseen a 0
0.045 send a 5 21 2 0
0.046 send a 6 23 4 0
0.050 verdict a 5 0 1
0.051 verdict a 6 1 0
0.052 send a 7 23 3 0
0.053 send b 1 5 2 0
0.055 verdict b 1 0 2
0.060 send b 2 7 4 0
0.061 send b 3 9 3 1
0.070 verdict b 2 0 1
0.070 arm b 3
0.071 send b 4 12 5 0
0.080 verdict b 3 0 3
0.090 verdict b 4 0 5
"""


def test_the_report_sorts_the_main_lines_blocks_by_what_came_before(tmp_path):
    (tmp_path / "coordinator-1.trace").write_text(BLOCKS.lstrip())
    result = trace_report.report(tmp_path)
    assert result.main_blocks == {
        "at the request's start": [(2, 2), (2, 2)],
        # (a's second answered stale; b's block 4 went behind b's prepared block 3, armed by b 2's verdict)
        "behind a block in flight": [(6, 3), (4, None), (5, 5)],
        "after a prepared hit": [(5, 1)],  # (block 3, conditional, verified: not a main-line block)
        "after an unforeseen rejection": [(2, 1)],
        "after a verdict": [(3, None), (4, 1)],
    }
    text = trace_report.text(result)
    assert "  behind a block in flight: 3 blocks, mean 5.00 tokens, accepted 4.00 (4: 1, 5: 1, 6: 1)" in text
    assert "  after a verdict: 2 blocks, mean 3.50 tokens, accepted 1.00 (3: 1, 4: 1)" in text


# A draft step whose tokens the coordinator dropped (its request ended), then a new request: two
# steps read at once (a late coordinator), one on time. The target: two forwards, each block's
# verdict after it; the coordinator expected the first to end 1 ms later than it did, the second
# 2 ms earlier; the stale verdict is not a forward's.
LAGS_DRAFT = """
0.0000 stepe 1 1
0.0100 cmd prefill
0.0110 stepe 1 1
0.0120 stepe 1 1
0.0140 stepe 1 1
"""
LAGS_TARGET = """
0.0200 stepb
0.0300 stepe 1 5
0.0310 stepb
0.0400 stepe 1 5
"""
LAGS_COORDINATOR = """
0.0130 dtoks r 0:1:5
0.0131 dtoks r 0:1:6
0.0143 dtoks r 0:1:7
0.0150 due r 1 0.031000
0.0302 verdict r 1 0 4
0.0303 due r 2 0.038000
0.0304 verdict r 9 1 0
0.0407 verdict r 2 0 4
"""


def test_the_report_measures_the_messages_way_and_the_cut_clocks_error(tmp_path):
    for name, body in (("draft-1", LAGS_DRAFT), ("target-2", LAGS_TARGET), ("coordinator-3", LAGS_COORDINATOR)):
        (tmp_path / f"{name}.trace").write_text(body.lstrip())
    result = trace_report.report(tmp_path)
    lags = {message: [round(s * 1e4) for s in seconds] for message, seconds in result.lags.items()}
    assert lags == {  # (tenths of a millisecond)
        "a draft step to the coordinator": [20, 11, 3],
        "a verdict to the coordinator": [2, 7],
    }
    assert [round(s * 1e3) for s in result.due_errors] == [1, -2]
    text = trace_report.text(result)
    assert (
        "a draft step to the coordinator: 3 messages, p10 0.30, p50 1.10, p90 2.00, p99 2.00 ms; over 1 ms: 66.7%"
        in text
    )
    assert "(the cut's clock): 2 blocks, p10 -2.00, p50 1.00" in text


def test_a_block_reported_at_its_end_is_timed_from_its_last_step(tmp_path):
    """The sequential schedule's draft reports a block once, at its end (Draft.report_when_done):
    its `dtoks` stands for the block's steps, and the lag is the last one's."""
    draft = "0.0000 cmd prefill\n0.0010 stepe 1 1\n0.0020 stepe 1 1\n0.0030 stepe 1 1\n0.0050 stepe 1 1\n"
    coordinator = "0.0032 dtoks r 0:1:5,0:1:6,0:1:7\n0.0051 dtoks r 0:1:8\n"
    for name, body in (("draft-1", draft), ("coordinator-2", coordinator)):
        (tmp_path / f"{name}.trace").write_text(body)
    lags = trace_report.report(tmp_path).lags
    assert [round(s * 1e4) for s in lags["a draft step to the coordinator"]] == [2, 1]


class Idle:
    """A worker engine with nothing to compute (the loop's Engine protocol): the loop only waits
    and answers commands."""

    def handle(self, command, frames) -> None:
        pass

    def poll(self) -> None:
        pass

    def ready(self) -> bool:
        return False

    def waiting(self) -> bool:
        return False

    def fill_pong(self, pong) -> None:
        pass

    def sockets(self) -> list:
        return []


def test_a_command_already_there_is_not_traced_as_a_wait(tmp_path):
    """A worker with nothing to compute logs `wait` when it starts waiting for a command; a command
    that came while it computed is there already, and reading it is no wait (the report would
    count the gap before the next forward as waited for)."""
    import zmq

    from specpipe import wire
    from specpipe.proto.specpipe.worker.v1 import worker_pb2
    from specpipe.trace import trace
    from specpipe.worker_loop import WorkerLoop

    context = zmq.Context()
    asked = []
    loop = WorkerLoop(
        Idle(), "target", "tcp://127.0.0.1:0", context, should_stop=lambda: asked.append(1) or len(asked) > 2
    )
    client = context.socket(zmq.DEALER)
    try:
        client.connect(loop.endpoint)
        client.send_multipart(wire.encode(worker_pb2.Command(ping=worker_pb2.Ping(nonce=1)), []))
        assert loop.socket.poll(5000), "the ping reached the worker's socket"
        trace.open("target", str(tmp_path))
        loop.run()  # takes the ping, then waits until asked to stop
        assert client.poll(5000) and wire.decode(worker_pb2.Reply, client.recv_multipart())[0].pong.nonce == 1
    finally:
        if trace.file is not None:
            trace.file.close()
            trace.file = None
        client.close(0)
        context.term()
    events = [line.split()[1:] for line in (tmp_path / f"target-{os.getpid()}.trace").read_text().splitlines()]
    assert events == [["cmd", "ping"], ["wait"]]
