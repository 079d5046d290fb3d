"""The per-block trace end to end: `specpipe serve` with SPECPIPE_TRACE_DIR set (the workers
inherit it) writes one file per process, and the report reads the merged timeline.

Method: one greedy specbranch request on a real server over tiny models; every block the
coordinator sent has its verdict, each worker's file holds its forwards, and the report's target
forwards are the target file's forwards.
"""

from __future__ import annotations

from specpipe import Client
from specpipe.launch.local import ServerProcess
from specpipe.tools import trace_report
from specpipe.trace import TRACE_DIR_ENV

from tiny import PROMPTS


def test_serve_writes_a_trace_per_process_that_the_report_reads(tiny_models, tmp_path):
    folder = tmp_path / "trace"
    args = ["--target", str(tiny_models["target"]), "--draft", str(tiny_models["draft"]), "--mode", "specbranch"]
    # (No fills: a request may end on a token the target decoded by itself while a redrafted block
    # waited behind it; the release drops that block unanswered, and each send would not have its verdict.)
    args += ["--idle-decode", "off"]
    with ServerProcess(args, env={TRACE_DIR_ENV: str(folder)}) as server:
        token_ids, _, _ = Client(server.addr).complete(prompt_ids=PROMPTS[0], max_new_tokens=24)
    assert len(token_ids) == 24
    assert sorted(path.stem.rsplit("-", 1)[0] for path in folder.glob("*.trace")) == [
        "coordinator",
        "draft",
        "target",
    ]
    events = trace_report.read_events(folder)
    kinds = [e.kind for e in events if e.role == "coordinator"]
    assert kinds.count("send") == kinds.count("verdict") > 0
    result = trace_report.report(folder)
    assert len(result.steps["target"]) == len(trace_report.forwards(events, "target")) > 0
    assert result.steps["draft"] and 0 < result.target_busy <= 1
