"""The server end to end: real `specpipe serve` processes, real gRPC and ZeroMQ on loopback, real
tiny models. Greedy output must equal Hugging Face greedy token for token in every mode; sampling
must follow the target's distribution, through accepted draft tokens and corrections alike; the
streamed text is the decoded tokens, and a stop string ends it; bad requests get INVALID_ARGUMENT
naming the field; a stream cancelled while the request runs frees it on both workers."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import stat
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe import Client
from specpipe.sampling import SamplingParams, logits_to_probs
from specpipe.launch.placement import SHARED_CPU_NICE

from checks import FREED_S, SERVE_DEFAULTS, internal_sockets, wait_for, wait_idle
from goodness import P_VALUE_THRESHOLD, chi_square_power, chi_square_pvalue
from held import HeldRequest
from tiny import PROMPTS

MODES = ["autoregressive", "sequential", "pipelined", "specbranch"]
MAX_NEW = 40
# Seeds per sampling test: enough for the power check below (each wrong law is caught with
# probability > MIN_POWER at these counts, computed from the same models).
NUM_SEEDS = 300
MIN_POWER = 0.99
# A text prompt whose greedy continuation holds multi-byte characters split across tokens.
TEXT_PROMPT = "def fib(n):"


@pytest.mark.parametrize("draft", ["draft", "draft_close", "draft_same"])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_equals_hf_greedy(serve, hf_greedy, draft, mode):
    client = Client(serve(draft).addr)
    for prompt_ids in PROMPTS:
        token_ids, _, last = client.complete(prompt_ids=prompt_ids, max_new_tokens=MAX_NEW, mode=mode)
        assert token_ids == hf_greedy(prompt_ids, MAX_NEW), f"prompt {prompt_ids}, {mode}, {draft}"
        assert last.finish_reason in ("length", "eos")


def test_identical_draft_accepts_everything(serve, hf_greedy):
    """Every block of 4 accepted, and its bonus. (Idle-decode off: by default the prompt's forward
    decodes the first token, and the first block, verified past it, commits one token fewer.)"""
    client = Client(serve("draft_same", "--policy", "fixed", "--num-draft-tokens", "4", "--idle-decode", "off").addr)
    token_ids, _, last = client.complete(prompt_ids=PROMPTS[0], max_new_tokens=MAX_NEW, mode="sequential")
    stats = last.stats
    assert token_ids == hf_greedy(PROMPTS[0], MAX_NEW)
    assert stats.draft_tokens > 0 and stats.accepted_tokens == stats.draft_tokens
    assert stats.rolled_back_tokens == 0
    assert stats.mean_accepted_length == 5  # 4 drafted + the bonus on every block


def test_eight_concurrent_requests_share_the_workers_forwards(serve, hf_greedy):
    """Every request's output is its own greedy output, and the workers batched them: the target's
    forwards carried more than one request on average, the draft's more than one branch. With the
    fixed policy: the adaptive one may stop drafting for a request when, by what the shared server
    learnt from earlier tests, the target alone looks faster (seen once in make test: the draft's
    forwards then carried 1.14 rows), which is not what this test is about."""
    client = Client(serve("draft", "--policy", "fixed").addr)
    before = {w.role: w for w in client.stats().workers}
    jobs = [(PROMPTS[i % len(PROMPTS)], MODES[i % len(MODES)]) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda job: client.complete(prompt_ids=job[0], max_new_tokens=MAX_NEW, mode=job[1])[0], jobs)
        )
    for (prompt_ids, _), token_ids in zip(jobs, results):
        assert token_ids == hf_greedy(prompt_ids, MAX_NEW)
    after = {w.role: w for w in client.stats().workers}
    for role in ("target", "draft"):
        forwards = after[role].forwards - before[role].forwards
        rows = after[role].forward_rows - before[role].forward_rows
        print(f"\n[batching] {role}: {forwards} forwards, {rows / forwards:.2f} rows per forward")
        assert rows / forwards > 1.2, role


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


def split_characters(tokenizer, token_ids: list[int]) -> set[str]:
    """The multi-byte characters of the decoded text that no token decodes to alone: each one's
    bytes are split across tokens."""
    alone = "".join(tokenizer.decode([token_id]) for token_id in token_ids)
    return {
        char
        for char in tokenizer.decode(token_ids, skip_special_tokens=True)
        if ord(char) > 127 and char != "\ufffd" and char not in alone
    }


@pytest.mark.parametrize("mode", ["sequential", "specbranch"])
def test_streamed_text_is_the_decoded_tokens_and_a_stop_string_ends_it(serve, tokenizer, hf_greedy, mode):
    """A text prompt: the chunks' `text` joined is exactly the decode of the streamed tokens, the
    multi-byte characters split across tokens (and chunks) included. The same request with a stop
    string that starts with such a character ends `stop`, its text cut just before the string."""
    client = Client(serve("draft").addr)
    expected = hf_greedy(tokenizer(TEXT_PROMPT)["input_ids"], MAX_NEW)
    chunks = list(client.generate(TEXT_PROMPT, max_new_tokens=MAX_NEW, mode=mode))
    assert [t for c in chunks for t in c.token_ids] == expected
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert "".join(c.text for c in chunks) == text
    split = split_characters(tokenizer, expected)
    assert split, f"no multi-byte character split across tokens in {text!r}: choose another prompt"
    assert chunks[-1].finish_reason in ("length", "eos")
    assert chunks[-1].stats.generated_tokens == len(expected) and chunks[-1].stats.time_to_first_token_s > 0

    at = min(text.index(char) for char in split)
    stop = text[at : at + 2]
    chunks = list(client.generate(TEXT_PROMPT, max_new_tokens=MAX_NEW, mode=mode, stop=[stop]))
    streamed = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].finish_reason == "stop", (stop, chunks[-1])
    assert "".join(c.text for c in chunks) == text[: text.index(stop)]
    assert streamed == expected[: len(streamed)] and stop in tokenizer.decode(streamed)


def test_same_seed_same_output(serve):
    client = Client(serve("draft").addr)
    params = dict(prompt_ids=PROMPTS[2], max_new_tokens=24, temperature=1.0, mode="sequential")
    first = client.complete(seed=7, **params)[0]
    assert client.complete(seed=7, **params)[0] == first
    assert any(client.complete(seed=seed, **params)[0] != first for seed in (8, 9, 10))


def first_token_probs(model_dir, prompt_ids, sampling: SamplingParams) -> np.ndarray:
    """A model's processed next-token distribution after `prompt_ids`, in float64."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    return logits_to_probs(logits, sampling).double().numpy()


def first_token_laws(target_probs: np.ndarray, draft_probs: np.ndarray) -> dict[str, np.ndarray]:
    """The law of (the first token, whether it was an accepted draft token) when the first block
    has one draft token: cells [accepted x for every x, then corrected x for every x]. "exact" is
    Leviathan et al.'s: accept x with min(p, q), else the correction from max(0, p - q); the others
    are the laws of broken plumbing (the unit tests' biased samplers, end to end)."""
    both = np.minimum(target_probs, draft_probs)
    rejected = 1.0 - both.sum()
    return {
        "exact": np.concatenate([both, np.maximum(0.0, target_probs - draft_probs)]),
        "correction resampled from p": np.concatenate([both, rejected * target_probs]),
        "ratio inverted (q over p)": np.concatenate([both, np.maximum(0.0, draft_probs - target_probs)]),
        "every draft token accepted": np.concatenate([draft_probs, np.zeros_like(draft_probs)]),
    }


@pytest.mark.parametrize("draft", ["draft", "draft_close"])
def test_sampling_follows_target_distribution(serve, tiny_models, draft):
    """The first generated token over NUM_SEEDS seeds, with whether the target accepted it from the
    draft (max_new_tokens 2: the first block drafts exactly one token, so `accepted_tokens` says
    it): chi-square against the exact law of the pair (temperature 1, top-k 6), through a draft
    far from the target (top-6 apart: every first token a correction, none accepted) and one close
    to it (both paths). The same samples reject each law of broken plumbing that differs from the
    exact one, and the test has the power to (computed for NUM_SEEDS samples). `--idle-decode off`:
    by default the prompt's forward draws the first token itself, and no block verifies it (that
    law is tests/target_worker/test_fills.py's)."""
    client = Client(serve(draft, "--idle-decode", "off").addr)
    prompt_ids, sampling = PROMPTS[0], SamplingParams(temperature=1.0, top_k=6)
    target_probs = first_token_probs(tiny_models["target"], prompt_ids, sampling)
    laws = first_token_laws(target_probs, first_token_probs(tiny_models[draft], prompt_ids, sampling))
    vocab = len(target_probs)
    counts = np.zeros(2 * vocab)

    def run(seed):
        token_ids, _, last = client.complete(
            prompt_ids=prompt_ids, max_new_tokens=2, temperature=1.0, top_k=6, seed=seed, mode="sequential"
        )
        return token_ids[0], last.stats.accepted_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for token_id, num_accepted in pool.map(run, range(NUM_SEEDS)):
            assert num_accepted in (0, 1), "the first block had more than one draft token"
            counts[token_id + (0 if num_accepted else vocab)] += 1
    accepted = int(counts[:vocab].sum())
    print(
        f"\n[sampling] {draft}: {accepted} of {NUM_SEEDS} first tokens accepted from the draft "
        f"(exact law: {laws['exact'][:vocab].sum() * NUM_SEEDS:.0f})"
    )
    assert chi_square_pvalue(counts, laws["exact"]) > P_VALUE_THRESHOLD
    for name, law in laws.items():
        if name != "exact" and np.abs(law - laws["exact"]).sum() > 1e-6:
            assert chi_square_power(laws["exact"], law, NUM_SEEDS) > MIN_POWER, name
            assert chi_square_pvalue(counts, law) < P_VALUE_THRESHOLD, f"these samples fit: {name}"


INVALID = [
    (dict(max_new_tokens=5), "exactly one of prompt / prompt_ids"),
    (dict(prompt="x", prompt_ids=[1], max_new_tokens=5), "exactly one of prompt / prompt_ids"),
    (dict(prompt_ids=[1, 99999], max_new_tokens=5), "prompt_ids[1] = 99999 is outside the vocabulary"),
    (dict(prompt_ids=[1, -3], max_new_tokens=5), "prompt_ids[1] = -3"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens is required"),
    (dict(prompt_ids=[1], max_new_tokens=100000), "max_new_tokens = 100000 exceeds"),
    (dict(prompt_ids=[1] * 500, max_new_tokens=20), "exceeds the model context of 512"),
    (dict(prompt_ids=[1], max_new_tokens=5, temperature=-1.0), "temperature must be"),
    (dict(prompt_ids=[1], max_new_tokens=5, temperature=float("nan")), "temperature must be"),
    (dict(prompt_ids=[1], max_new_tokens=5, top_p=1.5), "top_p must be in [0, 1]"),
    (dict(prompt_ids=[1], max_new_tokens=5, top_p=-0.1), "top_p must be in [0, 1]"),
    (dict(prompt_ids=[1], max_new_tokens=5, stop=[""]), "stop[0]"),
]


@pytest.mark.parametrize("params, message", INVALID)
def test_invalid_requests_name_the_field(serve, params, message):
    client = Client(serve("draft").addr)
    with pytest.raises(grpc.RpcError) as err:
        client.complete(**params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    # ...and the server keeps serving.
    assert client.complete(prompt_ids=[1, 2], max_new_tokens=3)[2].finish_reason in ("length", "eos")


def test_stats_say_how_each_worker_runs_its_model(serve):
    """GetStats carries each worker's start-up choices, as its log says them: the weights' layout,
    the KV store (and, on a CPU with oneDNN, the prepacked copies it kept)."""
    stats = Client(serve("draft").addr).stats()
    assert [w.role for w in stats.workers] == ["draft", "target"]
    for worker in stats.workers:
        assert any("Linear weights laid out" in line for line in worker.setup), worker
        assert any(line.startswith("KV store: ") for line in worker.setup), worker


def test_cancel_mid_stream_frees_both_workers(serve):
    """A request whose client stops reading is live on both workers while it runs (400 tokens: the
    check comes milliseconds after the first); its client cancels; the server counts it cancelled
    (not finished) and frees it on both workers."""
    server = serve("draft")
    client = Client(server.addr)
    assert wait_idle(client)[0]
    before = dict(client.stats().finished)
    held = HeldRequest(server, prompt_ids=PROMPTS[0], max_new_tokens=400, mode="sequential").first()
    try:
        stats = client.stats()
        assert stats.live_requests == 1 and [(w.live_requests > 0, w.kv_slots_used > 0) for w in stats.workers] == [
            (True, True),
            (True, True),
        ], stats
    finally:
        held.cancel()
    with pytest.raises(grpc.RpcError) as err:
        held.rest()
    assert err.value.code() == grpc.StatusCode.CANCELLED and not held.last.finish_reason
    idle, stats = wait_idle(client)
    assert idle and [w.kv_slots_used for w in stats.workers] == [0, 0], stats
    after = dict(stats.finished)
    moved = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in set(after) | set(before)}
    assert {reason: n for reason, n in moved.items() if n} == {"cancelled": 1}


def test_a_client_that_stops_reading_holds_no_worker_state_once_its_run_ends(serve, hf_greedy):
    """A client stops reading after its first chunk: its run goes on to the end and frees both
    workers' state (KV slots included) while the server keeps the rest of its stream for it (still
    live); when it reads on it gets every token, exactly the target's."""
    server = serve("draft")
    client = Client(server.addr)
    assert wait_idle(client)[0]
    held = HeldRequest(server, prompt_ids=PROMPTS[0], max_new_tokens=400, mode="sequential").first()
    try:

        def freed():
            stats = client.stats()
            return stats if all(w.live_requests == 0 and w.kv_slots_used == 0 for w in stats.workers) else None

        stats = wait_for(freed, FREED_S, "both workers freed")
        assert stats.live_requests == 1, "the held request is still streaming"
        tokens = held.rest()
    finally:
        held.cancel()
    assert tokens == hf_greedy(PROMPTS[0], 400) and held.last.finish_reason in ("length", "eos")
    assert wait_idle(client)[0]


@pytest.mark.parametrize("policy", ["fixed", "adaptive", "predictor"])
def test_every_policy_is_lossless(serve, hf_greedy, policy):
    """The policy only decides how much to draft and where to branch; output never changes."""
    client = Client(serve("draft_close", "--policy", policy, "--num-draft-tokens", "8").addr)
    for mode in ("sequential", "specbranch"):
        token_ids, _, _ = client.complete(prompt_ids=PROMPTS[2], max_new_tokens=MAX_NEW, mode=mode)
        assert token_ids == hf_greedy(PROMPTS[2], MAX_NEW), (policy, mode)


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for task in os.listdir(f"/proc/{pid}/task")
        for child in open(f"/proc/{pid}/task/{task}/children").read().split()
    ]


def _role(pid: int) -> str:
    command = open(f"/proc/{pid}/cmdline").read()
    return "draft" if "draft_worker" in command else "target" if "target_worker" in command else "?"


def test_cpu_pinning_puts_each_process_on_its_cpus(serve, hf_greedy):
    """--target-cpus / --draft-cpus / --coordinator-cpus pin every thread of each process (the
    target on the first usable CPU, the draft and the coordinator on the last: pin_flags())."""
    from specpipe.launch.local import pin_flags

    usable = sorted(os.sched_getaffinity(0))
    first, last = str(usable[0]), str(usable[-1])
    flags = ["--target-cpus", first, "--draft-cpus", last, "--coordinator-cpus", last]
    if len(usable) >= 2:  # what the demo and the bench pin with, and serve by default: the same layout,
        assert pin_flags() == flags  # so the default server is this one (its start saved)
    server = serve("draft") if pin_flags() == flags else serve("draft", *flags)
    client = Client(server.addr)
    token_ids, _, _ = client.complete(prompt_ids=PROMPTS[1], max_new_tokens=MAX_NEW, mode="specbranch")
    assert token_ids == hf_greedy(PROMPTS[1], MAX_NEW)
    want = {"target": {usable[0]}, "draft": {usable[-1]}}
    workers = {_role(pid): pid for pid in _children(server.process.pid)}
    assert set(workers) == {"target", "draft"}
    for pid, cpus in [(server.process.pid, {usable[-1]})] + [(workers[role], want[role]) for role in want]:
        for thread in os.listdir(f"/proc/{pid}/task"):
            assert os.sched_getaffinity(int(thread)) == cpus, (pid, thread)


def test_bad_cpu_list_is_refused_with_the_flag_named(tiny_models):
    from specpipe.config import parse_cpus

    assert parse_cpus("0-2,5") == {0, 1, 2, 5}
    for bad in ("x", "3-1", "1,", "-1"):
        with pytest.raises(ValueError, match="bad CPU list"):
            parse_cpus(bad)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specpipe.launch.cli",
            "serve",
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(tiny_models["draft"]),
            "--target-cpus",
            "0-x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "--target-cpus: bad CPU list '0-x'" in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "specpipe.draft_worker",
            "--model",
            str(tiny_models["draft"]),
            "--port",
            "0",
            "--cpus",
            "100000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "--cpus: CPU list '100000' names CPUs outside" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "specpipe.draft_worker", "--model", str(tiny_models["draft"]), "--nice", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "--nice: 20 is outside 0..19" in out.stderr


def _affinities(server_pid: int) -> dict[str, set[frozenset]]:
    """role -> the distinct CPU sets of the process's threads, for the coordinator and its workers."""
    pids = {"coordinator": server_pid, **{_role(pid): pid for pid in _children(server_pid)}}
    return {
        role: {frozenset(os.sched_getaffinity(int(thread))) for thread in os.listdir(f"/proc/{pid}/task")}
        for role, pid in pids.items()
    }


def _niceness(server_pid: int) -> dict[str, int]:
    """role -> how much nicer than this process the coordinator and its workers run (every thread)."""
    pids = {"coordinator": server_pid, **{_role(pid): pid for pid in _children(server_pid)}}
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    found = {}
    for role, pid in pids.items():
        values = {os.getpriority(os.PRIO_PROCESS, int(thread)) for thread in os.listdir(f"/proc/{pid}/task")}
        assert len(values) == 1, (role, values)
        found[role] = values.pop() - ours
    return found


def test_serve_defaults_are_what_the_tests_assume():
    """The serve fixture leaves out flags that say a default (checks.SERVE_DEFAULTS): they must
    be serve's defaults, or two tests would share a server started with other flags."""
    import argparse

    from specpipe.launch.serve_flags import add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    for flag, value in SERVE_DEFAULTS.items():
        assert str(parser.get_default(flag.lstrip("-").replace("-", "_"))) == value, flag


def test_serve_pins_by_default_exactly_as_pin_auto(serve):
    """No placement flag: on a host that gives two or more cores, the layout of --pin auto, which
    the demo and the bench use (pin_flags): the target alone on the first core, the draft on the
    next (on another physical core where the host has two), every thread; the coordinator on a
    spare core of its own where there is one (never the target's SMT sibling), else beside the
    draft, which then yields it the core (nice)."""
    from specpipe.launch.local import pin_flags
    from specpipe.launch.placement import auto_pins, core_siblings

    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("one usable core: --pin auto pins nothing")
    pins, _ = auto_pins(1, ["cpu", "cpu"])
    first, second, coordinator = (int(pins[role]) for role in ("target", "draft", "coordinator"))
    assert first == usable[0]
    if any(cpu not in core_siblings(first) for cpu in usable):
        assert second not in core_siblings(first), "the workers on two physical cores"
    spare = [cpu for cpu in usable if cpu not in (first, second) and not core_siblings(cpu) & core_siblings(first)]
    assert (coordinator in spare) if spare else (coordinator == second), "a spare core is the coordinator's"
    assert pin_flags() == [
        "--target-cpus",
        str(first),
        "--draft-cpus",
        str(second),
        "--coordinator-cpus",
        str(coordinator),
    ]
    server = serve("draft")
    assert _affinities(server.process.pid) == {
        "coordinator": {frozenset({coordinator})},
        "target": {frozenset({first})},
        "draft": {frozenset({second})},
    }
    # A draft on the coordinator's core yields it to the coordinator (placement.worker_nice).
    draft_nice = SHARED_CPU_NICE if coordinator == second else 0
    assert _niceness(server.process.pid) == {"coordinator": 0, "target": 0, "draft": draft_nice}


def test_pin_none_leaves_placement_to_the_os_and_the_summary_says_what_it_serves(tiny_models, capsys):
    """--pin none: every process keeps the launcher's CPUs. And before `specpipe serving on` the
    server says what it serves: models and sizes, devices, pinning, mode, limits, ports, and the
    private folder of its internal sockets (issue 23), which Ctrl-C (SIGINT to its process group,
    as a terminal sends it) removes with everything in it."""
    from specpipe.launch.local import ServerProcess

    with ServerProcess(
        [
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(tiny_models["draft"]),
            "--pin",
            "none",
            "--metrics-port",
            "0",
        ],
        echo=True,
    ) as server:
        unpinned = frozenset(os.sched_getaffinity(0))
        assert _affinities(server.process.pid) == {role: {unpinned} for role in ("coordinator", "target", "draft")}
        assert _niceness(server.process.pid) == {"coordinator": 0, "target": 0, "draft": 0}
        folder, _, _ = internal_sockets(server)
        assert folder is not None and stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        server.stop(signal.SIGINT)
        assert server.process.returncode == 0 and not os.path.exists(folder), (server.process.returncode, folder)
    summary = capsys.readouterr().out
    for needle in (
        f"target  {tiny_models['target']}  ",
        f"draft   {tiny_models['draft']}  ",
        "K parameters, float32, on cpu, not pinned (pid ",
        "coordinator not pinned; pinning: --pin none",
        "default mode specbranch, policy adaptive, up to 8 draft tokens",
        "limits: 32 requests running, 256 queued, no limit on tokens in flight, max_new_tokens <= 4096",
        f"gRPC {server.addr} (plain text, no token); metrics http://127.0.0.1:",
        f"specpipe serving on {server.addr}",
    ):
        assert needle in summary, (needle, summary)
