"""The public gRPC service (DESIGN §7): validation, tokenisation, streaming, stats.

The servicer holds references to the tokenizer, the two worker clients and the counters; each
Generate call builds a RequestPlan, runs it through a RequestRun and streams what it commits.
Errors are mapped to gRPC status codes in one place (`_abort_for`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import grpc

from specpipe.coordinator.policy import PolicyConfig
from specpipe.coordinator.scheduler import RequestPlan, RequestRun, RunStats
from specpipe.coordinator.text import TextStream
from specpipe.coordinator.workers import WorkerClient, WorkerDown, WorkerFailed
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc
from specpipe.sampling import SamplingParams

logger = logging.getLogger(__name__)

MODES = {
    specpipe_pb2.MODE_AUTOREGRESSIVE: "autoregressive",
    specpipe_pb2.MODE_SEQUENTIAL: "sequential",
    specpipe_pb2.MODE_PIPELINED: "pipelined",
    specpipe_pb2.MODE_SPECBRANCH: "specbranch",
}
MODE_ENUMS = {name: value for value, name in MODES.items()}
# Limits on the small fields: generous for real use, small enough that a request cannot make
# the coordinator do unbounded work.
MAX_REQUEST_ID_CHARS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class InvalidRequest(ValueError):
    """A request field is wrong; the message names it."""


@dataclass(frozen=True)
class ServingLimits:
    vocab_size: int
    context_length: int
    max_new_tokens_cap: int
    default_mode: str
    policy: PolicyConfig


class SpecPipeServicer(specpipe_pb2_grpc.SpecPipeServicer):
    def __init__(self, tokenizer, limits: ServingLimits, draft: WorkerClient, target: WorkerClient):
        self.tokenizer, self.limits = tokenizer, limits
        self.draft, self.target = draft, target
        self.live: dict[str, RequestRun] = {}
        self.totals = RunStats()
        self.totals_generated = 0
        self.finished: Counter = Counter()

    # -- validation -----------------------------------------------------------------------------
    def plan(self, request: specpipe_pb2.GenerateRequest) -> tuple[RequestPlan, list[str]]:
        limits = self.limits
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
        if bool(request.prompt) == bool(request.prompt_ids):
            raise InvalidRequest("exactly one of prompt / prompt_ids must be set")
        if request.prompt:
            prompt_ids = self.tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
            if not prompt_ids:
                raise InvalidRequest("prompt tokenizes to no tokens")
        else:
            prompt_ids = list(request.prompt_ids)
            for index, token_id in enumerate(prompt_ids):
                if not 0 <= token_id < limits.vocab_size:
                    raise InvalidRequest(f"prompt_ids[{index}] = {token_id} is outside the vocabulary "
                                         f"[0, {limits.vocab_size})")
        if request.max_new_tokens == 0:
            raise InvalidRequest("max_new_tokens is required and must be >= 1")
        if request.max_new_tokens > limits.max_new_tokens_cap:
            raise InvalidRequest(f"max_new_tokens = {request.max_new_tokens} exceeds the server's cap of "
                                 f"{limits.max_new_tokens_cap}")
        if len(prompt_ids) + request.max_new_tokens > limits.context_length:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                                 f"({request.max_new_tokens}) exceeds the model context of "
                                 f"{limits.context_length} tokens")
        if not math.isfinite(request.temperature) or request.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {request.temperature}")
        if not math.isfinite(request.top_p) or not 0 <= request.top_p <= 1:
            raise InvalidRequest(f"top_p must be in [0, 1], got {request.top_p}")
        if len(request.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop has {len(request.stop)} strings, at most {MAX_STOP_STRINGS} allowed")
        for index, stop in enumerate(request.stop):
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop[{index}] must be 1 to {MAX_STOP_CHARS} characters")
        if request.mode not in MODES and request.mode != specpipe_pb2.MODE_UNSPECIFIED:
            raise InvalidRequest(f"mode = {request.mode} is not a known Mode")
        mode = MODES.get(request.mode, limits.default_mode)
        top_p = request.top_p if 0 < request.top_p < 1 else 1.0
        plan = RequestPlan(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids, max_new_tokens=request.max_new_tokens,
            sampling=SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=top_p),
            seed=request.seed if request.HasField("seed") else secrets.randbits(63), mode=mode,
            policy=limits.policy)
        return plan, list(request.stop)

    # -- Generate -------------------------------------------------------------------------------
    async def Generate(self, request, context):
        try:
            plan, stop = self.plan(request)
        except InvalidRequest as err:
            self.finished["invalid_argument"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if plan.request_id in self.live:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {plan.request_id!r} is already running")
        if not self.target.healthy:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the target worker is unavailable")
        run = RequestRun(plan, self.draft, self.target)
        self.live[plan.request_id] = run
        logger.info("[%s] started: %d prompt tokens, max_new_tokens=%d, mode=%s, temperature=%g",
                    plan.request_id, len(plan.prompt_ids), plan.max_new_tokens, plan.mode, plan.sampling.temperature)
        status, finish_reason = "cancelled", "cancelled"
        try:
            async for response in self._stream(run, stop):
                if response.finish_reason:
                    finish_reason = status = response.finish_reason
                yield response
        except (WorkerDown, WorkerFailed) as err:
            status = "unavailable" if isinstance(err, WorkerDown) else "internal"
            logger.error("[%s] failed: %s", plan.request_id, err)
            code = grpc.StatusCode.UNAVAILABLE if isinstance(err, WorkerDown) else grpc.StatusCode.INTERNAL
            await context.abort(code, str(err))
        finally:
            del self.live[plan.request_id]
            await run.release()
            self.finished[status] += 1
            logger.info("[%s] finished: %s", plan.request_id, finish_reason)

    async def _stream(self, run: RequestRun, stop: list[str]):
        plan = run.plan
        text = TextStream(self.tokenizer, plan.prompt_ids, stop)
        eos = self.tokenizer.eos_token_id
        generated: list[int] = []
        first_token_at = None
        async for new_tokens in run.tokens():
            first_token_at = first_token_at or time.monotonic()
            finish = ""
            new_tokens = new_tokens[:plan.max_new_tokens - len(generated)]
            if eos is not None and eos in new_tokens:
                new_tokens = new_tokens[:new_tokens.index(eos) + 1]
                finish = "eos"
            generated += new_tokens
            if not finish and len(generated) >= plan.max_new_tokens:
                finish = "length"
            chunk = text.push(new_tokens, final=bool(finish))
            if text.stopped:
                finish = "stop"
            response = specpipe_pb2.GenerateResponse(request_id=plan.request_id, token_ids=new_tokens, text=chunk)
            if finish:
                response.finish_reason = finish
                response.stats.CopyFrom(self._request_stats(run, len(generated), first_token_at))
                self._add_totals(run.stats, len(generated))
                yield response
                return
            yield response

    def _request_stats(self, run: RequestRun, generated: int, first_token_at: float) -> specpipe_pb2.RequestStats:
        stats, now = run.stats, time.monotonic()
        wall = max(now - run.started, 1e-9)
        return specpipe_pb2.RequestStats(
            draft_tokens=stats.draft_tokens, accepted_tokens=stats.accepted_tokens,
            rolled_back_tokens=stats.rolled_back_tokens, verifications=stats.verifications,
            branches_forked=stats.branches_forked, branches_hit=stats.branches_hit,
            time_to_first_token_s=first_token_at - run.started, tokens_per_second=generated / wall,
            mean_accepted_length=sum(stats.committed_per_verification) / max(stats.verifications, 1),
            acceptance_rate=stats.accepted_tokens / stats.draft_tokens if stats.draft_tokens else 0.0,
            generated_tokens=generated, mode=MODE_ENUMS[run.plan.mode],
            target_busy_fraction=min(1.0, stats.target_seconds / wall))

    def _add_totals(self, stats: RunStats, generated: int) -> None:
        for name in ("draft_tokens", "accepted_tokens", "rolled_back_tokens", "verifications",
                     "branches_forked", "branches_hit", "target_seconds"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(stats, name))
        self.totals_generated += generated

    # -- GetStats -------------------------------------------------------------------------------
    async def GetStats(self, request, context):
        response = specpipe_pb2.StatsResponse(live_requests=len(self.live),
                                              default_mode=MODE_ENUMS[self.limits.default_mode])
        for worker in (self.draft, self.target):
            pong = await worker.ping(timeout=1.0) or worker.last_pong
            stats = response.workers.add(role=worker.role, healthy=worker.healthy,
                                         status="ok" if worker.healthy else "unavailable")
            if pong is not None:
                stats.live_requests, stats.live_branches = pong.live_requests, pong.live_branches
                stats.busy_fraction = pong.busy_seconds / max(pong.uptime_seconds, 1e-9)
        totals = self.totals
        response.totals.CopyFrom(specpipe_pb2.RequestStats(
            draft_tokens=totals.draft_tokens, accepted_tokens=totals.accepted_tokens,
            rolled_back_tokens=totals.rolled_back_tokens, verifications=totals.verifications,
            branches_forked=totals.branches_forked, branches_hit=totals.branches_hit,
            generated_tokens=self.totals_generated,
            acceptance_rate=totals.accepted_tokens / totals.draft_tokens if totals.draft_tokens else 0.0))
        response.finished.update(self.finished)
        return response
