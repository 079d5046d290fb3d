"""What `specpipe bench` makes of its raw records: per-method summaries (medians with spread over
trials), the analytical bounds (formulas in the package docstring), the greedy correctness check,
and the three outputs (results.json, results.md, speedup.png). Pure bookkeeping: no model, no
server, no clock.
"""

from __future__ import annotations

import json
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
# side-by-side ratios ("pairs")
SCHEMA_VERSION = 6
BASELINE = "hf_autoregressive"
LABELS = {  # table order
    "hf_autoregressive": "HF autoregressive, 1 thread (baseline)",
    "hf_autoregressive_2threads": "HF autoregressive, 2 threads",
    "hf_assisted_default": "HF assisted, default settings",
    "hf_assisted_best": "HF assisted, best fixed k",
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
# apart at most, so a box that slows between trials moves both alike. In table order.
PAIRS = (
    ("specpipe_autoregressive", "hf_autoregressive"),
    ("specpipe_sequential", "hf_assisted_best"),
    ("specpipe_pipelined", "specpipe_sequential"),
    ("specpipe_specbranch", "specpipe_sequential"),
    ("specpipe_specbranch", "specpipe_pipelined"),
    ("specpipe_specbranch", "hf_assisted_best"),
    ("specpipe_specbranch", "hf_autoregressive"),
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


def write_outputs(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    try:
        from specpipe.launch.bench.plot import plot

        plot(results, out / "speedup.png", LABELS)
        paths.append(out / "speedup.png")
    except ImportError as err:
        logger.warning("no speedup.png: %s (pip install 'specpipe[bench]')", err)
    return paths


def _spread_text(value: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value['median'] * scale:.{digits}f} [{value['min'] * scale:.{digits}f}–{value['max'] * scale:.{digits}f}]"


def _number(value: float | None, pattern: str = "{:.2f}") -> str:
    return "–" if value is None else pattern.format(value)


def _match_text(value: bool | None) -> str:
    return {True: "✓", False: "**✗ MISMATCH**", None: "–"}[value]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rolled_back_text(s: dict) -> str:
    if not s["draft_tokens"]:
        return "–"
    main = s.get("main_rolled_back_tokens")
    return f"{s['rolled_back_tokens']:.0f}" + ("" if main is None else f" (main {main:.0f})")


def _branch_hits_text(s: dict) -> str:
    """Hits over forks; over rejections, and per rank over the rejections that rank was there for."""
    if s["branch_hit_rate"] is None:
        return "–"
    text = f"{s['branch_hit_rate']:.0%} of forks"
    if s.get("rejection_hit_rate") is not None:
        text += f", {s['rejection_hit_rate']:.0%} of rejections"
    if s.get("rank_hit_rates"):
        text += "; by rank " + " / ".join(_number(rank["rate"], "{:.0%}") for rank in s["rank_hit_rates"])
    if s.get("prepared_hit_rate") is not None:
        text += f"; {s['prepared_hit_rate']:.0%} of hits prepared"
    return text


def method_row(name: str, s: dict) -> str:
    if s["trials"] == 0:
        return f"| {LABELS[name]} | **error:** {_cell(s['error'])} |" + " |" * 11
    b = s["bound"]
    bound_text = "–" if b is None else f"{b['bound']:.2f}× {b['kind']}"
    cells = [
        LABELS[name] + (" ⚠" if s["error"] else ""),
        _spread_text(s["tokens_per_second"]),
        _spread_text(s["speedup"], digits=2) + "×" if s["speedup"] else "–",
        _number(s["tokens_per_verification"]),
        _number(s["acceptance_rate"]),
        _number(s["draft_tokens"] if s["draft_tokens"] else None, "{:.0f}"),
        _rolled_back_text(s),
        _branch_hits_text(s),
        _spread_text(s["time_to_first_token_s"], 1e3),
        _number(s["target_busy_fraction"], "{:.0%}"),
        bound_text,
        "–" if b is None else f"{b['fraction_of_bound']:.0%}",
        _match_text(s["matches_autoregressive"]),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict) -> str:
    config, machine_info, models = results["config"], results["machine"], results["models"]
    lines = [
        "# specpipe benchmark",
        "",
        f"{machine_info['cpu_model']}, {machine_info['usable_cores']} usable cores"
        f"{''.join(f', {name}' for name in machine_info.get('gpus', []))}; Python "
        f"{machine_info['python']}, torch {machine_info['torch']}, transformers {machine_info['transformers']}. "
        f"Target {models['target_params'] / 1e6:.2f}M parameters on {config.get('target_device', 'cpu')}, "
        f"draft {models['draft_params'] / 1e6:.2f}M on {config.get('draft_device', 'cpu')}. "
        f"{len(results['prompts'])} prompts × up to {config['max_new_tokens']} new tokens, "
        f"{config['trials']} interleaved trials; cells are the median [min–max] over trials; speedup is "
        "over HF autoregressive (1 thread) in the same trial; drafted and rolled back are per trial (main: "
        "the main line's part, the rest is cancelled branches). Branch hits: promoted branches over those "
        "forked, over the rejections, and per rank of the alternative (the draft's 2nd, 3rd choice) over the "
        "rejections where a branch of that rank was there; prepared: the hits whose block was already queued "
        "on the target, verified without a round trip through the coordinator.",
        "",
    ]
    correctness = results["correctness"]
    if not correctness["all_match"]:
        methods = sorted({m["method"] for m in correctness["mismatches"]})
        lines += [
            f"> **CORRECTNESS FAILURE:** greedy output of {', '.join(methods)} differs from HF "
            "autoregressive (details under `correctness` in results.json).",
            "",
        ]
    header = (
        "| Method | tokens/s | speedup | tokens/verify | acceptance | drafted | rolled back | branch hits "
        "| TTFT ms | target busy | bound | % of bound | greedy = AR |"
    )
    for temperature, summaries in results["summary"].items():
        title = "Greedy (temperature 0)" if float(temperature) == 0 else f"Sampling, temperature {temperature}"
        lines += [f"## {title}", "", header, "|" + "---|" * 13]
        lines += [method_row(name, s) for name, s in summaries.items()] + [""]
    errors = {**results["errors"], **results["latency"].get("errors", {}), **results["rules"].get("errors", {})}
    if errors:
        lines += ["Errors: " + "; ".join(f"`{name}`: {_cell(error)}" for name, error in errors.items()), ""]
    lines += (
        pair_lines(results["pairs"])
        + load_lines(results["load"])
        + rules_lines(results["rules"])
        + latency_lines(results["latency"])
        + cost_lines(results)
        + ["Made with:", "", "```", results["command_line"], "```", ""]
    )
    return "\n".join(lines)


def pair_lines(pairs: dict) -> list[str]:
    """The side-by-side table: a row per pair, a column per temperature."""
    names = [f"{name}/{over}" for name, over in PAIRS if any(f"{name}/{over}" in p for p in pairs.values())]
    if not names:
        return []
    lines = [
        "## Side by side",
        "",
        "Each cell: the ratio of two methods' tokens/s within one trial (they ran in the same interleaved "
        "trial, so a box that slows between trials moves both alike), median [min–max] over trials.",
        "",
        "| | " + " | ".join(f"T = {t}" for t in pairs) + " |",
        "|" + "---|" * (len(pairs) + 1),
    ]
    for key in names:
        name, over = key.split("/")
        cells = [_spread_text(p.get(key), digits=2) + ("×" if key in p else "") for p in pairs.values()]
        lines.append(f"| {LABELS[name]} over {LABELS[over].removesuffix(' (baseline)')} | " + " | ".join(cells) + " |")
    return lines + [""]


def load_lines(load: dict) -> list[str]:
    from specpipe.launch.bench.load import load_summary_rows

    if not load.get("levels"):
        why = load.get("skipped") or load.get("error") or "no levels"
        return ["## Concurrency", "", _cell(f"Not run: {why}") + ".", ""]
    return (
        [
            "## Concurrency: throughput against clients",
            "",
            f"Each level: N clients at once, {load['requests_per_client']} requests each of up to "
            f"{load['max_new_tokens']} tokens, through one server; the baseline is HF `generate` with a static "
            "left-padded batch of N (every row run to the full length; the better of 1 and 2 threads). Cells: "
            "aggregate tokens/s (× over the HF batch of the same N); request latency p50/p99; mean rows per "
            "forward, target/draft.",
            "",
            "| clients | T | HF batch tokens/s | " + " | ".join(load["modes"]) + " |",
            "|" + "---|" * (3 + len(load["modes"])),
        ]
        + ["| " + " | ".join(row) + " |" for row in load_summary_rows(load)]
        + [""]
    )


def rules_lines(rules: dict) -> list[str]:
    """A row per mode and rule (autoregressive first, the reference), a column per setting."""
    if "summary" not in rules:
        return ["## Sampling rules", "", _cell(f"Not run: {rules.get('skipped') or rules.get('error')}") + ".", ""]
    settings = list(rules["summary"])
    lines = [
        "## Sampling rules: Leviathan against drafter-invariant (seeded requests)",
        "",
        "Cells: acceptance (accepted / drafted); tokens per verification; tokens/s, median [min–max], and "
        "× over specpipe autoregressive with the same rule and setting in the same trial.",
        "",
        "| Mode | rule | " + " | ".join(settings) + " |",
        "|" + "---|" * (len(settings) + 2),
    ]
    rows = [(mode, rule) for rule in rules["rules"] for mode in [Mode.AUTOREGRESSIVE, *map(Mode, rules["modes"])]]
    for mode, rule in rows:
        cells = []
        for setting in settings:
            s = rules["summary"][setting][method_name(mode, rule)]
            if not s["trials"]:
                cells.append(f"error: {_cell(s['error'])}" if s["error"] else "–")
                continue
            if mode == Mode.AUTOREGRESSIVE:  # the reference: nothing drafted
                cells.append(_spread_text(s["tokens_per_second"]))
                continue
            cells.append(
                f"{_number(s['acceptance_rate'])}; {_number(s['tokens_per_verification'])} tok/verify; "
                + _spread_text(s["tokens_per_second"])
                + (f" ({s['speedup']['median']:.2f}×)" if s["speedup"] else "")
            )
        lines.append(f"| {mode} | {rule} | " + " | ".join(cells) + " |")
    return lines + [""]


def latency_lines(latency: dict) -> list[str]:
    if "summary" not in latency:
        why = f"Skipped: {latency['skipped']}" if "skipped" in latency else f"Failed: {latency.get('error')}"
        return ["## Draft link latency", "", _cell(why) + ".", ""]
    columns = list(latency["summary"])
    label = ("**simulated** — " if latency["simulated"] else "") + latency["link"]
    lines = [
        "## Draft link latency (greedy)",
        "",
        f"Link: {label}. Cells: tokens/s, median [min–max], and × over sequential at the same latency.",
        "",
        "| Mode | " + " | ".join(f"{ms} ms one-way" for ms in columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for mode in latency["modes"]:
        name, cells = f"specpipe_{mode}", []
        for ms in columns:
            s = latency["summary"][ms].get(name)
            if s is None or s["trials"] == 0:
                cells.append(f"error: {_cell(s['error'])}" if s else "–")
                continue
            baseline = Mode(mode) == Mode.SEQUENTIAL
            ratio = "" if baseline or s["speedup"] is None else f" ({s['speedup']['median']:.2f}×)"
            cells.append(
                _spread_text(s["tokens_per_second"])
                + ratio
                + ("" if s["matches_autoregressive"] else " **✗ MISMATCH**")
            )
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


def cost_lines(results: dict) -> list[str]:
    costs, grid, server = results["costs"], results["hf_assisted_grid"], results["server"]
    verify = ", ".join(f"t_verify(k={k}) = {seconds * 1e3:.2f} ms" for k, seconds in costs["t_verify_s"].items())
    lines = [
        "## Costs and bounds",
        "",
        f"One thread, {costs['context_tokens']} tokens in the KV cache, medians of {costs['repeats']}: "
        f"t_ar = {costs['t_ar_s'] * 1e3:.2f} ms, t_draft = {costs['t_draft_s'] * 1e3:.2f} ms, {verify}.",
        "With a = acceptance and E = (1 − a^(k+1)) / (1 − a): serial bound = E·t_ar / (k·t_draft + t_verify); "
        "overlapped bound = E·t_ar / max(t_verify, k·t_draft); % of bound = speedup / bound.",
        "",
    ]
    for temperature, entry in grid.items():
        speeds = ", ".join(f"k={k}: {tps:.1f}" for k, tps in entry["tokens_per_second"].items())
        lines.append(f"HF assisted calibration at T={temperature} (tokens/s): {speeds}; best k = {entry['best']}.")
    if "error" in server:
        return lines + ["", f"Server: {_cell(server['error'])}.", ""]
    workers = ", ".join(f"{w['role']} busy {w['busy_fraction']:.0%}" for w in server["workers"])
    specpipe_s = sum(r["seconds"] for r in results["trials"] if r["method"].startswith("specpipe_") and not r["error"])
    cpu = server["coordinator_cpu_s"]
    share = f"{cpu / specpipe_s:.1%} of one core" if cpu is not None and specpipe_s else "unknown"
    lines += [
        "",
        f"Server over the run: {workers}; coordinator CPU {share} while serving; "
        f"{'state LEAKED on a worker' if server['leaked'] else 'no state left on the workers'}.",
        "",
    ]
    return lines
