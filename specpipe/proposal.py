"""The draft's proposal temperature: the law it samples draft tokens from, per request temperature.

Leviathan et al.'s rejection rule is exact for *any* proposal law q, as long as the target judges
a draft token by the q it was drawn from (the draft sends that q on the data plane). Which q the
draft samples from is therefore free, and it decides how many tokens are accepted: the chance a
draft token survives is sum_x min(p(x), q(x)), 1 - the total variation between the two laws. A
small draft trained on the target's greedy text is sharper than the target's sampled law (the demo
draft's entropy is 3.0 nats where the target's is 4.5 at temperature 1), so drawing from it at the
request's temperature is not the best proposal: drawing at 1.2x that temperature raises the
acceptance from 0.64 to 0.73 on the demo pair. The best factor depends on the request's
temperature (1.2 at 1.0, 1.4 at 0.7, 1.6 and more at 0.5 there), so it is a table.

`ProposalTemperatures` is that table: the factor at a few request temperatures, interpolated in
log temperature between them and held flat past the ends; `proposal(sampling)` is the law the
draft samples a request's tokens from. It applies to the default rule only: greedy needs no proposal, and
the drafter-invariant coupling proposes argmax(log q + g) whose noise must match the target's.

`load_table(draft_dir)` finds `<draft>/draft_temperature.json` beside the draft's weights (None when
absent, or when it was fitted for other draft weights); `acceptance_by_scale` is the measure it is
fitted by, the offline tool specpipe/tools/calibrate_draft.py (`specpipe calibrate-draft`) the fit.
A seeded request stays reproducible: the table is fixed while a worker runs, so the same request
draws from the same q. Knows nothing of workers, sockets or the coordinator.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from specpipe.predictor import weights_sha256
from specpipe.sampling import SamplingParams, logits_to_probs

log = logging.getLogger(__name__)

FILE_NAME = "draft_temperature.json"
# The draft never samples below this (the smallest request temperature the server accepts is 1e-5).
MIN_DRAFT_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class ProposalTemperatures:
    """The factor the draft multiplies a request's temperature by: `scales[i]` at request
    temperature `temperatures[i]` (ascending, > 0), log-linear in between, flat past the ends."""

    temperatures: tuple[float, ...] = (1.0,)
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if not self.temperatures or len(self.temperatures) != len(self.scales):
            raise ValueError("a proposal table needs as many scales as temperatures, at least one")
        if any(not (math.isfinite(t) and t > 0) for t in self.temperatures) or list(self.temperatures) != sorted(
            set(self.temperatures)
        ):
            raise ValueError(f"temperatures must be finite, > 0 and ascending, got {self.temperatures}")
        if any(not (math.isfinite(s) and s > 0) for s in self.scales):
            raise ValueError(f"scales must be finite and > 0, got {self.scales}")

    @classmethod
    def uniform(cls, scale: float) -> ProposalTemperatures:
        """One factor at every temperature (1.0: the draft samples at the request's own)."""
        return cls((1.0,), (float(scale),))

    @property
    def is_identity(self) -> bool:
        return all(scale == 1.0 for scale in self.scales)

    def scale_for(self, temperature: float) -> float:
        temps, scales = self.temperatures, self.scales
        if temperature <= temps[0]:
            return scales[0]
        if temperature >= temps[-1]:
            return scales[-1]
        hi = bisect.bisect_right(temps, temperature)
        lo = hi - 1
        weight = math.log(temperature / temps[lo]) / math.log(temps[hi] / temps[lo])
        return scales[lo] + weight * (scales[hi] - scales[lo])

    def proposal(self, sampling: SamplingParams) -> SamplingParams:
        """The law the draft samples a request's tokens from: the request's own for greedy and the
        coupling, else its top-k / top-p at the scaled temperature."""
        if sampling.greedy or sampling.coupled or self.is_identity:
            return sampling
        temperature = max(sampling.temperature * self.scale_for(sampling.temperature), MIN_DRAFT_TEMPERATURE)
        return SamplingParams(temperature, sampling.top_k, sampling.top_p, sampling.drafter_invariant)

    def to_json(self) -> dict:
        return {"temperatures": list(self.temperatures), "scales": list(self.scales)}


def load_table(draft_dir, path=None) -> ProposalTemperatures | None:
    """The table saved beside the draft's weights, or None: when there is none (a hub id, a folder
    without one) or when it was fitted for other draft weights. A malformed file is an error that
    names it (a worker should not start on a file it cannot read)."""
    draft_dir = Path(draft_dir)
    path = Path(path) if path is not None else draft_dir / FILE_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        table = ProposalTemperatures(
            tuple(float(t) for t in info["temperatures"]), tuple(float(s) for s in info["scales"])
        )
    except KeyError as err:
        raise ValueError(f"{path}: not a draft temperature table (no {err} field)") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a draft temperature table ({err})") from None
    expected = info.get("draft_weights_sha256")
    if expected is not None and weights_sha256(draft_dir) not in (None, expected):
        log.warning("ignoring %s: it was fitted for other draft weights", path)
        return None
    return table


def acceptance_by_scale(
    target_logits: torch.Tensor,  # [positions, vocab]
    draft_logits: torch.Tensor,  # [positions, vocab], the same positions
    sampling: SamplingParams,
    scales: list[float],
) -> torch.Tensor:
    """[len(scales)]: the mean over positions of sum_x min(p(x), q_s(x)), the chance a draft
    token drawn from q_s is accepted, where p is the target's law for `sampling` and q_s the
    draft's at the temperature scaled by s (same top-k / top-p)."""
    assert not sampling.greedy and target_logits.shape == draft_logits.shape, "sampled laws over the same rows"
    p = logits_to_probs(target_logits, sampling)
    rates = []
    for scale in scales:
        q = logits_to_probs(draft_logits, ProposalTemperatures.uniform(scale).proposal(sampling))
        rates.append(torch.minimum(p, q).sum(-1).mean())
    return torch.stack(rates)
