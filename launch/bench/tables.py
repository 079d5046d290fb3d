"""The benchmark's outputs: results.json, results.md (the tables, from the summaries of
launch/bench/report.py) and speedup.png (launch/bench/plot.py). Text only: no model, no server.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from specpipe.launch.bench.report import LABELS, PAIRS
from specpipe.launch.bench.rules import method_name
from specpipe.modes import Mode

logger = logging.getLogger(__name__)


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
        speeds = "; ".join(
            f"{threads} thread{'s' * (threads != '1')}: " + ", ".join(f"k={k}: {tps:.1f}" for k, tps in by_k.items())
            for threads, by_k in entry["tokens_per_second"].items()
        )
        best = f"best k = {entry['best']}, {entry['threads']} thread{'s' * (entry['threads'] != 1)}"
        lines.append(f"HF assisted calibration at T={temperature} (tokens/s): {speeds}; {best}.")
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
    ]
    for worker in server["workers"]:  # (results before the setup was recorded have none)
        if worker.get("setup"):
            lines.append(f"The {worker['role']} worker's setup: {'; '.join(worker['setup'])}.")
    return lines + [""]
