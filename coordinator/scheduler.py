"""A request's run: its plan, its schedule, its channel to the workers (DESIGN §2).

`RequestRun` picks the request's schedule from `SCHEDULES` by its mode (coordinator/schedules.py,
coordinator/pipeline.py), yields what it commits, and when the draft goes down mid-request hands
the schedule's state to `TargetOnly`, which finishes it losslessly. The servicer turns the tokens
into text, applies stop strings, EOS and the length limit, and closes the run when done (closing
releases the request on both workers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from specpipe.modes import Mode
from specpipe.coordinator.channel import DraftDown, RequestChannel
from specpipe.coordinator.pipeline import Pipelined
from specpipe.coordinator.acceptance_model import AcceptanceModel
from specpipe.coordinator.policy import DraftPolicy, PolicyConfig
from specpipe.coordinator.schedules import Autoregressive, RunStats, Sequential, SpeculationStopped, TargetOnly
from specpipe.coordinator.workers import WorkerClient
from specpipe.sampling import SamplingParams

SCHEDULES = {
    Mode.AUTOREGRESSIVE: Autoregressive,
    Mode.SEQUENTIAL: Sequential,
    Mode.PIPELINED: Pipelined,
    Mode.SPECBRANCH: Pipelined,
}


@dataclass(frozen=True)
class RequestPlan:
    """A validated request, as the schedules see it."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    mode: Mode
    policy: PolicyConfig = PolicyConfig()
    seeded: bool = False  # the client gave the seed (else the server drew it)
    noise_vocab: int = 0  # drafter-invariant: the width of the Gumbel noise (the vocabulary)


def open_channel(plan: RequestPlan, draft: WorkerClient, target: WorkerClient) -> RequestChannel:
    """The request's channel to the workers: through the draft too in a speculative mode, when the
    draft is up."""
    return RequestChannel(plan.request_id, draft, target, use_draft=plan.mode != Mode.AUTOREGRESSIVE and draft.healthy)


class RequestRun:
    def __init__(self, plan: RequestPlan, channel: RequestChannel, acceptance: AcceptanceModel | None = None):
        """`acceptance`: the server's shared running model of acceptance and step costs."""
        self.plan, self.stats, self.channel = plan, RunStats(), channel
        self.policy = DraftPolicy(plan.policy, plan.mode, acceptance, greedy=plan.sampling.greedy)
        self.fell_back = plan.mode != Mode.AUTOREGRESSIVE and not channel.uses_draft  # degraded from the start
        schedule = SCHEDULES[plan.mode] if self.channel.uses_draft else Autoregressive
        self.schedule = schedule(plan, self.channel, self.policy, self.stats)
        self.started = time.monotonic()
        self.released = False

    async def tokens(self):
        """Async iterator over lists of newly committed tokens."""
        try:
            async for new_tokens in self.schedule.run():
                await self.channel.commands_go()
                yield new_tokens
        except (DraftDown, SpeculationStopped) as why:
            draft_down = isinstance(why, DraftDown)
            self.fell_back = self.fell_back or draft_down
            self.schedule = TargetOnly(self.schedule, draft_down=draft_down)
            async for new_tokens in self.schedule.run():
                await self.channel.commands_go()
                yield new_tokens

    async def release(self) -> None:
        """Free the request on both workers, once (when its run ends, and again at its end)."""
        if not self.released:
            self.released = True
            await self.channel.release()
