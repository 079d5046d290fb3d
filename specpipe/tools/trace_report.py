"""Where the time goes, from a per-block trace (specpipe/trace.py): `python -m
specpipe.tools.trace_report DIR` after serving requests with `SPECPIPE_TRACE_DIR=DIR`.

It merges the processes' files into one timeline and prints each worker's step costs, the target's
busy share, its idle gaps between forwards by cause, the hops of the wait after a rejection no
prepared branch foresaw (the resync's way to the draft, the draft's redrafting, the new block's
way to the target), and the main line's blocks by what came before each (how long they were cut,
how much of them was accepted: where tokens per verification are lost). The workers' events carry
no request id: read the hops and the blocks with one request in flight at a time (the
benchmark's single-client runs); the gaps' causes hold for any load.

How late the workers' messages reach the coordinator: from the end of each draft step to the
coordinator's `dtoks` of it (in order; the steps before a request's prefill reached the draft that
never came, the last request's, are dropped), and from the end of each target forward to the first
`verdict` after it (before the next forward ended). And how well the coordinator's clock foresaw
the target (`due`: when it expected the forward holding a block to end, set as the block is sent
and again when the forward before it ends): the expected end less the end of the forward that
verified the block (positive: it ended earlier than expected, a block cut just in time came late).

Gap causes, between the end of one target forward and the start of the next: `no wait` (the
target had its next work queued: the gap is its loop's own turn, sending the verdicts and reading
commands), else it waited for a command: `new request` (a prefill reached it meanwhile: a client's
own pause), `unforeseen rejection` (the coordinator saw one meanwhile), `waited for a block`. The
waits for a block go by the last verdict the coordinator read meanwhile: `after a full acceptance`
(the next block, cut just in time, came late), `after a rejection a fork held` (its block was not
queued yet), `after a rejection in a prepared block` (the block a fork's outcome queued was
verified and rejected, with nothing queued behind it), or `no verdict read meanwhile`.

Block contexts, per request, from the coordinator's `send`, `verdict`, `unforeseen` and `arm` events:
`at the request's start` (its first block), `behind a block in flight` (cut while the target
verified the one before, a main-line block or a prepared one a verdict armed: just in time, or
full), else sent to a target done with this request's blocks:
`after an unforeseen rejection`, `after a prepared hit` (a block queued for the outcome the last
verdict reached was verified) or `after a verdict`. Prepared (conditional) blocks are not counted:
the one verified joins the main line's verdicts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Event:
    time: float
    role: str
    kind: str
    fields: list[str]


@dataclass
class Report:
    steps: dict[str, list[float]] = field(default_factory=dict)  # role -> compute step seconds
    draft_rows: dict[int, list[float]] = field(default_factory=dict)  # branches advanced -> step seconds
    target_busy: float = 0.0  # share of the span from the first target forward to the last
    gaps: dict[str, list[float]] = field(default_factory=dict)  # cause -> target idle seconds
    waits: dict[str, list[float]] = field(default_factory=dict)  # a wait for a block: by the verdict before
    rejection_hops: dict[str, list[float]] = field(default_factory=dict)  # hop -> seconds
    # context -> (tokens, accepted or None while stale / unanswered) of each main-line block
    main_blocks: dict[str, list[tuple[int, int | None]]] = field(default_factory=dict)
    lags: dict[str, list[float]] = field(default_factory=dict)  # message -> seconds to the coordinator
    due_errors: list[float] = field(default_factory=list)  # expected less actual end of a block's forward


def read_events(folder: Path) -> list[Event]:
    """Every event of every `<role>-<pid>.trace` in `folder`, in time order."""
    events = []
    for path in sorted(folder.glob("*.trace")):
        role = path.stem.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                events.append(Event(float(parts[0]), role, parts[1], parts[2:]))
    events.sort(key=lambda e: e.time)
    return events


def forward_steps(events: list[Event], role: str) -> list[tuple[float, float, int]]:
    """(begin, end, rows) of each of `role`'s steps that ran a forward (fed tokens > 0); rows: what
    the step advanced (a draft's branches, a target's requests)."""
    steps, begin = [], None
    for event in events:
        if event.role != role:
            continue
        if event.kind == "stepb":
            begin = event.time
        elif event.kind == "stepe" and begin is not None:
            if len(event.fields) > 1 and int(event.fields[1]) > 0:  # (fed tokens: not only stale answers)
                steps.append((begin, event.time, int(event.fields[0])))
            begin = None
    return steps


def forwards(events: list[Event], role: str) -> list[tuple[float, float]]:
    """(begin, end) of each of `role`'s steps that ran a forward."""
    return [(begin, end) for begin, end, _ in forward_steps(events, role)]


def steps_by_rows(events: list[Event], role: str) -> dict[int, list[float]]:
    """Seconds of each of `role`'s forward steps, by its rows: a served step set against the same
    step alone (whether the worker's core is shared shows there)."""
    by_rows: dict[int, list[float]] = {}
    for begin, end, rows in forward_steps(events, role):
        by_rows.setdefault(rows, []).append(end - begin)
    return by_rows


def gap_cause(between: list[Event]) -> str:
    if not any(e.role == "target" and e.kind == "wait" for e in between):
        return "no wait"
    if any(e.role == "target" and e.kind == "cmd" and e.fields[:1] == ["prefill"] for e in between):
        return "new request"
    if any(e.role == "coordinator" and e.kind == "unforeseen" for e in between):
        return "unforeseen rejection"
    return "waited for a block"


def wait_kind(between: list[Event], blocks: dict[tuple[str, str], tuple[int, bool]]) -> str:
    """What the last verdict the coordinator read during a wait for a block was (module doc);
    `blocks`: (request, block id) -> (tokens, conditional) of every block sent."""
    verified = [e for e in between if e.role == "coordinator" and e.kind == "verdict" and e.fields[2] == "0"]
    if not verified:
        return "no verdict read meanwhile"
    last = verified[-1]
    length, conditional = blocks.get((last.fields[0], last.fields[1]), (None, False))
    if length is not None and int(last.fields[3]) >= length:
        return "after a full acceptance"
    return "after a rejection in a prepared block" if conditional else "after a rejection a fork held"


def target_gaps(
    events: list[Event], spans: list[tuple[float, float]]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """({cause: idle seconds}, {kind of wait for a block: idle seconds}) between the spans."""
    blocks = {
        (e.fields[0], e.fields[1]): (int(e.fields[3]), e.fields[4] == "1")
        for e in events
        if e.role == "coordinator" and e.kind == "send"
    }
    gaps: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}
    i = 0
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        while i < len(events) and events[i].time < end:
            i += 1
        j = i
        while j < len(events) and events[j].time < begin:
            j += 1
        cause = gap_cause(events[i:j])
        gaps.setdefault(cause, []).append(begin - end)
        if cause == "waited for a block":
            waits.setdefault(wait_kind(events[i:j], blocks), []).append(begin - end)
    return gaps, waits


def _next(events: list[Event], start: int, test) -> int | None:
    return next((j for j in range(start, len(events)) if test(events[j])), None)


def _previous(events: list[Event], start: int, test) -> int | None:
    return next((j for j in range(start, -1, -1) if test(events[j])), None)


def _forward_end(event: Event, role: str = "target") -> bool:
    """The end of one of `role`'s steps that ran a forward (fed tokens: not only stale answers)."""
    return event.role == role and event.kind == "stepe" and len(event.fields) > 1 and int(event.fields[1]) > 0


def rejection_hops(events: list[Event]) -> dict[str, list[float]]:
    """For each unforeseen rejection, the seconds of each hop from the target's verdict to its
    next forward (one request in flight at a time)."""
    hops: dict[str, list[float]] = {}
    for i, event in enumerate(events):
        if event.kind != "unforeseen":
            continue
        verdict = _previous(events, i, lambda e: e.kind == "verdict")
        sync = _previous(events, i, lambda e: e.kind == "sync")
        if verdict is None or sync is None or events[sync].time < events[verdict].time:
            continue
        forward_end = _previous(events, verdict, _forward_end)
        if forward_end is None:
            continue
        epoch = events[sync].fields[1]
        got_sync = _next(events, sync, lambda e: e.role == "draft" and e.kind == "cmd" and e.fields[:1] == ["sync"])
        send = _next(events, i, lambda e: e.kind == "send" and e.fields[4] == "0")
        if got_sync is None or send is None:
            continue
        first = _next(
            events,
            sync,
            lambda e: e.kind == "dtoks" and any(t.split(":")[1] == epoch for t in e.fields[1].split(",")),
        )
        arrived = _next(events, send, lambda e: e.role == "target" and e.kind == "cmd")
        started = _next(events, send, lambda e: e.role == "target" and e.kind == "stepb")
        if first is None or first > send or arrived is None or started is None:
            continue
        times = [
            ("verdict to the coordinator", events[forward_end].time, events[verdict].time),
            ("the coordinator's turn", events[verdict].time, events[sync].time),
            ("the resync to the draft", events[sync].time, events[got_sync].time),
            ("the draft's first token", events[got_sync].time, events[first].time),
            ("the rest of the block", events[first].time, events[send].time),
            ("the block to the target", events[send].time, events[arrived].time),
            ("the target's turn", events[arrived].time, events[started].time),
            ("total", events[forward_end].time, events[started].time),
        ]
        for name, begin, end in times:
            hops.setdefault(name, []).append(end - begin)
    return hops


def message_lags(events: list[Event]) -> dict[str, list[float]]:
    """Seconds from a worker's step to the coordinator's event of it (one request in flight at a
    time): each draft step with a forward to its `dtoks`, in order (reset at each prefill the draft
    takes: the last request's late steps were dropped; a `dtoks` holding several tokens of one
    branch, a sequential block reported at its end, stands for that many steps, timed from the
    last); each target forward to the first `verdict` after it, if it came before the next forward
    ended."""
    lags: dict[str, list[float]] = {}
    pending: list[float] = []  # draft step ends whose tokens have not reached the coordinator yet
    for event in events:
        if event.role == "draft" and event.kind == "cmd" and event.fields[:1] == ["prefill"]:
            pending.clear()
        elif _forward_end(event, "draft"):
            pending.append(event.time)
        elif event.role == "coordinator" and event.kind == "dtoks" and pending:
            steps = max(Counter(token.split(":")[0] for token in event.fields[1].split(",")).values())
            taken, pending = pending[:steps], pending[steps:]
            lags.setdefault("a draft step to the coordinator", []).append(event.time - taken[-1])
    ends = [end for _, end in forwards(events, "target")]
    verdicts = [e.time for e in events if e.role == "coordinator" and e.kind == "verdict"]
    j = 0
    for end, next_end in zip(ends, ends[1:] + [float("inf")]):
        while j < len(verdicts) and verdicts[j] < end:
            j += 1
        if j < len(verdicts) and verdicts[j] < next_end:
            lags.setdefault("a verdict to the coordinator", []).append(verdicts[j] - end)
    return lags


def due_errors(events: list[Event]) -> list[float]:
    """For each block verified (not stale), the coordinator's last expected end of its forward
    (`due`) less the end of the forward whose verdict it was (the last to end before the verdict
    reached the coordinator)."""
    due: dict[tuple[str, str], float] = {}
    errors, last_end = [], None
    for event in events:
        if _forward_end(event):
            last_end = event.time
        elif event.role == "coordinator" and event.kind == "due":
            due[(event.fields[0], event.fields[1])] = float(event.fields[2])
        elif event.role == "coordinator" and event.kind == "verdict" and event.fields[2] == "0":
            expected = due.pop((event.fields[0], event.fields[1]), None)
            if expected is not None and last_end is not None:
                errors.append(expected - last_end)
    return errors


def main_blocks(events: list[Event]) -> dict[str, list[tuple[int, int | None]]]:
    """context -> (tokens, accepted) of each main-line block the coordinator sent (the module doc
    names the contexts); accepted is None for a block answered stale or not answered."""
    blocks: dict[str, list[list]] = {}  # context -> [tokens, accepted] of each block
    requests: dict[str, dict] = {}  # request id -> its blocks in flight and what last happened
    for event in events:
        if event.role != "coordinator" or event.kind not in ("send", "verdict", "unforeseen", "arm"):
            continue
        state = requests.setdefault(
            event.fields[0], {"main": {}, "prepared": set(), "armed": set(), "last": "at the request's start"}
        )
        if event.kind == "unforeseen":
            state["last"] = "after an unforeseen rejection"
        elif event.kind == "arm":  # a prepared block the verdict made the main line's next
            state["prepared"].discard(event.fields[1])
            state["armed"].add(event.fields[1])
        elif event.kind == "send":
            block_id, length, conditional = event.fields[1], int(event.fields[3]), event.fields[4] == "1"
            if conditional:
                state["prepared"].add(block_id)
                continue
            context = "behind a block in flight" if state["main"] or state["armed"] else state["last"]
            state["main"][block_id] = [length, None]
            blocks.setdefault(context, []).append(state["main"][block_id])
        else:
            block_id, stale, accepted = event.fields[1], event.fields[2] == "1", int(event.fields[3])
            prepared = block_id in state["prepared"] or block_id in state["armed"]
            entry = state["main"].pop(block_id, None)
            state["prepared"].discard(block_id)
            state["armed"].discard(block_id)
            if stale:
                continue
            if prepared:  # a prepared block verified: the outcome was foreseen
                state["last"] = "after a prepared hit"
            elif entry is not None:
                entry[1] = accepted
                state["last"] = "after a verdict"
    return {context: [(length, accepted) for length, accepted in entries] for context, entries in blocks.items()}


def report(folder: Path) -> Report:
    events = read_events(folder)
    result = Report()
    by_role = {role: forwards(events, role) for role in ("draft", "target")}
    result.steps = {role: [end - begin for begin, end in spans] for role, spans in by_role.items() if spans}
    result.draft_rows = steps_by_rows(events, "draft")
    spans = by_role["target"]
    if len(spans) > 1:
        result.gaps, result.waits = target_gaps(events, spans)
        requests = sum(result.gaps.get("new request", []))
        span = spans[-1][1] - spans[0][0] - requests
        result.target_busy = sum(end - begin for begin, end in spans) / span if span > 0 else 0.0
    result.rejection_hops = rejection_hops(events)
    result.main_blocks = main_blocks(events)
    result.lags = message_lags(events)
    result.due_errors = due_errors(events)
    return result


def _ms(values: list[float]) -> str:
    return f"median {1e3 * statistics.median(values):7.3f} ms, mean {1e3 * statistics.fmean(values):7.3f} ms"


def _tail(values: list[float]) -> str:
    """Percentiles in milliseconds: where a distribution's tail is (nearest rank)."""
    ordered = sorted(values)
    marks = ", ".join(
        f"p{q} {1e3 * ordered[min(len(ordered) - 1, q * len(ordered) // 100)]:.2f}" for q in (10, 50, 90, 99)
    )
    return f"{marks} ms"


def text(result: Report) -> str:
    lines = []
    for role, seconds in result.steps.items():
        lines.append(f"{role} forwards: {len(seconds)}, {_ms(seconds)}")
        if role == "draft":
            for rows, by_rows in sorted(result.draft_rows.items())[:4]:
                lines.append(f"  {rows} row(s): {len(by_rows)}, {_ms(by_rows)}")
    lines.append(f"target busy: {result.target_busy:.1%} (pauses between requests left out)")
    total = sum(sum(v) for cause, v in result.gaps.items() if cause != "new request")
    for cause, seconds in sorted(result.gaps.items()):
        share = "" if cause == "new request" else f", {sum(seconds) / total:.0%} of the idle time" if total else ""
        lines.append(f"  idle, {cause}: {len(seconds)} gaps, {_ms(seconds)}{share}")
        if cause == "waited for a block":
            for kind, waits in sorted(result.waits.items(), key=lambda item: -sum(item[1])):
                lines.append(f"    {kind}: {len(waits)}, {_ms(waits)}")
    if result.rejection_hops:
        count = len(result.rejection_hops["total"])
        lines.append(f"after a rejection no branch foresaw ({count}), until the target's next forward:")
        for hop, seconds in result.rejection_hops.items():
            lines.append(f"  {hop}: {_ms(seconds)}")
    for message, seconds in result.lags.items():
        late = sum(s > 0.001 for s in seconds) / len(seconds)
        lines.append(f"{message}: {len(seconds)} messages, {_tail(seconds)}; over 1 ms: {late:.1%}")
    if result.due_errors:
        lines.append(
            f"a block's forward, expected end less actual (the cut's clock): {len(result.due_errors)} blocks, "
            f"{_tail(result.due_errors)}"
        )
    if result.main_blocks:
        lines.append("main-line blocks by what came before (tokens: count; accepted: mean over the verified):")
        for context, entries in sorted(result.main_blocks.items(), key=lambda item: -len(item[1])):
            lengths = sorted({length for length, _ in entries})
            verified = [accepted for _, accepted in entries if accepted is not None]
            accepted = f"{statistics.fmean(verified):.2f}" if verified else "-"
            by_length = ", ".join(f"{n}: {sum(length == n for length, _ in entries)}" for n in lengths)
            lines.append(
                f"  {context}: {len(entries)} blocks, mean {statistics.fmean(length for length, _ in entries):.2f} "
                f"tokens, accepted {accepted} ({by_length})"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the SPECPIPE_TRACE_DIR the server wrote")
    args = parser.parse_args(argv)
    if not any(args.folder.glob("*.trace")):
        sys.exit(f"no *.trace files in {args.folder}")
    print(text(report(args.folder)))


if __name__ == "__main__":
    main()
