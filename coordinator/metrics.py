"""Prometheus metrics of one coordinator, served over HTTP (`specpipe serve --metrics-port`).

Names follow vLLM's conventions under a `specpipe:` prefix, so dashboards built for vLLM carry
over: `specpipe:num_requests_running`, `specpipe:request_success_total{finished_reason}`,
`specpipe:time_to_first_token_seconds`, `specpipe:spec_decode_num_accepted_tokens_total`, ...
(the full list is METRIC_NAMES below, each with its help text where it is declared).

Two sources:
- the servicer calls the `observe_*` methods as requests queue, stream and end;
- at scrape time a collector reads the admission counters and each worker client's health and
  last heartbeat (`WorkerClient.healthy`, `.last_pong`), so gauges are never stale by more than one
  heartbeat and nothing polls in between.

Each `ServerMetrics` has its own CollectorRegistry (never prometheus_client's global one), so
several servers can live in one process (tests). The HTTP endpoint is plain, unauthenticated
HTTP on the gRPC host: Prometheus' usual model; keep that host private.

This module knows nothing of gRPC, requests' contents or models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "specpipe:"
# Latency buckets in seconds: vLLM's TTFT buckets, cut to what a CPU deployment still resolves.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)

METRIC_NAMES = [
    "specpipe:num_requests_running",
    "specpipe:num_requests_waiting",
    "specpipe:num_tokens_in_flight",
    "specpipe:request_success_total",
    "specpipe:request_failure_total",
    "specpipe:prompt_tokens_total",
    "specpipe:generation_tokens_total",
    "specpipe:time_to_first_token_seconds",
    "specpipe:inter_token_latency_seconds",
    "specpipe:e2e_request_latency_seconds",
    "specpipe:request_queue_time_seconds",
    "specpipe:spec_decode_num_drafts_total",
    "specpipe:spec_decode_num_draft_tokens_total",
    "specpipe:spec_decode_num_accepted_tokens_total",
    "specpipe:spec_decode_num_rolled_back_tokens_total",
    "specpipe:spec_decode_num_committed_tokens_total",
    "specpipe:spec_decode_branches_forked_total",
    "specpipe:spec_decode_branches_hit_total",
    "specpipe:spec_decode_num_rejections_total",
    "specpipe:spec_decode_num_main_rolled_back_tokens_total",
    "specpipe:spec_decode_num_rejections_at_fork_total",
    "specpipe:spec_decode_branch_rank_tried_total",
    "specpipe:spec_decode_branch_rank_hits_total",
    "specpipe:spec_decode_num_prepared_hits_total",
    "specpipe:spec_decode_num_filled_tokens_total",
    "specpipe:spec_decode_num_kept_tokens_total",
    "specpipe:mean_acceptance_length",
    "specpipe:worker_healthy",
    "specpipe:worker_busy_fraction",
    "specpipe:worker_busy_seconds_total",
    "specpipe:worker_live_requests",
    "specpipe:live_branches",
    "specpipe:worker_batch_rows",
    "specpipe:worker_batch_tokens",
    "specpipe:batch_wait_seconds",
]
# Rows (target: requests, draft: branches) and tokens fed per batched forward.
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024)


class _LiveCollector(Collector):
    """Gauges read at scrape time (from the HTTP server's thread: plain attribute reads only)."""

    def __init__(self, metrics: "ServerMetrics", admission, workers: Sequence):
        self.metrics, self.admission, self.workers = metrics, admission, workers

    def collect(self):
        admission = self.admission
        yield GaugeMetricFamily(
            PREFIX + "num_requests_running", "Requests admitted and not yet finished.", value=admission.running
        )
        yield GaugeMetricFamily(
            PREFIX + "num_requests_waiting", "Requests queued for admission.", value=admission.waiting
        )
        yield GaugeMetricFamily(
            PREFIX + "num_tokens_in_flight",
            "Sum of prompt + max_new_tokens over the running requests.",
            value=admission.tokens_in_flight,
        )
        verifications, committed = self.metrics.total_verifications, self.metrics.total_committed
        yield GaugeMetricFamily(
            PREFIX + "mean_acceptance_length",
            "Tokens committed per target verification over all requests so far "
            "(accepted draft tokens + the target's own token; 1 = no speed-up).",
            value=committed / verifications if verifications else 0.0,
        )
        healthy = GaugeMetricFamily(
            PREFIX + "worker_healthy", "1 while the worker answers heartbeats.", labels=["role"]
        )
        busy = GaugeMetricFamily(
            PREFIX + "worker_busy_fraction",
            "Fraction of the worker's uptime spent computing (last heartbeat).",
            labels=["role"],
        )
        busy_seconds = CounterMetricFamily(
            PREFIX + "worker_busy_seconds",
            "Seconds the worker spent computing since it started (last heartbeat).",
            labels=["role"],
        )
        live_requests = GaugeMetricFamily(
            PREFIX + "worker_live_requests", "Requests with state on the worker.", labels=["role"]
        )
        live_branches = GaugeMetricFamily(
            PREFIX + "live_branches", "Branches (draft) or caches (target) the worker holds.", labels=["role"]
        )
        for worker in self.workers:
            pong = worker.last_pong
            healthy.add_metric([worker.role], 1.0 if worker.healthy else 0.0)
            if pong is not None:
                busy.add_metric([worker.role], pong.busy_seconds / max(pong.uptime_seconds, 1e-9))
                busy_seconds.add_metric([worker.role], pong.busy_seconds)
            requests, branches = worker.live_counts()  # 0 while down: never a phantom count
            live_requests.add_metric([worker.role], requests)
            live_branches.add_metric([worker.role], branches)
        yield from (healthy, busy, busy_seconds, live_requests, live_branches)


class ServerMetrics:
    def __init__(self, admission, workers: Sequence):
        self.registry = registry = CollectorRegistry()
        self._http = None
        self.total_verifications = self.total_committed = 0  # for mean_acceptance_length

        def counter(name, doc, labels=()):
            return Counter(PREFIX + name, doc, labelnames=labels, registry=registry)

        self.success = counter(
            "request_success", "Requests that finished with output, by finish_reason.", ["finished_reason"]
        )
        self.failure = counter(
            "request_failure",
            "Requests that ended with an error status, by gRPC code name "
            "(CANCELLED, DEADLINE_EXCEEDED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...; HTTP "
            "refusals under the same names).",
            ["code"],
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens streamed to clients.")
        self.num_drafts = counter(
            "spec_decode_num_drafts", "Target verifications (one per block; per token in autoregressive mode)."
        )
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens that reached a verification.")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens the target accepted.")
        self.rolled_back_tokens = counter(
            "spec_decode_num_rolled_back_tokens",
            "Draft tokens drafted and then thrown away (rolled back on the draft).",
        )
        self.committed_tokens = counter(
            "spec_decode_num_committed_tokens", "Tokens committed by verifications (accepted + the target's own)."
        )
        self.branches_forked = counter("spec_decode_branches_forked", "Alternative draft branches forked.")
        self.branches_hit = counter("spec_decode_branches_hit", "Forked branches promoted by a verdict.")
        self.rejections = counter("spec_decode_num_rejections", "Verifications that rejected a draft token.")
        self.main_rolled_back_tokens = counter(
            "spec_decode_num_main_rolled_back_tokens",
            "Main-line draft tokens thrown away by rejections (the rejected one and those drafted past it).",
        )
        self.rejections_at_fork = counter(
            "spec_decode_num_rejections_at_fork", "Rejections at a position where alternative branches were forked."
        )
        self.prepared_hits = counter(
            "spec_decode_num_prepared_hits",
            "Verifications of a block prepared for the previous verdict's outcome (no coordinator round trip).",
        )
        self.filled_tokens = counter(
            "spec_decode_num_filled_tokens",
            "Tokens the target decoded by itself while it waited for a redrafted block (--idle-decode).",
        )
        self.kept_tokens = counter(
            "spec_decode_num_kept_tokens",
            "Draft tokens committed without a verification accepting them (a promoted branch's first token, "
            "or one the target emitted or decoded by itself too).",
        )
        self.rank_tried = counter(
            "spec_decode_branch_rank_tried",
            "Rejections where an alternative branch of this rank (0: the draft's second choice) was forked there.",
            ["rank"],
        )
        self.rank_hits = counter(
            "spec_decode_branch_rank_hits",
            "Rejections where the alternative branch of this rank held the target's token (promoted).",
            ["rank"],
        )
        for by_rank in (self.rank_tried, self.rank_hits):
            by_rank.labels("0")  # exported at 0 from the start (the best alternative)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from arrival to the first token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Seconds per token after the first: the gap between two streamed chunks, divided "
            "over the chunk's tokens (a chunk holds one verification's tokens).",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Seconds from arrival to the last token of requests that finished with output.",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Seconds admitted requests waited in the admission queue.",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            PREFIX + "worker_batch_rows",
            "Rows per batched forward of a worker (target: requests; draft: branches).",
            ["role"],
            buckets=BATCH_ROW_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            PREFIX + "worker_batch_tokens",
            "Tokens fed per batched forward of a worker.",
            ["role"],
            buckets=BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self.batch_wait = Histogram(
            PREFIX + "batch_wait_seconds",
            "Seconds a request's work waited, ready, for a place in the target's batches (summed over the request).",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self._batch_children: dict[str, tuple] = {}  # role -> its (rows, tokens) histograms
        registry.register(_LiveCollector(self, admission, workers))

    # -- what the servicer reports ------------------------------------------------------------
    def observe_admitted(self, prompt_tokens: int, queue_seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.queue_time.observe(queue_seconds)

    def observe_chunk(self, num_tokens: int, since_arrival: float, since_last: float | None) -> None:
        """A streamed chunk of `num_tokens`; `since_last` is None for the first chunk."""
        if not num_tokens:
            return
        self.generation_tokens.inc(num_tokens)
        if since_last is None:
            self.ttft.observe(since_arrival)
            num_tokens -= 1
            since_last = 0.0
        for _ in range(num_tokens):
            self.itl.observe(since_last / max(num_tokens, 1))

    def observe_run(self, stats) -> None:
        """The draft/verify work of one request (finished or not): a scheduler RunStats."""
        committed = sum(stats.committed_per_verification)
        self.total_verifications += stats.verifications
        self.total_committed += committed
        self.num_drafts.inc(stats.verifications)
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted_tokens.inc(stats.accepted_tokens)
        self.rolled_back_tokens.inc(stats.rolled_back_tokens)
        self.committed_tokens.inc(committed)
        self.branches_forked.inc(stats.branches_forked)
        self.branches_hit.inc(stats.branches_hit)
        self.rejections.inc(stats.rejections)
        self.main_rolled_back_tokens.inc(stats.main_rolled_back_tokens)
        self.rejections_at_fork.inc(stats.rejections_at_fork)
        self.prepared_hits.inc(stats.prepared_hits)
        self.filled_tokens.inc(stats.filled_tokens)
        self.kept_tokens.inc(stats.kept_tokens)
        for rank, count in enumerate(stats.rank_tried):
            self.rank_tried.labels(str(rank)).inc(count)
        for rank, count in enumerate(stats.rank_hits):
            self.rank_hits.labels(str(rank)).inc(count)
        self.batch_wait.observe(stats.queue_seconds)

    def observe_batch(self, role: str, rows: int, tokens: int) -> None:
        """One batched forward of a worker (WorkerClient.on_batch: hundreds a second, so each role's
        labelled histograms are looked up once)."""
        children = self._batch_children.get(role)
        if children is None:
            children = self._batch_children[role] = (self.batch_rows.labels(role), self.batch_tokens.labels(role))
        children[0].observe(rows)
        children[1].observe(tokens)

    def observe_success(self, finished_reason: str, seconds: float) -> None:
        self.success.labels(finished_reason).inc()
        self.e2e.observe(seconds)

    def observe_failure(self, code_name: str) -> None:
        self.failure.labels(code_name).inc()

    # -- the HTTP endpoint ----------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = any free port); returns the port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_port
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
