"""The torchrun entry for real: `torchrun --nproc-per-node 2 -m specpipe.launch.torchrun` on CPU
(gloo) with the tiny models. Method: one torchrun per module; the gRPC address is read from
torchrun's own output, as a user would. Greedy output must equal Hugging Face greedy, and a seeded
sampling request must give what `specpipe serve --transport zmq` gives over the same models (same
seed, same output, whatever the transport and the launcher). Last, SIGTERM to torchrun (what Ctrl-C
or a job scheduler sends) must stop every process within seconds, each rank with exit code 0.
torchrun itself exits non-zero after a signal whatever its workers do (it re-raises the signal as
SignalException), so each rank's exit code is read from the line it logs on its way out."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specpipe import Client
from specpipe.launch.local import READY_SERVER

from tiny import PROMPTS

MODES = ["sequential", "pipelined", "specbranch"]
MAX_NEW = 24
# Seeded sampling reproduces where blocks are cut deterministically (sequential); in the pipelined
# modes the cut depends on timing, so two runs are two exact samples rather than one.
SAMPLING = [
    dict(prompt_ids=p, max_new_tokens=MAX_NEW, mode="sequential", temperature=1.0, seed=11) for p in PROMPTS[:2]
]
LOOPBACK = ("draft_close", "--transport", "zmq")  # the serve fixture's key, shared with test_transport
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 10  # "within a few seconds", with room for this busy 2-core box


class Torchrun:
    def __init__(self, args: list[str], torchrun_args: tuple[str, ...] = ()):
        torchrun = Path(sys.executable).with_name("torchrun")
        env = {
            **os.environ,
            "SPECPIPE_LOG_LEVEL": "INFO",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
        self.process = subprocess.Popen(
            [str(torchrun), "--nproc-per-node", "2", *torchrun_args, "-m", "specpipe.launch.torchrun", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.fresh: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line)
            self.fresh.put(line)
        self.fresh.put(None)

    def wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (line := self.fresh.get(timeout=max(0.01, deadline - time.monotonic()))) is not None:
            if line.startswith("specpipe serving on") and (match := READY_SERVER.search(line)):  # not the log line
                return f"{match.group(1)}:{match.group(2)}"
        raise AssertionError(f"torchrun exited before serving:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> list[int]:
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found += map(int, children)
            todo += map(int, children)
        return found

    def kill(self) -> None:
        """torchrun, its ranks and the coordinator: the ranks run in sessions of their own, so the
        process group alone would leave them (and their servers) orphaned."""
        processes = self.descendants()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def torchrun_server(tiny_models, serve):
    server = Torchrun(
        ["--target", str(tiny_models["target"]), "--draft", str(tiny_models["draft_close"]), "--port", "0"]
    )
    try:
        serve(*LOOPBACK)  # the reference server starts while torchrun's ranks load
        server.addr = server.wait_ready()
        yield server
    finally:
        server.kill()


def test_greedy_equals_hf_greedy(torchrun_server, hf_greedy):
    client = Client(torchrun_server.addr, timeout=60)
    for prompt_ids in PROMPTS[:2]:
        for mode in MODES:
            token_ids, _, _ = client.complete(prompt_ids=prompt_ids, max_new_tokens=MAX_NEW, mode=mode)
            assert token_ids == hf_greedy(prompt_ids, MAX_NEW), f"prompt {prompt_ids}, {mode}"


def test_seeded_sampling_equals_zmq_serve(torchrun_server, serve):
    under_torchrun = Client(torchrun_server.addr, timeout=60)
    local_zmq = Client(serve(*LOOPBACK).addr, timeout=60)
    for request in SAMPLING:
        expected, _, _ = local_zmq.complete(**request)
        assert under_torchrun.complete(**request)[0] == expected, request
    stats = under_torchrun.stats()
    assert {worker.role: worker.healthy for worker in stats.workers} == {"draft": True, "target": True}


def test_sigterm_to_torchrun_stops_both_ranks_cleanly(torchrun_server):
    """... and on one node each rank's control socket was an ipc path in a private folder of its
    own (mode 0700: issue 23), which is gone once the rank has stopped."""
    processes = torchrun_server.descendants()
    assert len(processes) >= 3, "expected two ranks and the coordinator under torchrun"
    sockets = dict(re.findall(r"(target|draft) worker listening on ipc://(\S+)", torchrun_server.output()))
    folders = {role: Path(path).parent for role, path in sockets.items()}
    assert set(folders) == {"target", "draft"} and folders["target"] != folders["draft"], torchrun_server.output()
    assert all(os.stat(folder).st_mode & 0o777 == 0o700 for folder in folders.values())
    began = time.monotonic()
    torchrun_server.process.send_signal(signal.SIGTERM)
    torchrun_server.process.wait(STOP_TIMEOUT_S)  # (raises TimeoutExpired past the bound)
    print(f"\n[torchrun] SIGTERM to exit: {time.monotonic() - began:.2f} s")
    output = torchrun_server.output()
    for rank, role in ((0, "target"), (1, "draft")):
        assert re.search(rf"rank {rank} \({role}\) exits with code 0\b", output), output[-4000:]
    assert not [pid for pid in processes if Path(f"/proc/{pid}").exists()], "a process outlived torchrun"
    assert not [folder for folder in folders.values() if folder.exists()], "a rank left its socket folder"


def test_draft_rank_killed_restarts_the_pair_and_serves_again(tiny_models, hf_greedy):
    """torchrun is fail-stop (its agent stops the whole group when one rank dies, so the target
    cannot carry on alone as under `specpipe serve`); with `--max-restarts N` the pair comes back
    on the same gRPC port and serves exactly again (the README says so)."""
    from specpipe.launch.local import free_port

    port = free_port()
    server = Torchrun(
        ["--target", str(tiny_models["target"]), "--draft", str(tiny_models["draft_close"]), "--port", str(port)],
        torchrun_args=("--max-restarts", "1"),
    )
    try:
        addr = server.wait_ready()
        client = Client(addr, timeout=60)
        assert client.complete(prompt_ids=PROMPTS[1], max_new_tokens=MAX_NEW)[0] == hf_greedy(PROMPTS[1], MAX_NEW)
        draft_pid = next(w.pid for w in client.stats().workers if w.role == "draft")
        os.kill(draft_pid, signal.SIGKILL)
        assert server.wait_ready() == addr, "the restarted pair serves on the same address"
        assert client.complete(prompt_ids=PROMPTS[0], max_new_tokens=MAX_NEW)[0] == hf_greedy(PROMPTS[0], MAX_NEW)
        assert next(w.pid for w in client.stats().workers if w.role == "draft") != draft_pid
    finally:
        server.kill()
