"""A request's line to the two workers: the commands it sends and the events it receives.

`RequestChannel` owns, for one request, its number on the data plane (`handle`), its name on the
workers (`wire_id`: the client's request_id and the handle, so that a late reply to an earlier
request of the same id never reaches this one), its inbox and its attachment to the two WorkerClients, and it sends the commands (Prefill, Draft, Fork, Sync,
Cancel, Verify, Decode, Release). `next_event` hands the schedule the next event it asked for and
turns a worker's failure into an exception: the draft down (or an error from it) is `DraftDown`,
the schedule then goes on target-only; the target down is `WorkerDown`, an error from it
`WorkerFailed`. It keeps no request state beyond that: the schedule owns the tokens, the epoch
and the blocks in flight (coordinator/schedules.py).

A schedule talks to this interface only, so tests drive a schedule against a fake channel that
replays chosen orderings of events (tests/coordinator/test_schedules.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from specpipe.coordinator.workers import Event, WorkerClient, WorkerDown, WorkerFailed
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Request numbers for the data plane, unique within this coordinator's life.
HANDLES = itertools.count(1)


class DraftDown(WorkerDown):
    """The draft worker stopped answering (or lost the request): go on target-only."""


class RequestChannel:
    def __init__(self, request_id: str, draft: WorkerClient, target: WorkerClient, use_draft: bool):
        """`use_draft`: attach to the draft worker too (a speculative mode, with the draft up)."""
        self.request_id, self.draft, self.target = request_id, draft, target
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.handle = next(HANDLES)
        # A client may reuse a request_id once its request ended; replies to that one may still be
        # on their way, so the workers know each request by a name used once.
        self.wire_id = f"{request_id}#{self.handle}"
        self.uses_draft = use_draft
        self.prefilled_draft = False
        target.attach(self.wire_id, self.inbox)
        if use_draft:
            draft.attach(self.wire_id, self.inbox)

    # -- commands -----------------------------------------------------------------------------
    async def prefill(
        self, prompt_ids: list[int], sampling: SamplingParams, seed: int, noise_vocab: int = 0, hold_s: float = 0.0
    ) -> None:
        """Start the request on both workers. `hold_s`: how long the target may keep the prompt
        waiting for the first block, to feed both in one forward."""
        wire_sampling = worker_pb2.Sampling(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=seed,
            drafter_invariant=sampling.drafter_invariant,
            noise_vocab=noise_vocab,
        )
        message = worker_pb2.Prefill(
            request_id=self.wire_id,
            token_ids=prompt_ids,
            handle=self.handle,
            sampling=wire_sampling,
            hold_seconds=hold_s,
        )
        await self.target.command(prefill=message)
        if self.uses_draft:
            await self.draft.command(prefill=message)
            self.prefilled_draft = True

    async def draft_tokens(
        self,
        branch_ids: list[int],
        epoch: int,
        max_tokens: int,
        min_confidence: float,
        num_candidates: int,
        send_probs: bool,
        report_when_done: bool = False,
        report_in_s: float = 0.0,
        end_position: int = 0,
        reports_only: bool = False,
    ) -> None:
        """`report_when_done`: the job's tokens come in one event, at its end; `report_in_s`: they
        come when the schedule acts on them; `end_position`: where the job ends, whatever the draft
        holds; `reports_only`: only the moment they come moves (Draft's fields of those names)."""
        await self.draft.command(
            draft=worker_pb2.Draft(
                request_id=self.wire_id,
                branch_ids=branch_ids,
                epoch=epoch,
                max_tokens=max_tokens,
                min_confidence=min_confidence,
                num_candidates=num_candidates,
                send_probs=send_probs,
                report_when_done=report_when_done,
                report_in_s=report_in_s,
                end_position=end_position,
                reports_only=reports_only,
            )
        )

    async def fork(self, parent_branch_id: int, branch_id: int, position: int, token_ids: list[int]) -> None:
        await self.draft.command(
            fork=worker_pb2.Fork(
                request_id=self.wire_id,
                parent_branch_id=parent_branch_id,
                branch_id=branch_id,
                position=position,
                token_ids=token_ids,
            )
        )

    async def sync(self, branch_id: int, keep_length: int, append: list[int]) -> None:
        await self.draft.command(
            sync=worker_pb2.Sync(
                request_id=self.wire_id, branch_id=branch_id, keep_length=keep_length, append_token_ids=append
            )
        )

    async def cancel(self, branch_ids: list[int]) -> None:
        await self.draft.command(cancel=worker_pb2.Cancel(request_id=self.wire_id, branch_ids=branch_ids))

    async def verify(self, verify: worker_pb2.Verify) -> None:
        verify.request_id = self.wire_id
        await self.target.command(verify=verify)

    async def decode(self, max_length: int, until_block: bool = False) -> None:
        """The target decodes by itself up to `max_length`; `until_block`: only until a block comes."""
        await self.target.command(
            decode=worker_pb2.Decode(request_id=self.wire_id, max_length=max_length, until_block=until_block)
        )

    def target_busy(self) -> bool:
        """The target has work queued by other requests (or a decode of ours): its next forward
        follows this one. This request's own verifies are left out: its schedule counts those that
        cost a forward (its live blocks); the rest are answered stale, with no forward."""
        return self.target.busy(besides=self.wire_id)

    def drop_draft(self) -> None:
        """Stop listening to the draft (it went down): its late replies are dropped."""
        self.uses_draft = False
        self.draft.detach(self.wire_id)

    async def release_draft(self) -> None:
        """Done with the draft for this request (it stopped paying): free its state there now."""
        self.drop_draft()
        if self.prefilled_draft:
            self.prefilled_draft = False
            await self.draft.command(release=worker_pb2.Release(request_id=self.wire_id))

    async def release(self) -> None:
        """Free the request on both workers (also after a failure or a cancel)."""
        release = worker_pb2.Release(request_id=self.wire_id)
        for worker in (self.target, self.draft) if self.prefilled_draft else (self.target,):
            worker.detach(self.wire_id)
            try:
                await worker.command(release=release)
            except Exception:  # the socket may be gone at shutdown; the worker drops it on restart
                logger.warning("[%s] could not send release to the %s worker", self.request_id, worker.role)

    # -- events -------------------------------------------------------------------------------
    @staticmethod
    async def commands_go() -> None:
        """Let the commands issued so far leave for the workers before the caller goes on (the
        servicer detokenises and writes the client's stream, ~0.2 ms of CPU on the draft's core):
        one loop turn, in which the workers' flushes run after every request woken by the same
        reply had its turn, so the commands of all of them still go as one message."""
        await asyncio.sleep(0)

    async def next_event(self, *kinds: str) -> Event:
        """The next event of one of `kinds`; a worker error or a dead worker raises."""
        while True:
            event = await self.inbox.get()
            if event.role == "draft" and (event.kind in ("down", "error")):
                if not self.uses_draft:
                    continue
                why = "stopped answering" if event.kind == "down" else event.payload.message
                raise DraftDown(f"the draft worker {why}")
            if event.kind == "down":
                raise WorkerDown(f"the {event.role} worker stopped answering")
            if event.kind == "error":
                raise WorkerFailed(f"{event.role} worker: {event.payload.message}")
            if event.kind in kinds:
                return event
            logger.debug("[%s] unexpected %s while waiting for %s", self.request_id, event.kind, kinds)
