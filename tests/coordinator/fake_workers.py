"""Fake workers for driving the schedules without processes (nanochat's MockModel pattern).

`FakeWorkers` stands in for both worker clients behind a real `RequestChannel`: it receives the
channel's protobuf commands and simulates, greedily over a toy model whose next token is a fixed
function of the prefix (`target_next`), what the target would verify and what a draft that is
right most of the time would propose (`draft_next`, unsure where it is wrong, with the target's
token among its next-best candidates, so branches can be promoted). Its inbox decides, with a
seeded random choice, whether the next event the schedule sees is the draft's step or the
target's verdict: every test seed is another ordering of late verdicts, early drafts and stale
blocks. A job told to hold its reports (Draft.report_in_s) holds its tokens and reports them
together at its last token or at a seeded random step, as the draft worker does when the schedule's
moment comes; held tokens of a job paused or synced come with the next step. `draft_down_after=N`
makes the draft go down after its N-th step. Like the real target, it
fills the wait after a rejection by decoding by itself when asked to
(Decode.until_block), and verifies what is left of a block that starts behind those tokens.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque

from specpipe.blocks import left_to_verify
from specpipe.coordinator.workers import Event
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.target_worker.requests import block_is_stale

VOCAB = 50
# Draft steps the fake draft may have sent that the schedule has not read yet.
DRAFT_AHEAD = 3


def target_next(tokens: list[int]) -> int:
    return (sum(tokens) * 7 + len(tokens) * 3) % VOCAB


def draft_next(tokens: list[int]) -> tuple[int, float, list[int], list[float]]:
    """(token, its probability, next-best candidates, their probabilities): wrong and unsure at
    one position in four, with the target's token as its best alternative."""
    right = target_next(tokens)
    key = f"{tokens[-3:]}{len(tokens)}".encode()
    if hashlib.blake2b(key, digest_size=2).digest()[0] % 4 == 0:
        return (right + 1) % VOCAB, 0.3, [right, (right + 2) % VOCAB], [0.25, 0.1]
    return right, 0.9, [(right + 1) % VOCAB], [0.05]


def greedy(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(target_next(tokens))
    return tokens[len(prompt) :]


class FakeWorkers:
    def __init__(
        self,
        seed: int,
        draft_down_after: int | None = None,
        stalls: bool = False,
        misleading: bool = False,
        slow_target: bool = False,
        crossing: bool = False,
    ):
        """`stalls`: the draft has nothing to propose at some positions (as prompt lookup does).
        `misleading`: at half of its wrong positions the draft's alternatives miss the target's
        token too (a fork there is not hit: the main line is resynced). `slow_target`: the target
        answers one time in four that it could, so the draft runs further ahead. `crossing`: the
        target's answers may wait in its outbox too (one at most), so a command can cross an answer
        computed before it (a decoded token and the block sent before the schedule read it)."""
        self.misleading, self.slow_target, self.crossing = misleading, slow_target, crossing
        self.target_outbox: deque = deque()
        self.rng = random.Random(seed)
        self.stalls = stalls
        self.stalled: list[tuple] = []  # (epoch, branch, position) of each "nothing to propose"
        self.draft_down_after = draft_down_after
        self.draft_steps = 0
        self.draft_outbox: deque = deque()
        self.draft_down = False
        self.committed: list[int] = []
        self.verifies: deque = deque()
        self.decode_until = 0
        self.fill_until = 0  # after a rejection: decode by itself up to this length until a block comes
        self.decoded = 0  # tokens decoded by itself since the last block verified
        self.fills = 0  # tokens decoded so
        self.hold_seconds = 0.0  # the prompt's (Prefill.hold_seconds)
        self.branches: dict[int, list[int]] = {}
        self.jobs: dict[int, list] = {}  # branch_id -> [epoch, remaining, min_confidence, num_candidates, holds]
        self.held: dict[int, list] = {}  # branch_id -> its job's tokens not reported yet
        self.orphans: list = []  # held tokens of stopped jobs: reported with the next step
        self.drafts: list = []  # every Draft command, as sent
        self.stale_answers = 0
        self.pauses = 0  # branches told to stop drafting for now (a Draft of 0 tokens)
        self.last_block_id = 0  # the last block verified
        self.rejections = 0  # blocks answered with a draft token rejected
        self.commands: list[str] = []
        self.request_id = ""
        self.draft = _Client(self, "draft")
        self.target = _Client(self, "target")

    # -- what the channel sends -----------------------------------------------------------------
    def command(self, role: str, kind: str, msg) -> None:
        self.commands.append(f"{role}:{kind}")
        if role == "draft" and self.draft_down:
            return  # a dead worker hears nothing
        getattr(self, f"_{role}_{kind}")(msg)

    def _target_prefill(self, msg) -> None:
        self.request_id, self.committed = msg.request_id, list(msg.token_ids)
        self.hold_seconds = msg.hold_seconds

    def _target_verify(self, msg) -> None:
        self.decode_until = 0
        self.verifies.append(msg)

    def _target_decode(self, msg) -> None:
        if msg.until_block:
            self.fill_until = msg.max_length
        else:
            self.decode_until = msg.max_length

    def _target_release(self, msg) -> None:
        self.verifies.clear()

    def _draft_prefill(self, msg) -> None:
        self.branches = {0: list(msg.token_ids)}

    def _draft_draft(self, msg) -> None:
        self.drafts.append(msg)
        for branch_id in msg.branch_ids:  # (max_tokens 0: the branch pauses, as on the draft worker)
            if msg.reports_only:  # (only when it reports moves: this fake's moment is random anyway)
                if branch_id in self.jobs:
                    self.jobs[branch_id][4] = msg.report_in_s > 0
                continue
            # end_position: the job ends there, however far the draft is (as on the draft worker)
            sequence = self.branches.get(branch_id)
            remaining = msg.end_position - len(sequence) if msg.end_position and sequence else msg.max_tokens
            if msg.max_tokens > 0 and remaining > 0:
                self.jobs[branch_id] = [
                    msg.epoch,
                    remaining,
                    msg.min_confidence,
                    msg.num_candidates,
                    msg.report_in_s > 0,
                ]
            else:
                self.jobs.pop(branch_id, None)
                self.orphans += self.held.pop(branch_id, [])
                self.pauses += msg.max_tokens == 0

    def _draft_fork(self, msg) -> None:
        self.branches[msg.branch_id] = self.branches[msg.parent_branch_id][: msg.position] + list(msg.token_ids)

    def _draft_sync(self, msg) -> None:
        self.branches[msg.branch_id] = self.branches[msg.branch_id][: msg.keep_length] + list(msg.append_token_ids)
        self.jobs.pop(msg.branch_id, None)
        self.orphans += self.held.pop(msg.branch_id, [])

    def _draft_cancel(self, msg) -> None:
        for branch_id in msg.branch_ids:
            self.branches.pop(branch_id, None)
            self.jobs.pop(branch_id, None)
            self.held.pop(branch_id, None)

    def _draft_release(self, msg) -> None:
        self.branches.clear()
        self.jobs.clear()
        self.held.clear()
        self.orphans.clear()

    # -- what the channel receives --------------------------------------------------------------
    def next_event(self) -> Event:
        """The draft runs ahead of delivery (up to DRAFT_AHEAD steps wait in its outbox, so a step
        drafted before a Sync can arrive after it, under the old epoch); the target answers in order."""
        while True:
            choices = []
            if self.draft_outbox:
                choices.append("deliver")
            if (self.jobs or self.orphans) and not self.draft_down and len(self.draft_outbox) < DRAFT_AHEAD:
                choices.append("draft")
            if self.target_outbox:  # (in order: the next answer waits for this one's delivery)
                choices.append("deliver verdict")
            elif self.verifies or self.decodes_to() > len(self.committed):
                choices.append("answer" if self.crossing else "verdict")
            assert choices, f"the schedule waits, but no worker has anything to send ({self.commands[-6:]})"
            weights = [0.25 if self.slow_target and c == "verdict" else 1.0 for c in choices]
            choice = self.rng.choices(choices, weights)[0]
            if choice == "draft":
                self.draft_outbox.append(self._draft_step())
            elif choice == "deliver":
                return self.draft_outbox.popleft()
            elif choice == "answer":
                self.target_outbox.append(self._verdict())
            elif choice == "deliver verdict":
                return self.target_outbox.popleft()
            else:
                return self._verdict()

    def decodes_to(self) -> int:
        return self.decode_until or (0 if self.verifies else self.fill_until)

    def _draft_step(self) -> Event:
        self.draft_steps += 1
        if self.draft_down_after is not None and self.draft_steps > self.draft_down_after:
            self.draft_down = True
            self.jobs.clear()
            return Event("draft", "down")
        tokens, self.orphans = self.orphans, []
        for branch_id, job in list(self.jobs.items()):
            epoch, remaining, min_confidence, num_candidates, holds = job
            sequence = self.branches[branch_id]
            if self.stalls and (sum(sequence) * 3 + len(sequence)) % 5 == 1:  # nothing to propose here
                self.stalled.append((epoch, branch_id, len(sequence)))
                tokens += self.held.pop(branch_id, [])
                tokens.append(
                    worker_pb2.DraftToken(
                        request_id=self.request_id,
                        branch_id=branch_id,
                        epoch=epoch,
                        position=len(sequence),
                        token_id=-1,
                        last=True,
                    )
                )
                del self.jobs[branch_id]
                continue
            token, prob, candidates, probs = draft_next(sequence)
            if self.misleading and prob < 0.5 and len(sequence) % 2:
                candidates = [(candidate + 3) % VOCAB for candidate in candidates]
            job[1] = remaining = remaining - 1
            last = remaining <= 0 or prob < min_confidence
            held = self.held.setdefault(branch_id, [])
            held.append(
                worker_pb2.DraftToken(
                    request_id=self.request_id,
                    branch_id=branch_id,
                    epoch=epoch,
                    position=len(sequence),
                    token_id=token,
                    prob=prob,
                    last=last,
                    candidate_ids=candidates[:num_candidates],
                    candidate_probs=probs[:num_candidates],
                )
            )
            sequence.append(token)
            if last or not holds or self.rng.random() < 0.3:  # (held: till its end, or the moment comes)
                tokens += self.held.pop(branch_id)
            if last:
                del self.jobs[branch_id]
        return Event("draft", "draft_tokens", tokens, step_seconds=0.001)

    def _verdict(self) -> Event:
        if self.verifies:
            return Event("target", "verdict", self._verify(self.verifies.popleft()))
        token = target_next(self.committed)
        self.committed.append(token)
        self.decoded += 1
        self.fills += not self.decode_until
        return Event(
            "target",
            "verdict",
            worker_pb2.Verdict(
                request_id=self.request_id,
                decoded=True,
                next_token_id=token,
                committed_length=len(self.committed),
                verify_seconds=0.002,
            ),
        )

    def _verify(self, msg) -> worker_pb2.Verdict:
        if block_is_stale(msg, self.committed, self.last_block_id, self.decoded) or self.decode_until:
            self.stale_answers += 1
            return worker_pb2.Verdict(
                request_id=self.request_id,
                block_id=msg.block_id,
                stale=True,
                next_token_id=-1,
                committed_length=len(self.committed),
            )
        assert len(self.committed) - self.decoded <= msg.start_length <= len(self.committed), (
            "a block that does not extend the committed tokens"
        )
        self.last_block_id, self.decoded = msg.block_id, 0
        skipped = len(self.committed) - msg.start_length
        draft, accepted = left_to_verify(msg.start_length, msg.draft_token_ids, self.committed), 0
        while accepted < len(draft) and draft[accepted] == target_next(self.committed + draft[:accepted]):
            accepted += 1
        self.committed += draft[:accepted]
        self.rejections += accepted < len(draft)
        self.fill_until = 0
        next_token = -1
        if accepted < len(draft) or msg.emit_bonus:
            next_token = target_next(self.committed)
            self.committed.append(next_token)
        return worker_pb2.Verdict(
            request_id=self.request_id,
            block_id=msg.block_id,
            num_accepted=skipped + accepted,
            next_token_id=next_token,
            committed_length=len(self.committed),
            verify_seconds=0.002 + 0.0005 * len(draft),
        )


class _Client:
    """What RequestChannel needs of a WorkerClient: attach, detach, command."""

    def __init__(self, workers: FakeWorkers, role: str):
        self.workers, self.role = workers, role
        self.healthy = True

    def attach(self, request_id, inbox) -> None:
        pass

    def detach(self, request_id) -> None:
        pass

    async def command(self, **kind) -> None:
        ((name, msg),) = kind.items()
        self.workers.command(self.role, name, msg)

    def busy(self, besides: str | None = None) -> bool:
        """As WorkerClient.busy: the fake holds one request, so `besides` (its own) leaves only a
        decode."""
        workers = self.workers
        own = besides is not None and besides == workers.request_id
        return (bool(workers.verifies) and not own) or workers.decodes_to() > len(workers.committed)


class FakeInbox:
    """The channel's inbox: each get() is the workers' next event, in a seeded order."""

    def __init__(self, workers: FakeWorkers):
        self.workers = workers

    async def get(self) -> Event:
        return self.workers.next_event()

    def put_nowait(self, event) -> None:
        raise AssertionError("nothing is delivered behind the fake's back")
