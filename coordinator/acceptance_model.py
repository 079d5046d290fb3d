"""The acceptance model: the coordinator's running measurements of the pair and the workers, one
per server, shared by every request's DraftPolicy (coordinator/policy.py): the acceptance rate
(apart for greedy and sampled requests), the draft step's and the target forward's costs, the
target's batch and its clock, the learnt branch threshold, forks' outcomes, the waits after a
rejection nothing foresaw. It decides nothing per request; it answers what a length or a fork is
expected to cost and bring.

Each verification of k draft tokens accepts a prefix of m; under the
standard i.i.d. model (Leviathan et al. 2023, §3.5) m is a geometric count truncated at k with
per-token acceptance rate a, so the maximum-likelihood estimate is
    a = sum(m) / (sum(m) + number of verifications with m < k),
kept with exponential forgetting and a Beta prior. Expected tokens per round:
    sequential  E_s(k) = (1 - a^(k+1)) / (1 - a)          in  k * t_draft + T_verify(k + 1)
    pipelined   E_p(k) = a (1 - a^k) / (1 - a) + (1 - a^k)  in  max(T_verify(k + 1), k * t_draft)
                                                             + (1 - a^k) * t_draft
(pipelined: no bonus token, the next block's first token is verified against the kept logits; a
rejection costs a bubble of about one draft step before the redrafted block can go). T_verify(n)
is a line fitted to measured verify times over n fed tokens.
"""

from __future__ import annotations

import math
import time
from collections import deque

from specpipe.acceptance import expected_tokens

# Forgetting factor of the running estimates: about the last 100 observations count.
FORGET = 0.99
# The Beta prior on the acceptance rate (as pseudo-counts) before anything is observed.
PRIOR_RATE, PRIOR_WEIGHT = 0.7, 4.0
# The target decodes by itself after a rejection nothing foresaw (Decode.until_block) when the
# draft's redraft (the running mean of the measured waits: from such a verdict to the next block)
# takes longer than FILL_MARGIN times a one-token forward: the decoded token then costs the block
# little delay. While it does, one wait in FILL_EXPLORE is not filled, so it is measured. It decodes
# as many tokens as fit in the wait, at most FILL_MAX_TOKENS: a draft that must catch up with
# every token decoded would never catch up with a target that decodes as fast as it drafts.
FILL_MARGIN, FILL_EXPLORE, FILL_MAX_TOKENS = 1.0, 10, 4
# Running means of the target's batch (rows and tokens per forward): about the last 20 forwards count.
BATCH_FORGET = 0.95
# Below this running mean of requests per target forward a request has the workers to itself.
ALONE_BATCH_ROWS = 1.5

# Learnt branch threshold: the share of rejections it should flag, over the draft probabilities of
# the last BRANCH_WINDOW rejected tokens; until BRANCH_MIN_SEEN are seen, BRANCH_PRIOR.
BRANCH_CAPTURE, BRANCH_WINDOW, BRANCH_MIN_SEEN, BRANCH_PRIOR = 0.8, 256, 16, 0.5
# Forks that do not pay: over the last FORK_WINDOW forks that ended (promoted, or cancelled; kept
# apart for greedy and sampled requests), a hit rate surely under FORK_MIN_HIT_RATE (even the upper
# end of its FORK_BOUND_Z Wilson interval is under) turns forking down to one branch point in
# FORK_EXPLORE, which keeps the estimate fresh. The bound, not the rate itself: forks are hit in
# runs (a prompt's hard stretch), and a rate of 0.1 showed 1 hit in its first 40 forks often enough
# that the point estimate turned forking down, and one fork in 50 brought it back only after
# hundreds of requests. The rate is reported once FORK_MIN_SEEN forks have ended.
FORK_WINDOW, FORK_MIN_SEEN, FORK_MIN_HIT_RATE, FORK_EXPLORE, FORK_BOUND_Z = 200, 40, 0.05, 50, 1.96


class AcceptanceModel:
    """Running estimates of the acceptance rate and of the draft and verify step costs."""

    def __init__(self):
        # [accepted, rejected] forgetting sums, apart for greedy (True) and sampled (False) requests:
        # the same pair accepts far less when sampling.
        self.counts = {greedy: [PRIOR_RATE * PRIOR_WEIGHT, (1 - PRIOR_RATE) * PRIOR_WEIGHT] for greedy in (True, False)}
        self.t_draft: float | None = None
        self._verify = [0.0] * 5  # forgetting sums: w, n, n^2, t, n*t
        # Kept apart for greedy (True) and sampled (False) requests: their rejections differ.
        self.rejected_probs = {True: deque(maxlen=BRANCH_WINDOW), False: deque(maxlen=BRANCH_WINDOW)}
        self._threshold: dict[bool, float] = {}
        self.fork_outcomes = {True: deque(maxlen=FORK_WINDOW), False: deque(maxlen=FORK_WINDOW)}  # greedy?
        self._unpaid_points = 0  # branch points seen while forking does not pay
        self.batch_rows: float | None = None  # requests per target forward (running mean)
        self.batch_tokens: float | None = None  # tokens per target forward (running mean)
        self.last_forward_end: float | None = None
        self.redraft_wait: float | None = None  # seconds from a rejection nothing foresaw to the next block
        self._fill_turn = 0

    def rate(self, greedy: bool = True) -> float:
        accepted, rejected = self.counts[greedy]
        return accepted / (accepted + rejected)

    def observe_block(self, num_drafted: int, num_accepted: int, greedy: bool = True) -> None:
        if num_drafted == 0:
            return
        counts = self.counts[greedy]
        counts[0] = FORGET * counts[0] + num_accepted
        counts[1] = FORGET * counts[1] + (num_accepted < num_drafted)

    def observe_draft_step(self, seconds: float) -> None:
        self.t_draft = seconds if self.t_draft is None else 0.9 * self.t_draft + 0.1 * seconds

    def observe_rejected_prob(self, prob: float, greedy: bool = True) -> None:
        """The draft's probability of a token the target rejected."""
        self.rejected_probs[greedy].append(prob)
        self._threshold.pop(greedy, None)

    def branch_threshold(self, greedy: bool = True) -> float:
        """The BRANCH_CAPTURE quantile of the recently rejected tokens' draft probabilities
        (BRANCH_PRIOR until enough are seen); asked at every drafted token, so kept until the
        next rejection."""
        seen = self.rejected_probs[greedy]
        if len(seen) < BRANCH_MIN_SEEN:
            return BRANCH_PRIOR
        if greedy not in self._threshold:
            ordered = sorted(seen)
            self._threshold[greedy] = ordered[min(len(ordered) - 1, int(BRANCH_CAPTURE * len(ordered)))]
        return self._threshold[greedy]

    def observe_fork_outcome(self, greedy: bool, hit: bool) -> None:
        """A fork that ended: promoted (hit), or cancelled."""
        self.fork_outcomes[greedy].append(hit)

    def fork_hit_rate(self, greedy: bool) -> float | None:
        outcomes = self.fork_outcomes[greedy]
        return sum(outcomes) / len(outcomes) if len(outcomes) >= FORK_MIN_SEEN else None

    def forking_pays(self, greedy: bool) -> bool:
        """Fork at this branch point? Yes unless the forks that ended show a hit rate surely under
        FORK_MIN_HIT_RATE; then only at one point in FORK_EXPLORE."""
        outcomes = self.fork_outcomes[greedy]
        if wilson_upper(sum(outcomes), len(outcomes), FORK_BOUND_Z) >= FORK_MIN_HIT_RATE:
            return True
        self._unpaid_points += 1
        return self._unpaid_points % FORK_EXPLORE == 0

    def observe_redraft_wait(self, seconds: float) -> None:
        """The target waited this long for the next block after a rejection nothing foresaw (the
        sync, the draft's first steps and the hops), without decoding meanwhile."""
        self.redraft_wait = seconds if self.redraft_wait is None else 0.9 * self.redraft_wait + 0.1 * seconds

    def fill_tokens(self) -> int:
        """How many tokens the target should decode by itself while the draft redrafts after a
        rejection: as many one-token forwards as fit in the measured redraft wait (at most
        FILL_MAX_TOKENS), when that is at least FILL_MARGIN of them; 0 while the batches hold
        other requests (a forward is theirs too), and for one wait in FILL_EXPLORE, which is
        measured afresh."""
        one = self.verify_seconds(1)  # (the decoded token's forward: its pending token alone)
        if self.redraft_wait is None or not one or not self.few_rows() or self.redraft_wait <= FILL_MARGIN * one:
            return 0
        self._fill_turn += 1
        if self._fill_turn % FILL_EXPLORE == 0:
            return 0
        return max(1, min(FILL_MAX_TOKENS, int(self.redraft_wait / one)))

    def few_rows(self) -> bool:
        """The target's batches hold under ALONE_BATCH_ROWS requests on average, or none was
        measured yet: a forward of one request's is not the other requests' too."""
        return self.batch_rows is None or self.batch_rows < ALONE_BATCH_ROWS

    def observe_verify(self, num_fed: int, seconds: float) -> None:
        sums = [FORGET * s for s in self._verify]
        for i, value in enumerate((1.0, num_fed, num_fed * num_fed, seconds, num_fed * seconds)):
            sums[i] += value
        self._verify = sums

    def verify_seconds(self, num_fed: int) -> float | None:
        """The fitted line T_verify(n) = a + b n; None before any verify was seen."""
        w, n, nn, t, nt = self._verify
        if w == 0:
            return None
        variance = nn / w - (n / w) ** 2
        slope = max(0.0, (nt / w - (n / w) * (t / w)) / variance) if variance > 1e-9 else 0.0
        return t / w + slope * (num_fed - n / w)

    def observe_forward(self, rows: int, tokens: int, seconds: float, now: float | None = None) -> None:
        """One batched forward of the target (every Verdicts message): its cost feeds the verify
        line (seconds against tokens fed), its rows the batch size, its end the iteration clock."""
        self.observe_verify(tokens, seconds)
        self.batch_rows = (
            rows if self.batch_rows is None else BATCH_FORGET * self.batch_rows + (1 - BATCH_FORGET) * rows
        )
        self.batch_tokens = (
            tokens if self.batch_tokens is None else BATCH_FORGET * self.batch_tokens + (1 - BATCH_FORGET) * tokens
        )
        self.last_forward_end = time.monotonic() if now is None else now

    def forward_seconds(self, block_tokens: int) -> float | None:
        """Expected seconds of the target forward that takes a block of `block_tokens`: one over
        the block and what the other requests bring, by the verify line. The others bring the
        running mean batch less one request's share of it (rows - 1 of `batch_rows`), so a request
        alone is timed by its own block: a block of 1 token is not a mean block (with the mean, the
        demo target's forwards of 1- and 2-token blocks ended 1.8 and 1.5 ms before expected, and
        the reports held for their verdicts and the blocks cut just in time behind them came late)."""
        rows = max(1.0, self.batch_rows or 1.0)
        others = (self.batch_tokens or 0.0) * (rows - 1) / rows
        return self.verify_seconds(round(others + block_tokens))

    def mean_forward_seconds(self) -> float | None:
        """Expected seconds of a forward of the running mean batch (a forward whose rows are not known)."""
        return self.verify_seconds(round(max(self.batch_tokens or 0.0, 1.0)))

    def iteration_end(self, now: float) -> float:
        """When the target's forward in progress should end (ask only while it is busy): its next
        forward starts then and takes what is queued."""
        if self.last_forward_end is None:
            return now
        return self.last_forward_end + (self.mean_forward_seconds() or 0.0)

    def tokens_per_second(self, length: int, pipelined: bool, rate: float | None = None) -> float:
        """Expected tokens per second of one request drafting `length` tokens per block (0: the
        target alone) at acceptance `rate` (default: the greedy rate), among `batch_rows` requests
        that do the same: a round (one block verified) takes a target forward over all of them,
        T_verify(B (k + 1)), and k batched draft steps; pipelined, the two overlap. The request's
        share of that time is a B-th (at B = 1, the single-request bound)."""
        a = min(self.rate() if rate is None else rate, 0.999)
        rows = max(1.0, self.batch_rows or 1.0)
        t_forward, t_draft = self.verify_seconds(round(rows * (length + 1))), self.t_draft
        if t_forward is None or t_draft is None:
            return 0.0
        if length == 0:
            return rows / t_forward
        if pipelined:
            reject = 1 - a**length
            tokens = a * (1 - a**length) / (1 - a) + reject
            seconds = max(t_forward, length * t_draft) + reject * t_draft
        else:
            tokens = expected_tokens(a, length)
            seconds = length * t_draft + t_forward
        return tokens * rows / seconds

    def best_length(self, most: int, pipelined: bool, rate: float | None = None) -> int:
        """The block length in 1..most with the highest expected throughput (`most` until the
        costs are known)."""
        rates = [self.tokens_per_second(k, pipelined, rate) for k in range(1, most + 1)]
        return 1 + rates.index(max(rates)) if max(rates) > 0 else most


def wilson_upper(hits: int, trials: int, z: float) -> float:
    """The upper end of the Wilson score interval of a rate seen as `hits` of `trials` (1.0 for no
    trials): where the rate may still be, at z standard errors."""
    if trials == 0:
        return 1.0
    rate, z2 = hits / trials, z * z
    spread = z * math.sqrt(rate * (1 - rate) / trials + z2 / (4 * trials * trials))
    return (rate + z2 / (2 * trials) + spread) / (1 + z2 / trials)
