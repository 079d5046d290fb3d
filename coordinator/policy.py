"""The draft-length and branch policy: every decision of how much to draft and where to branch
lives here, switchable per flag so each part can be measured alone (the SpecBranch issue).

Kinds (`--policy`):
- `fixed`: blocks of `num_draft_tokens`, no confidence stop (PEARL's fixed gamma).
- `confidence` (implicit signal, SpecBranch's H-RAD): in sequential mode, also end a block after a
  draft token whose probability is under `min_confidence`. (The pipelined modes never end a block
  there: a longer block costs the target little more and the draft's time is not the target's
  wait; specbranch branches at unsure tokens instead, see below.)
- `adaptive` (model-free): `confidence`, with the block length chosen by `AcceptanceModel`, which
  fits the running distribution of accepted lengths and the measured step costs and picks the
  length that maximises expected tokens per second. Pipelined modes only: it depends on timing,
  and a seeded sequential request must stay reproducible (sequential keeps `confidence`).
- `predictor` (explicit signal): `confidence`, with the next block's length set from the target's
  acceptance-length predictor (a small model over its last hidden state, sent with each verdict)
  when the target has one, else as `adaptive`.

Branches (specbranch): a draft token whose probability is under the branch threshold is a branch
point; fork one branch per next-best candidate there whose draft probability is at least
`min_branch_prob` (`min_branch_prob_alone` while the target's batches hold under ALONE_BATCH_ROWS
requests on average: forks then cost only idle draft time), at most `branch_width` of them, while the request has fewer than
`max_branches` alternatives alive; each drafts `branch_lookahead` tokens past its fork point.
The threshold is `branch_confidence`, or by default (None: `--branch-confidence auto`) learnt: the
BRANCH_CAPTURE quantile of the draft's probability of the tokens the target rejected lately, so
that about that share of rejections fall on a branch point whatever the pair's calibration. (On
the demo pair at greedy, the target's token at a rejection is the draft's second choice 82% of
the time; the draft distilled with KL is unsure often, so a fixed 0.8 would flag 87% of accepted
positions too, where the learnt 0.45 flags 80% of rejections and 16% of accepted positions.)
An idle target gets a block once `IDLE_SEND_TOKENS` are drafted.

The shared measurements every decision reads (acceptance rates, step costs, the verify-cost line,
the target's batch and clock, the branch threshold, fork outcomes, redraft waits) are the server's
one `AcceptanceModel` (coordinator/acceptance_model.py); a DraftPolicy is one request's view of it.
"""

from __future__ import annotations

from specpipe.modes import Mode
from specpipe.config import PolicyConfig  # the settings (and the kinds, POLICIES) live in the shared core
from specpipe.coordinator.acceptance_model import AcceptanceModel

# Drafted tokens an idle target waits for before it gets a block (pipelined modes).
IDLE_SEND_TOKENS = 2
# Blocks of one request in flight on the target at once (pipelined modes): the one it verifies and
# the next, queued so the target goes on without waiting for the coordinator.
MAX_IN_FLIGHT = 2
# A request's own acceptance estimate starts from its kind's server-wide rate, worth this many
# observations (blocks), and moves to its own as its verdicts come.
REQUEST_PRIOR_WEIGHT = 8.0
# Speculation stops for a request (the target decodes the rest alone) once, after this many of its
# verdicts, the target alone is expected faster than its best block length by more than this share.
MIN_VERDICTS_TO_STOP, STOP_MARGIN = 8, 0.05


class DraftPolicy:
    """Per-request policy. `mode` is the request's schedule; `model` the server's shared
    AcceptanceModel (a fresh one when None)."""

    def __init__(self, config: PolicyConfig, mode: str, model: AcceptanceModel | None = None, greedy: bool = True):
        """`greedy`: the request's sampling (forks are judged apart for greedy and sampled)."""
        self.config, self.mode, self.greedy = config, mode, greedy
        self.model = model or AcceptanceModel()
        self.predicted_accept_length: float | None = None
        self._best_length: int | None = None  # the adaptive length, refitted at each verdict
        self.accepted = self.rejected = 0.0  # this request's own acceptance (as the model counts)
        self.verdicts = 0

    @property
    def rate(self) -> float:
        """This request's acceptance rate: its own counts, with the server's rate for requests of
        its kind (greedy or sampled) as a prior worth REQUEST_PRIOR_WEIGHT observations."""
        prior = self.model.rate(self.greedy)
        return (REQUEST_PRIOR_WEIGHT * prior + self.accepted) / (REQUEST_PRIOR_WEIGHT + self.accepted + self.rejected)

    @property
    def min_confidence(self) -> float:
        """End a drafting job at a token less likely than this. Only the sequential schedule
        stops there (the draft's time is the target's wait); the pipelined ones keep drafting,
        since a longer block costs the target little more, and branch at unsure tokens instead."""
        if self.mode != Mode.SEQUENTIAL or self.config.kind == "fixed":
            return 0.0
        return self.config.min_confidence

    @property
    def max_branches(self) -> int:
        return self.config.max_branches if self.mode == Mode.SPECBRANCH else 0

    @property
    def branch_lookahead(self) -> int:
        return self.config.branch_lookahead

    @property
    def main_lookahead(self) -> int | None:
        return self.config.main_lookahead

    @property
    def hold_draft_reports(self) -> bool:
        return self.config.hold_draft_reports and self.mode in (Mode.PIPELINED, Mode.SPECBRANCH)

    @property
    def prepare_branch_blocks(self) -> bool:
        return self.config.prepare_branch_blocks and self.mode == Mode.SPECBRANCH

    def urgent_fork_rows(self) -> int | None:
        """How many forks draft beside the main line while its next block is urgent (specbranch,
        `Pipelined.held_forks`); None: no cap. Only while the request has the workers to itself: in
        a shared draft step its own forks are a small part of the step's cost."""
        cap = self.config.urgent_fork_rows
        return cap if self.mode == Mode.SPECBRANCH and self.alone() else None

    def fill_tokens(self) -> int:
        """How many tokens the target decodes by itself after a rejection while the draft redrafts
        (pipelined modes; `--idle-decode`: auto asks the acceptance model, on fills with at least
        one token, off never; 0: it waits)."""
        setting = self.config.idle_decode
        if setting == "off" or self.mode not in (Mode.PIPELINED, Mode.SPECBRANCH):
            return 0
        tokens = self.model.fill_tokens()
        return max(1, tokens) if setting == "on" else tokens

    def fills_start(self, whatever_the_load: bool = False) -> bool:
        """Whether the prompt's forward decodes the request's first token by itself (`--idle-decode`
        auto or on), the first block verified past it. Sequential: always then (its prompt goes
        alone anyway, while the draft drafts the whole block). Pipelined modes: on, or auto while
        the target's batches hold few requests, instead of the prompt waiting for the draft's first
        block to go with it (`Prefill.hold_seconds`): the first token comes a hold sooner. Not in
        full batches: there the prompt waits for a forward anyway, and the draft's first block,
        later behind the other requests' draft steps, would often miss it. `whatever_the_load`:
        auto fills in full batches too (a seeded request whose first token the choice decides)."""
        setting = self.config.idle_decode
        if setting == "off" or self.mode == Mode.AUTOREGRESSIVE:
            return False
        return setting == "on" or self.mode == Mode.SEQUENTIAL or whatever_the_load or self.model.few_rows()

    @property
    def wants_prediction(self) -> bool:
        """Ask the target for its acceptance-length prediction with each verify."""
        return self.config.kind == "predictor" and self.mode != Mode.AUTOREGRESSIVE

    @property
    def branch_width(self) -> int:
        return self.config.branch_width if self.mode == Mode.SPECBRANCH else 0

    def block_length(self) -> int:
        most = self.config.num_draft_tokens
        if self.config.kind == "predictor" and self.predicted_accept_length is not None:
            # Draft up to the predicted break and one more: that token is the likely branch point.
            return max(1, min(most, round(self.predicted_accept_length) + 1))
        if self.config.kind in ("adaptive", "predictor") and self.mode in (Mode.PIPELINED, Mode.SPECBRANCH):
            # Timing-driven: only where block boundaries depend on timing anyway, so a seeded
            # sequential request stays reproducible (the predictor's signal is content-only).
            if self._best_length is None:
                self._best_length = self.model.best_length(most, pipelined=True, rate=self.rate)
            return self._best_length
        return most

    def speculation_pays(self) -> bool:
        """Whether drafting still pays for this request, measured: after MIN_VERDICTS_TO_STOP of its
        verdicts, if the target alone (blocks of 0) is expected faster than its best block length by
        more than STOP_MARGIN, speculation stops for the rest of it (the target decodes alone). Only
        where the adaptive policy runs (a timing-driven choice, like the block length)."""
        if self.config.kind not in ("adaptive", "predictor") or self.verdicts < MIN_VERDICTS_TO_STOP:
            return True
        pipelined = self.mode in (Mode.PIPELINED, Mode.SPECBRANCH)
        alone = self.model.tokens_per_second(0, pipelined, self.rate)
        best = self.model.tokens_per_second(self.block_length(), pipelined, self.rate)
        return not alone or best * (1 + STOP_MARGIN) >= alone

    def lookahead_blocks(self) -> int:
        """Blocks of one request queued on the target at once (pipelined modes): the one it
        verifies and the next."""
        return MAX_IN_FLIGHT

    def send_length(self) -> int:
        """How many drafted tokens are worth sending to an idle target while the draft is still
        drafting (pipelined modes). Waiting leaves the target idle; a short block is cheap (a
        verify costs little more per token) and the draft fills the next one meanwhile."""
        return min(self.block_length(), IDLE_SEND_TOKENS)

    def alone(self) -> bool:
        """Whether the request has the workers to itself, as measured: the target's batches hold
        under ALONE_BATCH_ROWS requests on average."""
        return self.model.batch_rows is not None and self.model.few_rows()

    def min_branch_prob(self) -> float:
        """The least draft probability of a candidate worth forking: lower while the request has the
        workers to itself (the draft idles most of the time; more forks meet more rejections), the
        configured bar while the target's batches hold other requests (forks cost the shared draft)."""
        config = self.config
        if self.alone():
            return min(config.min_branch_prob, config.min_branch_prob_alone)
        return config.min_branch_prob

    def branch_candidates(self, candidate_ids: list[int], candidate_probs: list[float]) -> list[int]:
        least = self.min_branch_prob()
        return [token_id for token_id, prob in zip(candidate_ids, candidate_probs) if prob >= least][
            : self.branch_width
        ]

    def branch_threshold(self) -> float:
        """A drafted token less likely than this is a branch point (specbranch)."""
        if self.config.branch_confidence is not None:
            return self.config.branch_confidence
        return self.model.branch_threshold(self.greedy)

    def fork_candidates(self, prob: float, candidate_ids, candidate_probs) -> list[int]:
        """The alternatives to fork at a drafted token of probability `prob` (specbranch): its
        next-best candidates, when the draft is unsure of it."""
        if self.max_branches == 0 or prob >= self.branch_threshold():
            return []
        if not self.model.forking_pays(self.greedy):
            return []
        return self.branch_candidates(list(candidate_ids), list(candidate_probs))

    def observe_fork(self, hit: bool) -> None:
        self.model.observe_fork_outcome(self.greedy, hit)

    def observe_rejected_prob(self, prob: float) -> None:
        self.model.observe_rejected_prob(prob, self.greedy)

    def observe(self, num_drafted: int, num_accepted: int, predicted_accept_length: float = -1.0) -> None:
        """A verdict: the acceptance (the forward's cost comes from observe_forward, batch by batch)."""
        self.model.observe_block(num_drafted, num_accepted, self.greedy)
        if num_drafted:
            self.accepted += num_accepted
            self.rejected += num_accepted < num_drafted
            self.verdicts += 1
        self._best_length = None
        if predicted_accept_length >= 0:
            self.predicted_accept_length = predicted_accept_length

    def observe_draft_step(self, seconds: float) -> None:
        self.model.observe_draft_step(seconds)
