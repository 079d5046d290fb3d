"""The draft worker's executor: per request, a small tree of branches, advanced by a drafter.

A branch is a token sequence and, while it drafts, a job (how many tokens to go, under which
epoch). `step` advances every drafting branch of every request at once: the drafter
(draft_worker/drafter.py) proposes the next token of each in one batched forward, the engine
chooses it (argmax, or a draw from the processed q), and the step's tokens go to the coordinator in
one DraftStep per connection, their q to the target in one data-plane message. Commands arriving
between steps (Sync, Cancel, Fork, Release) take effect before the next step: drafting is
interruptible.

Randomness: the token at sequence position i is drawn from a generator keyed by (seed, i,
STREAM_DRAFT) (or, drafter-invariant, is argmax(log q + g) with the Gumbel noise keyed by (seed,
i) that the target uses too), so what the draft proposes at a position does not depend on timing,
batch neighbours or redrafted branches.
All decisions (what to draft, where to fork) are the coordinator's; this module only executes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from specpipe.draft_worker.drafter import BranchKey, Drafter
from specpipe.proposal import ProposalTemperatures
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import (
    STREAM_DRAFT,
    SamplingParams,
    gumbel_argmax,
    gumbel_noise,
    logits_to_probs,
    make_generator,
    sample_from_probs,
)

logger = logging.getLogger(__name__)

# Branches advanced in one step at most (the rest wait for the next, in turn).
MAX_STEP_BRANCHES = 512


@dataclass
class DraftJob:
    epoch: int
    remaining: int
    min_confidence: float
    num_candidates: int
    send_probs: bool
    report_when_done: bool = False
    held: list = field(default_factory=list)  # its items not reported yet (report_when_done, report_at)
    # Held until (this worker's monotonic clock; None: every token at once): see `_holds`.
    report_at: float | None = None


@dataclass
class Branch:
    tokens: list[int]
    job: DraftJob | None = None


@dataclass
class DraftRequest:
    sampling: SamplingParams
    seed: int
    handle: int  # the request's number on the data plane
    noise_vocab: int = 0  # drafter-invariant: the width of the Gumbel noise
    branches: dict[int, Branch] = field(default_factory=dict)


class DraftEngine:
    def __init__(self, drafter: Drafter, probs_sender=None, proposal: ProposalTemperatures = ProposalTemperatures()):
        """`probs_sender`: the data plane to the target (specpipe.dataplane), needed for sampling.
        `proposal`: the temperature a sampled request's tokens are drawn at (specpipe/proposal.py);
        the q sent is always the law they were drawn from, so the target's rule stays exact."""
        self.drafter, self.probs_sender, self.proposal = drafter, probs_sender, proposal
        self.requests: dict[str, DraftRequest] = {}
        self._turn = 0
        self.last_batch = (0, 0)
        # Held tokens of jobs stopped or cut short (a pause, a sync): reported with the next step.
        self._orphans: list = []
        self._step_end, self._step_s = 0.0, 0.0  # the step being chosen: when it ended, how long it took
        self.setup: list[str] = []  # its start-up choices, one line each (launch/worker.py): in its Pongs

    # -- commands -----------------------------------------------------------------------------
    def handle(self, command, frames) -> None:
        kind = command.WhichOneof("kind")
        getattr(self, f"_on_{kind}", self._on_other)(getattr(command, kind))

    def _on_prefill(self, msg) -> None:
        assert len(msg.token_ids) >= 1, "prefill needs at least one token"
        if msg.request_id in self.requests:
            raise ValueError(f"request {msg.request_id!r} exists already")
        wire_sampling = msg.sampling
        sampling = self.proposal.proposal(
            SamplingParams(
                wire_sampling.temperature, wire_sampling.top_k, wire_sampling.top_p, wire_sampling.drafter_invariant
            )
        )
        tokens = list(msg.token_ids)
        self.drafter.open((msg.request_id, 0), tokens)
        request = DraftRequest(
            sampling=sampling, seed=wire_sampling.seed, handle=msg.handle, noise_vocab=wire_sampling.noise_vocab
        )
        request.branches[0] = Branch(tokens=tokens)
        self.requests[msg.request_id] = request

    def _on_draft(self, msg) -> None:
        request = self._request(msg.request_id)
        if msg.send_probs and self.probs_sender is None:
            raise ValueError(
                "sampling needs the data plane to the target: start the draft worker with "
                "--target-data-addr (zmq) or under torch.distributed (--transport torch)"
            )
        report_at = time.monotonic() + msg.report_in_s if msg.report_in_s > 0 else None
        for branch_id in msg.branch_ids:
            branch = request.branches.get(branch_id)
            if branch is None:  # a fork refused for want of a slot (or cancelled meanwhile): nothing to draft
                continue
            if msg.reports_only:
                if branch.job is not None:
                    branch.job.report_at = report_at
                continue
            remaining = msg.end_position - len(branch.tokens) if msg.end_position else msg.max_tokens
            old = branch.job
            branch.job = (
                DraftJob(
                    msg.epoch,
                    remaining,
                    msg.min_confidence,
                    msg.num_candidates,
                    msg.send_probs,
                    msg.report_when_done,
                    report_at=report_at,
                )
                if msg.max_tokens > 0 and remaining > 0
                else None
            )
            if old is not None and old.held and not old.report_when_done:  # (held ones are taken over)
                if branch.job is not None:
                    branch.job.held = old.held
                else:
                    self._orphans += old.held

    def _on_fork(self, msg) -> None:
        request = self._request(msg.request_id)
        parent = self._branch(request, msg.request_id, msg.parent_branch_id)
        assert msg.branch_id not in request.branches, f"branch {msg.branch_id} exists already"
        assert 0 < msg.position <= len(parent.tokens), f"fork at {msg.position} outside the parent"
        assert msg.token_ids, "a fork needs at least one token"
        try:
            self.drafter.fork((msg.request_id, msg.parent_branch_id), (msg.request_id, msg.branch_id), msg.position)
        except MemoryError:  # no KV slot free: a fork is an optional speculation, so it is skipped
            logger.debug("[%s] fork %d skipped: no KV slot free", msg.request_id, msg.branch_id)
            return
        request.branches[msg.branch_id] = Branch(tokens=parent.tokens[: msg.position] + list(msg.token_ids))

    def _on_sync(self, msg) -> None:
        branch = self._branch(self._request(msg.request_id), msg.request_id, msg.branch_id)
        assert msg.keep_length <= len(branch.tokens), f"keep {msg.keep_length} > {len(branch.tokens)} tokens"
        branch.tokens = branch.tokens[: msg.keep_length] + list(msg.append_token_ids)
        assert branch.tokens, "a branch cannot be emptied"
        self.drafter.truncate((msg.request_id, msg.branch_id), min(msg.keep_length, len(branch.tokens) - 1))
        if branch.job is not None and branch.job.held and not branch.job.report_when_done:
            self._orphans += branch.job.held  # (of the old epoch: the schedule counts them as thrown away)
        branch.job = None

    def _on_cancel(self, msg) -> None:
        request = self.requests.get(msg.request_id)
        for branch_id in msg.branch_ids if request else ():
            if request.branches.pop(branch_id, None) is not None:
                self.drafter.close((msg.request_id, branch_id))

    def _on_release(self, msg) -> None:
        request = self.requests.pop(msg.request_id, None)
        for branch_id in request.branches if request else ():
            self.drafter.close((msg.request_id, branch_id))

    def _on_other(self, msg) -> None:
        raise ValueError(f"the draft worker does not take {type(msg).__name__}")

    def _request(self, request_id: str) -> DraftRequest:
        if request_id not in self.requests:
            raise KeyError(f"unknown request {request_id!r}")
        return self.requests[request_id]

    @staticmethod
    def _branch(request: DraftRequest, request_id: str, branch_id: int) -> Branch:
        if branch_id not in request.branches:
            raise KeyError(f"request {request_id!r} has no branch {branch_id}")
        return request.branches[branch_id]

    # -- the loop's questions -----------------------------------------------------------------
    def sockets(self) -> list:
        return []

    def poll(self) -> None:
        pass

    def ready(self) -> bool:
        return bool(self._orphans) or any(b.job for r in self.requests.values() for b in r.branches.values())

    def waiting(self) -> bool:
        return False

    def fill_pong(self, pong: worker_pb2.Pong) -> None:
        pong.live_requests = len(self.requests)
        pong.live_branches = sum(len(r.branches) for r in self.requests.values())
        pong.kv_slots, pong.kv_slots_used, pong.kv_slot_len = self.drafter.capacity()
        pong.last_batch_rows, pong.last_batch_tokens = self.last_batch
        pong.setup.extend(self.setup)

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> tuple[list, dict]:
        """One proposal for every drafting branch of every request (in turn, up to
        MAX_STEP_BRANCHES): the DraftToken items, and the step's figures."""
        active = [
            (request_id, branch_id)
            for request_id, r in self.requests.items()
            for branch_id, b in r.branches.items()
            if b.job
        ]
        orphans, self._orphans = self._orphans, []
        if not active:  # (only held tokens of stopped jobs to report)
            return orphans, {}
        start = self._turn % len(active)
        self._turn += 1
        active = (active[start:] + active[:start])[:MAX_STEP_BRANCHES]
        begin = time.perf_counter()
        try:
            proposals = self.drafter.propose([(key, self.requests[key[0]].branches[key[1]].tokens) for key in active])
        except Exception as err:
            return self._failed(active, err), {}
        self._step_end = time.monotonic()
        self._step_s = time.perf_counter() - begin
        items = orphans + self._choose(active, proposals)
        elapsed = time.perf_counter() - begin
        self.last_batch = (len(active), self.drafter.fed_tokens())
        return items, {
            "step_seconds": elapsed,
            "batch_branches": len(active),
            "batch_tokens": self.drafter.fed_tokens(),
        }

    def _failed(self, active: list[BranchKey], err: Exception) -> list:
        """The step failed: every branch in it stops, each request is told once."""
        logger.exception("draft step failed")
        for request_id, branch_id in active:
            self.requests[request_id].branches[branch_id].job = None
        error = f"{type(err).__name__}: {err}"
        return [
            (
                request_id,
                worker_pb2.Reply(error=worker_pb2.Error(request_id=request_id, message=error, command="draft")),
                [],
            )
            for request_id in dict.fromkeys(request_id for request_id, _ in active)
        ]

    def _choose(self, active: list[BranchKey], proposals: dict) -> list:
        """Turn each proposal into the branch's next token: argmax (greedy) or a draw from q. A
        branch the drafter cannot advance (None) ends its job; one it is still feeding waits. The
        rows of one sampling kind are processed together: one softmax and one top-k, whose first
        entry is the greedy token and its probability and the rest the fork candidates (sampled: a
        gather of the drawn tokens' probabilities and a top-k for the candidates)."""
        items, sent_keys, sent_probs = [], [], []
        by_sampling: dict[SamplingParams, list[BranchKey]] = {}
        for key in active:
            if key not in proposals:
                continue
            if proposals[key] is None:
                items += self._stop(key)
            else:
                by_sampling.setdefault(self.requests[key[0]].sampling, []).append(key)
        for sampling, keys in by_sampling.items():
            logits = torch.stack([proposals[key] for key in keys])  # [n, vocab]
            width = max(self.requests[key[0]].branches[key[1]].job.num_candidates for key in keys)
            top_ids = top_probs = None
            if sampling.greedy:  # one top-k gives the token (its first), its probability and the candidates
                probs = torch.softmax(logits.float(), -1)
                top = torch.topk(probs, min(width + 1, probs.shape[-1]), dim=-1)
                top_ids, top_probs = top.indices.tolist(), top.values.tolist()
                token_ids, chosen = [row[0] for row in top_ids], [row[0] for row in top_probs]
            else:
                probs = logits_to_probs(logits, sampling)
                token_ids = self._draw(keys, probs, sampling)
                chosen = probs.gather(1, torch.tensor(token_ids, device=probs.device)[:, None])[:, 0].tolist()
                if width:
                    top = torch.topk(probs, min(width + 1, probs.shape[-1]), dim=-1)
                    top_ids, top_probs = top.indices.tolist(), top.values.tolist()
            for i, key in enumerate(keys):
                top_row = (top_ids[i], top_probs[i]) if top_ids is not None else None
                reported, probs_key = self._emit(key, token_ids[i], chosen[i], top_row)
                items += reported
                if probs_key is not None:
                    sent_keys.append(probs_key)
                    sent_probs.append(probs[i])
        if sent_keys:
            self.probs_sender.send(sent_keys, torch.stack(sent_probs))
        return items

    def _stop(self, key: BranchKey) -> list:
        """The branch's job ends with no token (the drafter has none): its held items and an
        end-of-job marker."""
        request_id, branch_id = key
        branch = self.requests[request_id].branches[branch_id]
        job, branch.job = branch.job, None
        end = worker_pb2.DraftToken(
            request_id=request_id,
            branch_id=branch_id,
            epoch=job.epoch,
            position=len(branch.tokens),
            token_id=-1,
            last=True,
        )
        return job.held + [(request_id, end, [])]

    def _draw(self, keys: list[BranchKey], probs: torch.Tensor, sampling: SamplingParams) -> list[int]:
        """Sampled requests' tokens at their branches' next positions from their processed q [n,
        vocab], all of one `sampling`: one race over the rows, each from its own generator keyed by
        (seed, position) (a row's draw is the one it gets alone); drafter-invariant: argmax(log q +
        g) row by row, g keyed by the same."""
        positions = [len(self.requests[request_id].branches[branch_id].tokens) for request_id, branch_id in keys]
        requests = [self.requests[request_id] for request_id, _ in keys]
        if sampling.coupled:  # the same g the target uses at this position
            token_ids = []
            for request, position, row_probs in zip(requests, positions, probs):
                width = request.noise_vocab or row_probs.shape[-1]
                coupled = torch.nn.functional.pad(row_probs, (0, max(0, width - row_probs.shape[-1])))[:width]
                token_ids.append(int(gumbel_argmax(coupled, gumbel_noise(request.seed, position, width))))
            return token_ids
        generators = [make_generator(r.seed, position, STREAM_DRAFT) for r, position in zip(requests, positions)]
        return sample_from_probs(probs, generators).tolist()

    def _emit(self, key: BranchKey, token_id: int, prob: float, top: tuple[list, list] | None):
        """Append the chosen token (of draft probability `prob`) to the branch and report it, with
        its next-best candidates from `top` (the row's top-k ids and probabilities): the items to
        report now (none while a report_when_done job goes on; at its end, all of its tokens), and
        the key of its q on the data plane, if they go."""
        request_id, branch_id = key
        request = self.requests[request_id]
        branch, job = request.branches[branch_id], request.branches[branch_id].job
        position = len(branch.tokens)
        branch.tokens.append(token_id)
        job.remaining -= 1
        last = job.remaining <= 0 or prob < job.min_confidence
        msg = worker_pb2.DraftToken(
            request_id=request_id,
            branch_id=branch_id,
            epoch=job.epoch,
            position=position,
            token_id=token_id,
            prob=prob,
            last=last,
        )
        if job.num_candidates and top is not None:
            pairs = [(t, p) for t, p in zip(*top) if t != token_id][: job.num_candidates]
            msg.candidate_ids[:] = [t for t, _ in pairs]
            msg.candidate_probs[:] = [p for _, p in pairs]
        probs_key = (request.handle, branch_id, job.epoch, position) if job.send_probs else None
        job.held.append((request_id, msg, []))
        if not last and self._holds(job):
            return [], probs_key
        reported, job.held = job.held, []
        if last:
            branch.job = None
        return reported, probs_key

    def _holds(self, job: DraftJob) -> bool:
        """Whether a job's token (not its last) waits to be reported with later ones: always for
        report_when_done; with report_at, until the step after which the next step (as long as this
        one) would end past it."""
        if job.report_when_done:
            return True
        return job.report_at is not None and self._step_end + self._step_s < job.report_at

    # -- the loop's message -------------------------------------------------------------------
    @staticmethod
    def pack(items, figures: dict) -> tuple[worker_pb2.Reply, list[bytes]]:
        step = worker_pb2.DraftStep(tokens=[token for _, token, _ in items], **figures)
        return worker_pb2.Reply(draft_step=step), []
