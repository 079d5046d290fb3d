"""The draft-length and branch policy: every decision of how much to draft and where to branch
lives here, switchable per flag so each part can be measured alone (the SpecBranch issue).

Kinds (`--policy`):
- `fixed`: blocks of `num_draft_tokens`, no confidence stop (PEARL's fixed gamma).
- `confidence` (implicit signal, SpecBranch's H-RAD): also end a block after a draft token whose
  probability is under `min_confidence`; in specbranch mode that token is the branch point.
- `adaptive` (model-free): `confidence`, plus a draft length chosen from the running
  distribution of accepted lengths (see `AcceptanceModel`).

Branches: at a branch point, fork one branch per next-best candidate whose draft probability is
at least `min_branch_prob`, at most `branch_width` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("fixed", "confidence", "adaptive")


@dataclass(frozen=True)
class PolicyConfig:
    kind: str = "confidence"
    num_draft_tokens: int = 4          # block length (the most for `adaptive`)
    min_confidence: float = 0.4        # end a block after a token less likely than this
    branch_width: int = 3              # most alternatives forked at a branch point
    min_branch_prob: float = 0.05      # skip candidates the draft itself finds unlikely

    def __post_init__(self):
        assert self.kind in POLICIES, f"policy kind must be one of {POLICIES}"
        assert self.num_draft_tokens >= 1, "num_draft_tokens must be >= 1"


class DraftPolicy:
    """Per-request policy state. `mode` is the request's schedule."""

    def __init__(self, config: PolicyConfig, mode: str):
        self.config, self.mode = config, mode
        self.accepted_lengths: list[int] = []

    @property
    def min_confidence(self) -> float:
        if self.mode in ("autoregressive", "pipelined") or self.config.kind == "fixed":
            return 0.0   # pipelined = PEARL without branches: fixed-length blocks
        return self.config.min_confidence

    @property
    def branch_width(self) -> int:
        return self.config.branch_width if self.mode == "specbranch" else 0

    def block_length(self) -> int:
        return self.config.num_draft_tokens

    def branch_candidates(self, candidate_ids: list[int], candidate_probs: list[float]) -> list[int]:
        return [token_id for token_id, prob in zip(candidate_ids, candidate_probs)
                if prob >= self.config.min_branch_prob][:self.branch_width]

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        self.accepted_lengths.append(num_accepted)
