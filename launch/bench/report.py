"""What `specpipe bench` makes of its raw records: per-method summaries (medians with spread over
trials), the analytical bounds (formulas in the package docstring) and the greedy correctness
check; launch/bench/tables.py writes them out. Pure bookkeeping: no model, no server, no clock.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import Counter
from pathlib import Path

from specpipe.acceptance import expected_tokens
from specpipe.launch.bench.rules import SETTINGS, method_name, setting_key
from specpipe.modes import Mode

logger = logging.getLogger(__name__)

# 2: the concurrency axis ("load"); 3: the sampling-rules axis ("rules"); 4: rejections, main-line
# rollback, hits per rank; 5: prepared hits (hits verified with no coordinator round trip); 6: the
# side-by-side ratios ("pairs"); 7: HF assisted calibrated over thread counts too
# (hf_assisted_grid: tokens_per_second by threads then k, and the best's "threads")
SCHEMA_VERSION = 7
BASELINE = "hf_autoregressive"
LABELS = {  # table order
    "hf_autoregressive": "HF autoregressive, 1 thread (baseline)",
    "hf_autoregressive_2threads": "HF autoregressive, 2 threads",
    "hf_assisted_default": "HF assisted, default settings",
    "hf_assisted_best": "HF assisted, best fixed k and threads",
    "specpipe_autoregressive": "specpipe autoregressive",
    "specpipe_sequential": "specpipe sequential",
    "specpipe_pipelined": "specpipe pipelined",
    "specpipe_specbranch": "specpipe specbranch",
}
# Which schedule bounds each method (None: no bound, e.g. a different thread count).
BOUND_KIND = {
    "hf_autoregressive": "autoregressive",
    "hf_autoregressive_2threads": None,
    "hf_assisted_default": "serial",
    "hf_assisted_best": "serial",
    "specpipe_autoregressive": "autoregressive",
    "specpipe_sequential": "serial",
    "specpipe_pipelined": "overlapped",
    "specpipe_specbranch": "overlapped",
}
# Side by side: (method, over method), each ratio taken within one trial, where the two ran minutes
# apart at most, so a box that slows between trials moves both alike. In table order. HF
# autoregressive at both its thread counts: the baseline at its best setting (the server's two
# workers use two cores).
PAIRS = (
    ("specpipe_autoregressive", "hf_autoregressive"),
    ("specpipe_autoregressive", "hf_autoregressive_2threads"),
    ("specpipe_sequential", "hf_assisted_best"),
    ("specpipe_pipelined", "specpipe_sequential"),
    ("specpipe_specbranch", "specpipe_sequential"),
    ("specpipe_specbranch", "specpipe_pipelined"),
    ("specpipe_specbranch", "hf_assisted_best"),
    ("specpipe_specbranch", "hf_autoregressive"),
    ("specpipe_specbranch", "hf_autoregressive_2threads"),
)
RESULT_KEYS = (
    "schema_version",
    "command_line",
    "started_at",
    "elapsed_s",
    "machine",
    "config",
    "models",
    "prompts",
    "reference_outputs",
    "costs",
    "hf_assisted_grid",
    "trials",
    "errors",
    "server",
    "summary",
    "pairs",
    "correctness",
    "latency",
    "load",
    "rules",
)
SUMMARY_KEYS = (
    "error",
    "trials",
    "tokens_per_second",
    "speedup",
    "tokens_per_verification",
    "accepted_per_verification",
    "acceptance_rate",
    "draft_tokens",
    "rolled_back_tokens",
    "branches_forked",
    "branches_hit",
    "branch_hit_rate",
    "rejections",
    "main_rolled_back_tokens",
    "rejection_hit_rate",
    "rank_hit_rates",
    "prepared_hit_rate",
    "time_to_first_token_s",
    "target_busy_fraction",
    "generated_tokens",
    "draft_tokens_per_verification",
    "matches_autoregressive",
    "bound",
)


def machine() -> dict:
    import platform

    import grpc
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "grpcio": grpc.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


# --- summaries -------------------------------------------------------------------------------


def spread(values: list[float]) -> dict | None:
    if not values:
        return None
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": quartiles[0],
        "q3": quartiles[2],
        "n": len(values),
    }


def implied_acceptance(tokens_per_round: float, k: int) -> float:
    """The a whose E(a, k) equals the measured tokens per verification (bisection; E rises with a)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if expected_tokens(middle, k) < tokens_per_round else (low, middle)
    return (low + high) / 2


def needed_ks(records: list[dict]) -> set[int]:
    """The k of every bound: drafted tokens per verification of a method at a temperature, rounded
    (measured, not configured: a confidence stop, HF's default or the server's policy, ends blocks
    early). method_summary and bound compute the same figure."""
    totals: dict[tuple, Counter] = {}
    for record in records:
        if record["error"] is None:
            totals.setdefault((record["method"], record["temperature"]), Counter()).update(record["counters"])
    return {
        max(1, round(c["draft_tokens"] / c["verifications"]))
        for c in totals.values()
        if c["draft_tokens"] and c["verifications"]
    }


def method_summary(records: list[dict], baseline: dict[int, float], error: str | None, greedy: bool) -> dict:
    ok = [record for record in records if record["error"] is None]
    summary = dict.fromkeys(SUMMARY_KEYS)
    summary.update(error=error or next((r["error"] for r in records if r["error"]), None), trials=len(ok))
    if not ok:
        return summary
    totals: Counter = Counter()
    for record in ok:
        totals.update(record["counters"])
    drafted, verifications = totals["draft_tokens"], totals["verifications"]
    summary.update(
        tokens_per_second=spread([r["tokens_per_second"] for r in ok]),
        speedup=spread([r["tokens_per_second"] / baseline[r["trial"]] for r in ok if r["trial"] in baseline]),
        tokens_per_verification=totals["committed_tokens"] / verifications if verifications else None,
        accepted_per_verification=totals["accepted_tokens"] / verifications if verifications and drafted else None,
        acceptance_rate=totals["accepted_tokens"] / drafted if drafted else None,
        draft_tokens=drafted / len(ok),
        rolled_back_tokens=totals["rolled_back_tokens"] / len(ok),
        branches_forked=totals["branches_forked"] / len(ok),
        branches_hit=totals["branches_hit"] / len(ok),
        branch_hit_rate=totals["branches_hit"] / totals["branches_forked"] if totals["branches_forked"] else None,
        **rejection_summary(totals, len(ok)),
        time_to_first_token_s=spread([ttft for r in ok for ttft in r["ttft_s"]]),
        target_busy_fraction=sum(r["target_busy_s"] for r in ok) / sum(r["seconds"] for r in ok),
        generated_tokens=sum(r["tokens"] for r in ok) / len(ok),
        draft_tokens_per_verification=drafted / verifications if drafted and verifications else None,
        matches_autoregressive=all(all(r["matches_autoregressive"]) for r in ok) if greedy else None,
    )
    return summary


def rejection_summary(totals: Counter, trials: int) -> dict:
    """Per trial: rejections and the main-line tokens they threw away; the share of rejections a
    promoted branch answered (its prepared draft held the target's token); per rank of the
    alternative, hits over the rejections where a branch of that rank was there; the share of hits
    whose block was already queued on the target (prepared: no coordinator round trip). None where
    the method does not report them (Hugging Face's)."""
    if "rejections" not in totals:
        return dict(
            rejections=None,
            main_rolled_back_tokens=None,
            rejection_hit_rate=None,
            rank_hit_rates=None,
            prepared_hit_rate=None,
        )
    ranks = []
    while f"rank{len(ranks)}_tried" in totals:
        tried, hits = totals[f"rank{len(ranks)}_tried"], totals[f"rank{len(ranks)}_hits"]
        ranks.append({"tried": tried / trials, "hits": hits / trials, "rate": hits / tried if tried else None})
    return dict(
        rejections=totals["rejections"] / trials,
        main_rolled_back_tokens=totals["main_rolled_back_tokens"] / trials,
        rejection_hit_rate=totals["branches_hit"] / totals["rejections"] if totals["rejections"] else None,
        rank_hit_rates=ranks or None,
        prepared_hit_rate=(
            totals["prepared_hits"] / totals["branches_hit"]
            if totals["branches_hit"] and "prepared_hits" in totals
            else None
        ),
    )


def bound(summary: dict, kind: str | None, costs: dict) -> dict | None:
    if kind is None or summary["speedup"] is None:
        return None
    speedup = summary["speedup"]["median"]
    if kind == "autoregressive":
        return {"kind": kind, "bound": 1.0, "fraction_of_bound": speedup}
    a, per_verification = summary["acceptance_rate"], summary["draft_tokens_per_verification"]
    if a is None or per_verification is None:
        return None
    k = max(1, round(per_verification))
    if str(k) not in costs["t_verify_s"]:
        return None
    t_ar, t_draft, t_verify = costs["t_ar_s"], costs["t_draft_s"], costs["t_verify_s"][str(k)]
    tokens_per_round = expected_tokens(a, k)
    serial = tokens_per_round * t_ar / (k * t_draft + t_verify)
    overlapped = tokens_per_round * t_ar / max(t_verify, k * t_draft)
    chosen = serial if kind == "serial" else overlapped
    return {
        "kind": kind,
        "k": k,
        "a": a,
        "expected_tokens_per_round": tokens_per_round,
        "a_implied": implied_acceptance(summary["tokens_per_verification"], k),
        "serial": serial,
        "overlapped": overlapped,
        "bound": chosen,
        "fraction_of_bound": speedup / chosen,
    }


def summarize_group(
    records: list[dict], temperature: float, errors: dict, costs: dict | None, baseline_method: str
) -> dict:
    baseline = {
        r["trial"]: r["tokens_per_second"] for r in records if r["method"] == baseline_method and r["error"] is None
    }
    names = [name for name in LABELS if any(r["method"] == name for r in records) or name in errors]
    summaries = {}
    for name in names:
        summaries[name] = method_summary(
            [r for r in records if r["method"] == name], baseline, errors.get(name), greedy=temperature == 0
        )
        if costs is not None:
            summaries[name]["bound"] = bound(summaries[name], BOUND_KIND.get(name), costs)
    return summaries


def pair_ratios(records: list[dict]) -> dict:
    """Per PAIRS entry whose two methods both ran: the spread of their per-trial tokens/s ratios
    (trials where either failed are left out), keyed "method/over"."""
    rates: dict[str, dict[int, float]] = {}
    for record in records:
        if record["error"] is None:
            rates.setdefault(record["method"], {})[record["trial"]] = record["tokens_per_second"]
    pairs = {}
    for name, over in PAIRS:
        trials = sorted(set(rates.get(name, {})) & set(rates.get(over, {})))
        if trials:
            pairs[f"{name}/{over}"] = spread([rates[name][t] / rates[over][t] for t in trials])
    return pairs


def summarize_rules(rules: dict) -> None:
    """rules["summary"][setting][method]: the method summary; speedup is × over specpipe
    autoregressive with the same rule and setting in the same trial."""
    if "trials" not in rules:
        return
    rules["summary"] = {}
    for temperature, top_p in SETTINGS:
        records = [r for r in rules["trials"] if r["temperature"] == temperature and r["top_p"] == top_p]
        summaries = rules["summary"][setting_key(temperature, top_p)] = {}
        for rule in rules["rules"]:
            reference = method_name(Mode.AUTOREGRESSIVE, rule)
            baseline = {
                r["trial"]: r["tokens_per_second"] for r in records if r["method"] == reference and r["error"] is None
            }
            for mode in [Mode.AUTOREGRESSIVE, *map(Mode, rules["modes"])]:
                name = method_name(mode, rule)
                summaries[name] = method_summary(
                    [r for r in records if r["method"] == name], baseline, rules["errors"].get(name), greedy=False
                )


def mismatches(records: list[dict], reference: list[list[int]]) -> list[dict]:
    found = []
    for record in records:
        for index, ok in enumerate(record.get("matches_autoregressive") or []):
            if not ok:
                got, expected = record["outputs"][index], reference[index]
                first = next((i for i, (x, y) in enumerate(zip(got, expected)) if x != y), min(len(got), len(expected)))
                found.append(
                    {
                        "method": record["method"],
                        "trial": record["trial"],
                        "prompt": index,
                        "latency_ms": record.get("latency_ms"),
                        "first_difference_at": first,
                        "got": got[first : first + 8],
                        "expected": expected[first : first + 8],
                    }
                )
    return found


def summarize(results: dict) -> dict:
    """results from bench.run, plus summary, latency.summary and correctness."""
    temperatures = sorted({r["temperature"] for r in results["trials"]})
    results["summary"] = {
        f"{t:g}": summarize_group(
            [r for r in results["trials"] if r["temperature"] == t], t, results["errors"], results["costs"], BASELINE
        )
        for t in temperatures
    }
    results["pairs"] = {
        f"{t:g}": pair_ratios([r for r in results["trials"] if r["temperature"] == t]) for t in temperatures
    }
    latency = results["latency"]
    if "trials" in latency:
        latency["summary"] = {
            f"{ms:g}": summarize_group(
                [r for r in latency["trials"] if r["latency_ms"] == ms],
                0.0,
                latency["errors"],
                None,
                "specpipe_sequential",
            )
            for ms in latency["latencies_ms"]
        }
    found = mismatches(results["trials"] + latency.get("trials", []), results["reference_outputs"])
    summarize_rules(results["rules"])
    results["correctness"] = {"reference": "hf_autoregressive, greedy", "all_match": not found, "mismatches": found}
    results["schema_version"] = SCHEMA_VERSION
    return {key: results[key] for key in RESULT_KEYS}


# --- outputs ---------------------------------------------------------------------------------
