"""Load: many concurrent clients against one real server, with cancels and deadlines mixed in.

Method: a fixed-seed mix of requests (greedy in every mode, seeded sampling, clients that cancel
a long request once its first tokens come, clients with deadlines from 20 to 400 ms) is run from a pool of client threads; a
client refused with RESOURCE_EXHAUSTED backs off and retries, as a real one would. Checks:
- every request ends with output (finish_reason set) or with the status its client caused
  (CANCELLED, DEADLINE_EXCEEDED), never anything else;
- greedy output equals the target's own greedy output (Hugging Face, computed once per prompt),
  and what a cancelled or expired greedy request received is a prefix of it;
- the cancels are real: the server counts (GetStats `finished`) as cancelled no more requests than
  the clients cancelled, and at least half of them (a client cancels a request of MAX_NEW tokens
  once its first tokens come, so the server is still running it then; a client cancelling
  half-way through a short one raced the request's last verify, and lost it on a busy machine);
- afterwards GetStats shows 0 live requests, 0 live branches and 0 KV slots held on both workers:
  the workers' own counts of per-request state, which one leaked request moves. (Resident memory
  is printed, not asserted: allocator pools and freed arenas move it by megabytes either way, so
  it could not see a per-request leak of a few kilobytes.)
Throughput and latency percentiles are printed (figures only: this machine is shared, so no
timing is asserted).

The default run has a short version (150 requests, 16 clients) on the shared server; the full
one (2,000 requests, 32 clients, `-m slow`) runs on its own server with small admission limits
(8 running, 16 queued), so queueing and refusals are exercised too.
"""

from __future__ import annotations

import concurrent.futures
import random
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import psutil
import pytest

from specpipe import Client

from checks import wait_idle
from tiny import PROMPTS

LOAD_PROMPTS = [*PROMPTS, [42, 42, 7, 99, 250], [3, 1, 4, 1, 5, 9, 2, 6]]
MODES = ["autoregressive", "sequential", "pipelined", "specbranch"]
MAX_NEW = 32
MAX_RETRIES = 200
CALL_TIMEOUT_S = 120.0  # a generous cap for requests without their own deadline: a hang fails


@dataclass
class Job:
    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    mode: str
    kind: str  # greedy | sampled | cancel | deadline
    timeout: float | None = None
    seed: int | None = None
    # outcome
    code: grpc.StatusCode | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    latency_s: float = 0.0
    retries: int = 0
    cancelled_after: int | None = None  # tokens received when the client cancelled


def make_jobs(count: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        kind = rng.choices(["greedy", "sampled", "cancel", "deadline"], weights=[60, 15, 15, 10])[0]
        job = Job(index, rng.choice(LOAD_PROMPTS), rng.randint(4, MAX_NEW), rng.choice(MODES), kind)
        if kind == "sampled":
            job.seed = rng.randrange(2**32)
        if kind == "deadline":
            job.timeout = rng.uniform(0.02, 0.4)
        if kind == "cancel":
            job.max_new_tokens = MAX_NEW  # (no draw: the rest of the mix stays as it was)
        jobs.append(job)
    return jobs


def run_job(client: Client, job: Job) -> None:
    params = dict(
        prompt_ids=job.prompt_ids,
        max_new_tokens=job.max_new_tokens,
        mode=job.mode,
        timeout=job.timeout or CALL_TIMEOUT_S,
    )
    if job.kind == "sampled":
        params.update(temperature=0.8, top_k=20, seed=job.seed)
    start = time.monotonic()  # latency as the client sees it: back-offs and retries included
    for attempt in range(MAX_RETRIES):
        job.retries, job.token_ids = attempt, []
        stream = client.generate(**params)
        try:
            for response in stream:
                job.token_ids += response.token_ids
                job.finish_reason = response.finish_reason or job.finish_reason
                if job.kind == "cancel" and not job.finish_reason and job.token_ids:
                    job.cancelled_after = len(job.token_ids)
                    stream.cancel()
            job.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            job.code = err.code()
        job.latency_s = time.monotonic() - start
        if job.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return
        time.sleep(random.uniform(0.01, 0.05) * min(attempt + 1, 8))


def worker_rss(client: Client, server_pid: int) -> dict[str, int]:
    """Resident bytes of each worker process (pids from GetStats, else the server's children)."""
    pids = {w.role: w.pid for w in client.stats().workers if w.pid}
    if len(pids) < 2:
        children = psutil.Process(server_pid).children()
        pids = {f"child{child.pid}": child.pid for child in children}
    return {role: psutil.Process(pid).memory_info().rss for role, pid in pids.items()}


def run_load(server, hf_greedy, capsys, count: int, clients: int, seed: int) -> None:
    client = Client(server.addr)
    reference = {tuple(p): hf_greedy(p, MAX_NEW) for p in LOAD_PROMPTS}
    # Warm-up: every mode once, so allocator pools and lazy inits are in the "before" figure.
    for mode in MODES:
        client.complete(prompt_ids=LOAD_PROMPTS[0], max_new_tokens=MAX_NEW, mode=mode)
    assert wait_idle(client)[0]
    rss_before = worker_rss(client, server.process.pid)
    finished_before = dict(client.stats().finished)
    jobs = make_jobs(count, seed)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda job: run_job(client, job), jobs))
    wall = time.monotonic() - started
    idle, stats = wait_idle(client)
    rss_after = worker_rss(client, server.process.pid)

    codes = {}
    for job in jobs:
        codes[job.code.name] = codes.get(job.code.name, 0) + 1
        expected = reference[tuple(job.prompt_ids)][: job.max_new_tokens]
        allowed = {
            "greedy": {"OK"},
            "sampled": {"OK"},
            "cancel": {"OK", "CANCELLED"},
            "deadline": {"OK", "DEADLINE_EXCEEDED"},
        }[job.kind]
        assert job.code.name in allowed, f"job {job.index} ({job.kind}, {job.mode}) ended with {job.code}"
        if job.code == grpc.StatusCode.OK and job.kind != "cancel" or job.finish_reason:
            assert job.finish_reason in ("length", "eos"), f"job {job.index}: finish_reason {job.finish_reason!r}"
        if job.kind == "sampled":
            assert 0 < len(job.token_ids) <= job.max_new_tokens
        elif job.code == grpc.StatusCode.OK and job.finish_reason:
            assert job.token_ids == expected, f"job {job.index} ({job.mode}): greedy output differs"
        else:
            assert job.token_ids == expected[: len(job.token_ids)], f"job {job.index}: not a prefix of greedy"
    assert idle, f"requests or branches left after the load: {stats}"
    assert [w.kv_slots_used for w in stats.workers] == [0, 0], f"KV slots held after the load: {stats}"
    issued = sum(job.cancelled_after is not None for job in jobs)
    cancelled = stats.finished["cancelled"] - finished_before.get("cancelled", 0)

    done = [job for job in jobs if job.code == grpc.StatusCode.OK and job.finish_reason]
    latencies = np.array([job.latency_s for job in done])
    tokens = sum(len(job.token_ids) for job in jobs)
    with capsys.disabled():
        print(
            f"\n[load] {count} requests from {clients} clients in {wall:.1f} s: {len(done) / wall:.1f} requests/s, "
            f"{tokens / wall:.0f} tokens/s streamed; outcomes {codes}; "
            f"{sum(job.retries for job in jobs)} retries after RESOURCE_EXHAUSTED; {cancelled} of {issued} "
            f"cancels landed mid-request"
        )
        print(
            f"[load] latency of completed requests (retries included): p50 {np.percentile(latencies, 50) * 1000:.0f} ms, "
            f"p90 {np.percentile(latencies, 90) * 1000:.0f} ms, p99 {np.percentile(latencies, 99) * 1000:.0f} ms"
        )
        print(
            "[load] worker RSS before -> after: "
            + ", ".join(
                f"{role} {rss_before[role] / 2**20:.1f} -> {rss_after.get(role, 0) / 2**20:.1f} MB"
                for role in rss_before
            )
        )
    assert issued * 0.5 <= cancelled <= issued, f"the server cancelled {cancelled} requests, the clients {issued}"


def test_load_short(serve, hf_greedy, capsys):
    run_load(serve("draft"), hf_greedy, capsys, count=150, clients=16, seed=1)


@pytest.mark.slow
def test_load_full(serve, hf_greedy, capsys):
    server = serve("draft", "--max-concurrent-requests", "8", "--max-queued-requests", "16")
    run_load(server, hf_greedy, capsys, count=2000, clients=32, seed=2)


def test_job_mix_is_reproducible():
    first, second = make_jobs(50, seed=5), make_jobs(50, seed=5)
    assert [(j.prompt_ids, j.max_new_tokens, j.mode, j.kind) for j in first] == [
        (j.prompt_ids, j.max_new_tokens, j.mode, j.kind) for j in second
    ]
    assert {j.kind for j in make_jobs(200, seed=1)} == {"greedy", "sampled", "cancel", "deadline"}
