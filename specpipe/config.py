"""Per-process configuration: one frozen dataclass each, built once from flags and environment in
the entry module and passed down (STYLE §4), the draft-length and branch policy's settings
(PolicyConfig: what the coordinator's policy reads) among them. Also the address and CPU rules
shared by all processes. Knows nothing of how any process uses its configuration.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from specpipe.modes import Mode

# Loopback unless told otherwise (DESIGN §3): a worker port is not an API for the network.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 50051
DEFAULT_DRAFT_PORT = 50061
DEFAULT_TARGET_PORT = 50062
DEFAULT_DATA_PORT = 50063  # the target's data-plane port (zmq transport)
# The ports the deployment files give the optional listeners (the flags are off by default):
# --health-port (grpc.health.v1 alone, plain text, for probes) and --metrics-port (Prometheus).
DEFAULT_HEALTH_PORT = 50052
DEFAULT_METRICS_PORT = 9090
# Start-up waits (`specpipe serve --target-startup-timeout / --draft-startup-timeout`): long enough
# for a model of tens of GB read from network storage onto a GPU (minutes), so a slow start is
# never mistaken for a failure; where a scheduler already bounds the start (a Kubernetes startup
# probe, a Slurm script's own wait) that bound decides.
DEFAULT_STARTUP_TIMEOUT_S = 1800.0
# KV slots by default: one per request the coordinator admits at once (its default 32), and on the
# draft one per branch (a request's main branch and up to 4 alternatives).
DEFAULT_TARGET_SLOTS = 32
DEFAULT_DRAFT_SLOTS = 32 * 5
# `specpipe serve --draft ngram`: the prompt-lookup drafter (no draft model; draft_worker/drafter.py).
NGRAM_DRAFTER = "ngram"
ENV_CURVE_KEYS = "SPECPIPE_CURVE_KEYS"  # --curve-keys DIR on every process (specpipe/curve.py)


def zmq_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}" if port else f"tcp://{host}:*"


def parse_cpus(spec: str) -> set[int]:
    """A CPU list as taskset and cgroups write it ("0", "0-3", "0,2,4-5") -> the CPU numbers."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or (last and int(last) < int(first)):
            raise ValueError(f"bad CPU list {spec!r}: want numbers and ranges such as 0 or 0-3,6")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def pin_cpus(spec: str) -> None:
    """Pin this process (its threads so far, and so every thread it starts) to the CPUs in `spec`;
    "" = leave it. One core per process keeps the draft, the target and the coordinator from
    taking turns on the same core when a host has few (Linux only).

    The kernel decides what is allowed (the CPUs online in this process's cpuset), not the
    affinity this process inherited: a worker restarted by a pinned coordinator inherits the
    coordinator's CPU and must still be able to move to its own."""
    if not spec:
        return
    cpus = parse_cpus(spec)
    try:
        for thread in _own_threads():  # threads started before (torch's, at import) as well
            os.sched_setaffinity(int(thread), cpus)
    except OSError as err:
        raise ValueError(
            f"CPU list {spec!r} names CPUs outside the ones this host lets it use ({_cpuset_text()}): {err.strerror}"
        ) from None


def add_niceness(amount: int) -> None:
    """Raise this process's niceness by `amount` (0: leave it): its threads so far, and so every
    thread it starts (Linux keeps one per thread). Raising it needs no privilege."""
    if not amount:
        return
    for thread in _own_threads():  # threads started before (torch's, at import) as well
        try:
            now = os.getpriority(os.PRIO_PROCESS, int(thread))
            os.setpriority(os.PRIO_PROCESS, int(thread), now + amount)
        except ProcessLookupError:  # ended meanwhile
            continue


def _own_threads() -> list[str]:
    """This process's thread ids (Linux); ["0"], this thread, where /proc has none."""
    return os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]


def _cpuset_text() -> str:
    """The CPUs this process may be moved to, as the cgroup writes them (best effort)."""
    for path in (
        "/sys/fs/cgroup/cpuset.cpus.effective",
        "/sys/fs/cgroup/cpuset/cpuset.effective_cpus",
        "/sys/devices/system/cpu/online",
    ):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return f"0-{(os.cpu_count() or 1) - 1}"


POLICIES = ("fixed", "confidence", "adaptive", "predictor")  # the kinds (coordinator/policy.py explains each)
WEIGHT_LAYOUTS = ("auto", "row", "column", "both")  # WorkerConfig.weight_layout
IDLE_DECODE = ("auto", "on", "off")  # PolicyConfig.idle_decode


@dataclass(frozen=True)
class PolicyConfig:
    """The draft-length and branch policy (`--policy` and its flags; coordinator/policy.py)."""

    kind: str = "adaptive"
    # Block length (the most, for `adaptive` / `predictor`). 8: on the demo pair, one greedy client,
    # A/B against 6: specbranch 1.09x, sequential 1.13x, pipelined 1.02x; T=1 specbranch 1.05x;
    # 8 and 16 clients 1.00x (the adaptive policy cuts shorter where longer does not pay).
    num_draft_tokens: int = 8
    min_confidence: float = 0.3  # end a block after a token less likely than this
    branch_width: int = 2  # most alternatives forked at a branch point
    # Skip candidates the draft itself finds this unlikely: `min_branch_prob` while the target's
    # batches hold other requests, `min_branch_prob_alone` while a request has the workers to itself.
    # (On the demo pair 0.02 lets 71% of greedy rejections meet a branch holding the target's token,
    # against 49% at 0.1, and serves one request 1.08x faster; but at 8-16 clients its extra forks
    # cost the shared draft 5-11% of throughput.)
    min_branch_prob: float = 0.1
    min_branch_prob_alone: float = 0.02
    branch_confidence: float | None = None  # specbranch: fork at a draft token less likely; None: learnt
    # Tokens an alternative branch drafts past its fork point: its prepared block's length. 8 (a
    # main-line block's) against 4 on the demo pair, served A/Bs, specbranch: one greedy client
    # 1.06x and 1.04x (both orders; 10% fewer verifications for the same tokens), temperature 1
    # 1.02x, 8 clients 0.98x / 1.00x, 16 clients 0.98x / 1.00x; greedy bench (5 trials each, one
    # hour): specbranch over sequential 1.16x and 1.14x against 1.07x at 4.
    branch_lookahead: int = 8
    max_branches: int = 4  # live alternative branches per request
    main_lookahead: int | None = None  # specbranch: main drafts this far past its first unsure token; None: no cap
    # specbranch: queue each drafted branch on the target behind the block holding its fork point,
    # verified there the moment the verdict emits the branch's token (no round trip through us).
    prepare_branch_blocks: bool = True
    # specbranch, while a request has the workers to itself: when the main line's next block is short
    # of full and has room on the target, at most this many forks draft beside it (the nearest fork
    # points first; the rest pause: each fork's row slows the main line's draft step). None: no cap.
    # Demo pair, one greedy client, served A/Bs against no cap: 2: 1.03-1.05x (four runs of 14-40
    # trials); 1: 1.02x; 0: 0.95x; 3: 0.97x; T=1, 2: 1.02x. Not with other requests in the batches:
    # there a request's own forks are a small share of a shared draft step (6 clients: 0.97x).
    urgent_fork_rows: int | None = 2
    # Speculative modes: the target decodes by itself where it would wait for a block. At a
    # request's start (auto: pipelined modes while the target's batches hold few requests,
    # sequential always; on) the prompt's forward decodes the first token, instead of a pipelined
    # prompt held for the draft's first block (off): demo pair, one greedy client, time to the first
    # token specbranch 27 -> 22 ms, sequential 41 -> 24 ms (the autoregressive mode's: 22), tokens/s
    # 0.995x and 1.003x. Also under the default sampling rule (the decoded token is the target's own
    # draw; a seeded request's always, whatever the load, so that its seed alone fixes it): T=1
    # unseeded, specbranch 22.8 -> 17.2 ms, sequential 22.7 -> 15.9 ms (autoregressive 15.5),
    # tokens/s 1.05x and 1.035x against off; seeded specbranch 1.05x. Pipelined modes, greedy and
    # drafter-invariant, after a rejection nothing foresaw, until the redrafted block comes: auto
    # (when the measured redraft takes longer than a one-token forward), on. A/B of that against off
    # (launch/bench/ab.py): 0.991x with the draft on this host (it never fills there: noise), 1.016x
    # behind a 5 ms and 1.023x behind a 10 ms one-way link (every round above 1.0).
    idle_decode: str = "auto"
    # Pipelined modes, behind a block in flight: the draft holds its tokens until the schedule acts
    # on them (the job's end, or a step before the next block is cut; Draft.report_in_s) and reports
    # them in one message, instead of one per step: each report wakes this process on the draft's
    # core (0.30 ms of a draft step cycle of 1.2 ms went to it, one greedy client, Intel Xeon).
    hold_draft_reports: bool = True

    def __post_init__(self):
        assert self.kind in POLICIES, f"policy kind must be one of {POLICIES}"
        assert self.idle_decode in IDLE_DECODE, f"idle_decode must be one of {IDLE_DECODE}"
        assert self.num_draft_tokens >= 1, "num_draft_tokens must be >= 1"
        assert self.branch_lookahead >= 0 and self.max_branches >= 0, "branch budget must be >= 0"
        assert self.urgent_fork_rows is None or self.urgent_fork_rows >= 0, "urgent_fork_rows must be >= 0"
        assert self.main_lookahead is None or self.main_lookahead >= 0, "main_lookahead must be >= 0"


@dataclass(frozen=True)
class WorkerConfig:
    """A draft or target worker process."""

    role: str  # "draft" or "target"
    model: str  # folder or hub id
    bind: str  # ZeroMQ endpoint to bind: tcp://127.0.0.1:50061 (port * = any), ipc:///DIR/draft.sock
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int = 1  # torch threads: one core per worker so both run in parallel
    # How each Linear's weight is laid out in memory (specpipe/models.py, use_weight_layout): auto
    # is column-major on the CPU (target and draft), row-major on GPUs.
    weight_layout: str = "auto"
    exit_with_parent: bool = False
    transport: str = "zmq"  # data plane for the draft's q: zmq or torch (torch.distributed)
    data_bind: str = ""  # target, zmq: endpoint of its data-plane socket
    target_data_addr: str = ""  # draft, zmq: the target's data-plane endpoint
    dist_timeout_s: float = 60.0
    use_predictor: bool = True  # target: load the acceptance-length predictor beside the model, if any
    curve_keys: str = ""  # CURVE key folder (specpipe/curve.py): secure the sockets; "" = plain
    insecure_internal: bool = False  # allow a non-loopback endpoint without curve_keys (launch/endpoints.py)
    cpus: str = ""  # CPU list to pin the process to ("0", "2-3"); "" = wherever the OS puts it
    nice: int = 0  # added to the process's niceness at start (0..19): yield the CPU to the coordinator
    # The KV store (specpipe/kv_store.py): sequences it holds (target: requests; draft: branches)
    # and positions per sequence (0 = the model's context length).
    kv_slots: int = 0  # 0 = DEFAULT_TARGET_SLOTS / DEFAULT_DRAFT_SLOTS
    max_seq_len: int = 0
    # Target batching (target_worker/engine.py BatchLimits).
    max_batch_tokens: int = 512
    max_batch_requests: int = 64
    prefill_chunk: int = 128
    drafter: str = "model"  # draft: model (a causal LM) or ngram (prompt lookup, no model)
    # Draft: the factor on a sampled request's temperature the draft proposes at
    # (specpipe/proposal.py); None = the table beside the draft's weights, or 1 without one.
    temperature_scale: float | None = None


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator (gRPC server)."""

    target_model: str  # for the tokenizer and the context length
    draft_addr: str  # ZeroMQ endpoint of the draft worker
    target_addr: str  # ZeroMQ endpoint of the target worker
    # ("" for either: a worker `specpipe serve` spawns after the gRPC server is up; it is attached
    # with WorkerClient.connect once its endpoint is known.)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_GRPC_PORT
    default_mode: Mode = Mode.SPECBRANCH
    # Longest generation a request may ask for; documented in the README.
    max_new_tokens_cap: int = 4096
    # Draft-length and branch policy (coordinator/policy.py).
    policy: PolicyConfig = PolicyConfig()
    # Heartbeat: ping each worker this often; declare it dead after this long without an answer.
    heartbeat_interval_s: float = 0.25
    heartbeat_timeout_s: float = 1.5
    # Admission (coordinator/admission.py): requests running at once, waiting in the FIFO queue
    # beyond that (more: RESOURCE_EXHAUSTED), and the sum of prompt + max_new_tokens over running
    # requests (0 = no limit: concurrency x context length bounds it anyway).
    max_concurrent_requests: int = 32
    max_queued_requests: int = 256
    max_tokens_in_flight: int = 0
    # Security (coordinator/auth.py): a file holding the bearer token every non-health RPC must
    # carry (empty: no token); a PEM certificate chain and key to serve TLS (empty: plain text).
    auth_token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Prometheus endpoint on `host` (coordinator/metrics.py): None = off, 0 = any free port.
    metrics_port: int | None = None
    # grpc.health.v1 alone, plain text, on `host` (probes that cannot speak TLS): None = off, 0 = any.
    health_port: int | None = None
    # Start-up: the target must answer within this many seconds (0 = no limit), else serve exits;
    # past the draft's, serve warns and goes on target-only until the draft answers (0 = never warn).
    target_startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    draft_startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    # The OpenAI-compatible HTTP API on `host` (coordinator/http.py): None = off, 0 = any free port.
    # It shares the admission limits, auth token and TLS above with the gRPC port.
    http_port: int | None = None
    served_model_name: str = ""  # the model name HTTP clients see and send; "" = target_model
    chat_template: str = ""  # a Jinja chat template's text (--chat-template FILE); "" = the tokenizer's
    log_format: str = "text"  # text | json (one JSON object per line)
    # CURVE key folder (specpipe/curve.py): the DEALERs to the workers connect as CURVE clients; "" = plain.
    curve_keys: str = ""


def parse_scale(text: str) -> float | None:
    """A draft temperature scale flag: None for "auto" (the table beside the draft's weights,
    specpipe/proposal.py), else a factor > 0."""
    if text == "auto":
        return None
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the draft temperature scale must be 'auto' or a number > 0, got {text!r}")
    return scale
