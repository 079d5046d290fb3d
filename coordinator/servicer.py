"""The public gRPC service (DESIGN §7): admission, streaming, stats; each request validated by
coordinator/validation.py.

The servicer holds references to the tokenizer, the two worker clients, the admission queue and
the counters. A request's whole life is one transport-neutral coroutine, `execute`: build a
RequestPlan (`plan_request`), wait for admission, run the plan through a RequestRun and hand each
committed chunk (a GenerateResponse) to the transport's `send`. Both public transports call it: gRPC's
`Generate` here, and the OpenAI-compatible HTTP API (coordinator/openai_api.py), so they share one
admission queue, one set of limits and one set of counters and metrics.

A request that ends without finishing raises `Refused` with a canonical status name (google.rpc's
codes, which gRPC's StatusCode spells), counted once in `execute`; each transport maps it once to
its own status (`Generate` below: a gRPC status). A client that goes away cancels the transport's
task: a queued request leaves the queue, a running one is released on both workers (the `finally`
around the run), and the call is counted as the transport says (`gone`: CANCELLED or
DEADLINE_EXCEEDED).

Every log line about a request goes through `RequestLog`: `[request_id] message` in text, and the
id as the record's `request_id` attribute for structured (JSON) logs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
from grpc._cython import cygrpc

from specpipe.coordinator.admission import Admission, AdmissionLimits, Overloaded
from specpipe.coordinator.metrics import ServerMetrics
from specpipe.coordinator.acceptance_model import AcceptanceModel
from specpipe.coordinator.scheduler import RequestPlan, RequestRun, open_channel
from specpipe.coordinator.schedules import RunStats
from specpipe.coordinator.text import PromptEncoder, TextStream
from specpipe.coordinator.validation import InvalidRequest, ServingLimits, plan_request
from specpipe.coordinator.workers import WorkerClient, WorkerDown, WorkerFailed
from specpipe.modes import Mode
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc

logger = logging.getLogger(__name__)

# A gRPC client's own deadline timer fires, and cancels the call, a little before the server's
# (which starts when the request arrives, from the time the client had left): a call cancelled
# this close to its deadline expired.
DEADLINE_SLACK_S = 0.25


class Refused(Exception):
    """The request ended without finishing. `status` is its canonical code (INVALID_ARGUMENT,
    ALREADY_EXISTS, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL); the message says why, naming the
    field for INVALID_ARGUMENT. Already counted when raised; each transport only maps it."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


# What a transport says about a client that went away: "CANCELLED" or "DEADLINE_EXCEEDED".
Gone = Callable[[], str]
Send = Callable[[specpipe_pb2.GenerateResponse], Awaitable[None]]


class RequestLog(logging.LoggerAdapter):
    """A logger for one request: prefixes `[request_id] ` and sets `record.request_id`."""

    def __init__(self, base: logging.Logger, request_id: str):
        super().__init__(base, {"request_id": request_id})

    def process(self, msg, kwargs):
        kwargs["extra"] = {**kwargs.get("extra", {}), **self.extra}
        return f"[{self.extra['request_id']}] {msg}", kwargs


class Chunks:
    """A request's committed chunks not sent yet, in order. `take` waits for one and merges every
    chunk behind it into it (their tokens and text in order, the last one's finish and stats): a
    client whose stream is slower than the schedule gets fewer, larger messages, never a
    backlog."""

    def __init__(self):
        self.waiting: collections.deque[specpipe_pb2.GenerateResponse] = collections.deque()
        self.error: BaseException | None = None
        self.ended = False
        self.changed = asyncio.Event()

    def put(self, response: specpipe_pb2.GenerateResponse) -> None:
        self.waiting.append(response)
        self.changed.set()

    def fail(self, error: BaseException) -> None:
        """The run failed: `take` raises `error` once the chunks before it are taken."""
        self.error = error
        self.changed.set()

    def end(self) -> None:
        """The run ended: `take` returns None once the chunks before it are taken."""
        self.ended = True
        self.changed.set()

    async def take(self) -> specpipe_pb2.GenerateResponse | None:
        while not self.waiting:
            if self.error is not None:
                raise self.error
            if self.ended:
                return None
            self.changed.clear()
            await self.changed.wait()
        response = self.waiting.popleft()
        while self.waiting:
            later = self.waiting.popleft()
            response.token_ids.extend(later.token_ids)
            response.text += later.text
            response.finish_reason = later.finish_reason
            if later.HasField("stats"):
                response.stats.CopyFrom(later.stats)
        return response


class SpecPipeServicer(specpipe_pb2_grpc.SpecPipeServicer):
    def __init__(
        self,
        tokenizer,
        limits: ServingLimits,
        draft: WorkerClient,
        target: WorkerClient,
        admission: Admission | None = None,
        metrics: ServerMetrics | None = None,
    ):
        self.tokenizer, self.limits = tokenizer, limits
        self.encoder = PromptEncoder(tokenizer, limits.context_length)
        self.draft, self.target = draft, target
        self.admission = admission or Admission(AdmissionLimits(max_concurrent_requests=32, max_queued_requests=256))
        self.metrics = metrics or ServerMetrics(self.admission, (draft, target))
        # What the adaptive policy learns (acceptance rate, step costs) carries across requests.
        self.acceptance = AcceptanceModel()
        self.live: dict[str, RequestRun] = {}
        self.request_ids: set[str] = set()  # queued or live: a second request may not reuse one
        self.totals = RunStats()
        self.totals_generated = 0
        self.finished: Counter = Counter()

    # -- validation -----------------------------------------------------------------------------
    # -- the request lifecycle, for every transport --------------------------------------------
    async def execute(
        self, request: specpipe_pb2.GenerateRequest, send: Send, gone: Gone = lambda: "CANCELLED"
    ) -> RequestPlan:
        """Validate, admit and run one request, awaiting `send(response)` for each chunk (the last
        carries finish_reason and stats); returns its plan (the prompt's token ids: usage).
        Raises Refused (counted); a cancellation propagates, counted as `gone()`.

        A coroutine that sends, not an async generator that yields: a cancellation (client gone,
        deadline) then always lands inside it, wherever it waits, and the `finally` clauses below
        run at once instead of whenever an abandoned generator is collected."""
        arrived = time.monotonic()
        try:
            plan, stop = await plan_request(request, self.limits, self.encoder)
        except InvalidRequest as err:
            raise self._refused("INVALID_ARGUMENT", str(err)) from None
        log = RequestLog(logger, plan.request_id)
        if plan.request_id in self.request_ids:
            raise self._refused("ALREADY_EXISTS", f"request_id {plan.request_id!r} is already running")
        if not self.target.healthy:
            raise self._refused("UNAVAILABLE", "the target worker is unavailable")
        cost = len(plan.prompt_ids) + plan.max_new_tokens
        self.request_ids.add(plan.request_id)
        try:
            try:
                queued_s = await self.admission.acquire(cost)
            except Overloaded as err:
                log.warning("refused: %s", err)
                raise self._refused("RESOURCE_EXHAUSTED", str(err)) from None
            except asyncio.CancelledError:
                self._count_gone(gone(), log, "while queued")
                raise
            try:
                self.metrics.observe_admitted(len(plan.prompt_ids), queued_s)
                await self._run(plan, stop, arrived, log, send, gone)
            finally:
                self.admission.release(cost)
        finally:
            self.request_ids.discard(plan.request_id)
        return plan

    def count_failure(self, status: str) -> None:
        """A request that ended with `status`, in GetStats' `finished` and the metrics (also for
        refusals a transport makes before `execute`: an HTTP body that is not a request)."""
        self.finished[status.lower()] += 1
        self.metrics.observe_failure(status)

    def _refused(self, status: str, message: str) -> Refused:
        self.count_failure(status)
        return Refused(status, message)

    def _count_gone(self, status: str, log: RequestLog, where: str) -> None:
        """The client went away (cancelled, or its deadline passed)."""
        self.count_failure(status)
        log.info("%s %s", status.lower(), where)

    async def _run(
        self, plan: RequestPlan, stop: list[str], arrived: float, log: RequestLog, send: Send, gone: Gone
    ) -> None:
        run = RequestRun(plan, open_channel(plan, self.draft, self.target), self.acceptance)
        self.live[plan.request_id] = run
        log.info(
            "started: %d prompt tokens, max_new_tokens=%d, mode=%s, temperature=%g",
            len(plan.prompt_ids),
            plan.max_new_tokens,
            plan.mode,
            plan.sampling.temperature,
        )
        finish_reason = ""
        # The run commits chunks in a task of its own, and this one sends them: a schedule never
        # waits on a client's stream (a gRPC write costs ~0.3-0.5 ms here, and the schedule's next
        # block would wait behind it); what piles up meanwhile goes as one message.
        chunks = Chunks()
        producer = asyncio.create_task(self._produce(run, stop, arrived, chunks))
        try:
            while not finish_reason and (response := await chunks.take()) is not None:
                await send(response)
                finish_reason = response.finish_reason
        except (WorkerDown, WorkerFailed) as err:
            log.error("failed: %s", err)
            raise self._refused("UNAVAILABLE" if isinstance(err, WorkerDown) else "INTERNAL", str(err)) from None
        except asyncio.CancelledError:
            self._count_gone(gone(), log, "while running")
            raise
        except Exception as err:  # a bug: say so, as INTERNAL with the request id to find the log
            log.exception("failed unexpectedly")
            raise self._refused(
                "INTERNAL", f"internal error ({type(err).__name__}) in request {plan.request_id}"
            ) from None
        finally:
            # Cancelled before the release, it sends nothing after it (nothing in a schedule catches
            # a cancellation); not awaited: a second cancellation of this task (the client's, after
            # a failed write) must not skip the release.
            producer.cancel()
            del self.live[plan.request_id]
            await run.release()
            self.metrics.observe_run(run.stats)
            if finish_reason:
                self.finished[finish_reason] += 1
                self.metrics.observe_success(finish_reason, time.monotonic() - arrived)
                log.info("finished: %s", finish_reason)

    # -- Generate -------------------------------------------------------------------------------
    async def Generate(self, request, context):
        def gone() -> str:
            remaining = context.time_remaining()
            return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"

        async def send(response: specpipe_pb2.GenerateResponse) -> None:
            try:
                await context.write(response)
            except Exception as err:
                # The client went away, or its deadline passed, while the write waited on it (a
                # write the call refuses, ExecuteBatchError, is that too: the call is over, the
                # client's cancel not yet seen here).
                if context.cancelled() or gone() == "DEADLINE_EXCEEDED" or isinstance(err, cygrpc.ExecuteBatchError):
                    raise asyncio.CancelledError from None
                raise

        try:
            await self.execute(request, send, gone)
        except Refused as err:
            await context.abort(grpc.StatusCode[err.status], str(err))

    async def _produce(self, run: RequestRun, stop: list[str], arrived: float, chunks: Chunks) -> None:
        """Run the request, handing each chunk to `chunks` (and a failure, to be raised where
        they are taken)."""
        try:
            async for response in self._stream(run, stop, arrived):
                chunks.put(response)
            await run.release()  # the run is over: its KV slots go now, however slowly the client reads
            chunks.end()
        except BaseException as err:  # (cancelled from outside too: the sender must not wait on)
            chunks.fail(err)
            if not isinstance(err, Exception):
                raise

    async def _stream(self, run: RequestRun, stop: list[str], arrived: float):
        plan = run.plan
        text = TextStream(self.tokenizer, plan.prompt_ids, stop)
        eos = self.tokenizer.eos_token_id
        generated: list[int] = []
        first_token_at = last_chunk_at = None
        async for new_tokens in run.tokens():
            now = time.monotonic()
            first_token_at = first_token_at or now
            finish = ""
            new_tokens = new_tokens[: plan.max_new_tokens - len(generated)]
            if eos is not None and eos in new_tokens:
                new_tokens = new_tokens[: new_tokens.index(eos) + 1]
                finish = "eos"
            generated += new_tokens
            if not finish and len(generated) >= plan.max_new_tokens:
                finish = "length"
            chunk = text.push(new_tokens, final=bool(finish))
            if text.stopped:
                finish = "stop"
            response = specpipe_pb2.GenerateResponse(request_id=plan.request_id, token_ids=new_tokens, text=chunk)
            self.metrics.observe_chunk(
                len(new_tokens), now - arrived, None if last_chunk_at is None else now - last_chunk_at
            )
            last_chunk_at = now
            if finish:
                response.finish_reason = finish
                response.stats.CopyFrom(self._request_stats(run, len(generated), first_token_at, arrived))
                self._add_totals(run.stats, len(generated))
                yield response
                return
            yield response

    def _request_stats(
        self, run: RequestRun, generated: int, first_token_at: float, arrived: float
    ) -> specpipe_pb2.RequestStats:
        now = time.monotonic()
        stats = stats_message(run.stats, generated)
        stats.time_to_first_token_s = first_token_at - arrived
        stats.tokens_per_second = generated / max(now - arrived, 1e-9)
        stats.mode = Mode(run.plan.mode).proto
        stats.target_busy_fraction = min(1.0, run.stats.target_seconds / max(now - run.started, 1e-9))
        return stats

    def _add_totals(self, stats: RunStats, generated: int) -> None:
        self.totals.add(stats)
        self.totals_generated += generated

    # -- GetStats -------------------------------------------------------------------------------
    async def GetStats(self, request, context):
        response = specpipe_pb2.StatsResponse(
            live_requests=len(self.live), default_mode=Mode(self.limits.default_mode).proto
        )
        for worker in (self.draft, self.target):
            # A fresh count (so "0 live" is current), unless the worker is known to be down.
            pong = (await worker.ping(timeout=1.0) if worker.healthy else None) or worker.last_pong
            stats = response.workers.add(
                role=worker.role, healthy=worker.healthy, status="ok" if worker.healthy else "unavailable"
            )
            if pong is not None:
                stats.pid = pong.pid
                stats.busy_fraction = pong.busy_seconds / max(pong.uptime_seconds, 1e-9)
            stats.live_requests, stats.live_branches = worker.live_counts()  # 0 while down
            stats.forwards, stats.forward_rows, stats.forward_tokens = (
                worker.forwards,
                worker.forward_rows,
                worker.forward_tokens,
            )
            if pong is not None and worker.healthy:
                stats.kv_slots, stats.kv_slots_used, stats.kv_slot_len = (
                    pong.kv_slots,
                    pong.kv_slots_used,
                    pong.kv_slot_len,
                )
                stats.last_batch_rows, stats.last_batch_tokens = pong.last_batch_rows, pong.last_batch_tokens
                stats.setup.extend(pong.setup)
        response.totals.CopyFrom(stats_message(self.totals, self.totals_generated))
        response.finished.update(self.finished)
        response.status = server_status(self.draft.healthy, self.target.healthy)
        response.policy.CopyFrom(self._policy_state())
        return response

    def _policy_state(self) -> specpipe_pb2.PolicyState:
        model, config = self.acceptance, self.limits.policy
        learnt = config.branch_confidence is None
        hit_rates = [model.fork_hit_rate(greedy) for greedy in (True, False)]
        return specpipe_pb2.PolicyState(
            acceptance_rate=model.rate(True),
            sampled_acceptance_rate=model.rate(False),
            draft_step_s=model.t_draft or 0.0,
            verify_s=model.verify_seconds(config.num_draft_tokens + 1) or 0.0,
            branch_threshold=model.branch_threshold(True) if learnt else config.branch_confidence,
            sampled_branch_threshold=model.branch_threshold(False) if learnt else config.branch_confidence,
            branch_threshold_learnt=learnt,
            rejections_seen=len(model.rejected_probs[True]),
            fork_hit_rate=-1.0 if hit_rates[0] is None else hit_rates[0],
            sampled_fork_hit_rate=-1.0 if hit_rates[1] is None else hit_rates[1],
        )


def stats_message(stats: RunStats, generated: int) -> specpipe_pb2.RequestStats:
    """The counters of RunStats as the public RequestStats (one request's, or the totals)."""
    return specpipe_pb2.RequestStats(
        drafted_tokens=stats.drafted_tokens,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        rolled_back_tokens=stats.rolled_back_tokens,
        verifications=stats.verifications,
        branches_forked=stats.branches_forked,
        branches_hit=stats.branches_hit,
        rejections=stats.rejections,
        main_rolled_back_tokens=stats.main_rolled_back_tokens,
        rejections_at_fork=stats.rejections_at_fork,
        branch_rank_tried=stats.rank_tried,
        branch_rank_hits=stats.rank_hits,
        prepared_hits=stats.prepared_hits,
        filled_tokens=stats.filled_tokens,
        kept_tokens=stats.kept_tokens,
        generated_tokens=generated,
        mean_accepted_length=sum(stats.committed_per_verification) / max(stats.verifications, 1),
        acceptance_rate=stats.accepted_tokens / stats.draft_tokens if stats.draft_tokens else 0.0,
        batch_wait_s=stats.queue_seconds,
    )


def server_status(draft_healthy: bool, target_healthy: bool) -> str:
    """What GetStats and the metrics say about the whole server."""
    if not target_healthy:
        return "unavailable: target down"
    return "ok" if draft_healthy else "degraded: draft unavailable"
