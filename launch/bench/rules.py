"""The sampling-rules axis of `specpipe bench` (issue 14), its names: the default rule (Leviathan et
al.'s rejection sampling with position-keyed draws) against the drafter-invariant coupling (the
same Gumbel noise, keyed by seed and position, on both sides), on seeded requests at each setting.

Both rules are exact samplers of the target, so only their acceptance (accepted / drafted) and
speed differ; specpipe autoregressive with the same rule and setting (the rule decides how the
target alone samples: inverse CDF or Gumbel argmax) is the reference for speed.
run.plan_rules_axis adds its trials to the main ones (interleaved, on the same server);
report.summarize_rules / rules_lines report it.
"""

from __future__ import annotations

import dataclasses

from specpipe.modes import Mode

SETTINGS = ((1.0, 1.0), (0.7, 0.9))  # (temperature, top_p): the two the issue names
RULES = {"leviathan": False, "drafter_invariant": True}  # rule -> GenerateRequest.drafter_invariant
RULE_MODES = (Mode.SEQUENTIAL, Mode.SPECBRANCH)


def method_name(mode: Mode, rule: str | None = None) -> str:
    return f"specpipe_{mode}" + ("" if rule is None else f"+{rule}")


def setting_key(temperature: float, top_p: float) -> str:
    return f"T={temperature:g} top_p={top_p:g}"


def with_params(method, rule: str | None, **params):
    """A bench Method that also asks the server for `params` (top_p, drafter_invariant), named for
    the rule."""
    inner = method.run

    def run(prompt_ids, temperature, seed):
        return inner(prompt_ids, temperature, seed, **params)

    return dataclasses.replace(method, name=method.name if rule is None else f"{method.name}+{rule}", run=run)
