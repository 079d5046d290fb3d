"""`specpipe bench`, the run (the package docstring, launch/bench/__init__.py, is the glossary):
BenchConfig (config.py) -> the reference outputs, the HF calibration, the interleaved trials through
one `specpipe serve` child, the latency axis and the step costs, gathered as one raw results dict
for report.py. Talks to the server only through `specpipe.Client`; tables and plots are tables.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from specpipe.launch.bench.link import QUIET_ENV, choose_link, serve_args
from specpipe.launch.bench.load import run_load_axis
from specpipe.launch.bench.runners import (
    HF_THREADS,
    HFRunner,
    TrialRunner,
    describe_error,
    interleaved,
    measure_costs,
    specpipe_method,
    tune_assistant,
    warm_up,
)
from specpipe.launch.bench.rules import RULE_MODES, RULES, SETTINGS, with_params
from specpipe.launch.bench.config import BenchConfig, add_bench_args, config_from_args, load_prompts, resolve_models
from specpipe.modes import Mode

logger = logging.getLogger(__name__)

# The modes whose draft sits behind the link: every mode that drafts.
LATENCY_MODES = tuple(mode for mode in Mode if mode != Mode.AUTOREGRESSIVE)
REQUEST_TIMEOUT_S = 300.0  # a hung mode becomes that method's error, not a hung benchmark


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (Linux /proc), for the coordinator's CPU share."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# --- the run -----------------------------------------------------------------------------------


def server_snapshot(client, coordinator_pid: int, cpu_start: float | None) -> dict:
    """Worker stats after the trials (live requests/branches must be 0: nothing leaked) and the
    coordinator's CPU seconds over them."""
    try:
        stats = client.stats()
    except Exception as err:
        return {"error": describe_error(err)}
    cpu_end = process_cpu_s(coordinator_pid)
    workers = [
        {
            "role": w.role,
            "healthy": w.healthy,
            "live_requests": w.live_requests,
            "live_branches": w.live_branches,
            "busy_fraction": w.busy_fraction,
            "setup": list(w.setup),
        }
        for w in stats.workers
    ]
    return {
        "workers": workers,
        "live_requests": stats.live_requests,
        "leaked": stats.live_requests > 0 or any(w["live_requests"] or w["live_branches"] for w in workers),
        "coordinator_cpu_s": None if cpu_start is None or cpu_end is None else cpu_end - cpu_start,
    }


def serve_and_run(
    config: BenchConfig, serve_flags: list[str], runner: TrialRunner, modes, jobs, seed: int, before=None
) -> tuple[list[dict], dict]:
    """Start one server, warm up a method per mode, run `jobs(server methods)` interleaved; a server
    that does not start fails its modes (recorded), and the other jobs still run."""
    from specpipe.client import Client
    from specpipe.launch.local import ServerProcess

    with contextlib.ExitStack() as stack:
        client, server, error = None, None, None
        try:
            server = stack.enter_context(ServerProcess(serve_flags, env=QUIET_ENV))
            client = stack.enter_context(Client(server.addr, timeout=REQUEST_TIMEOUT_S))
        except Exception as err:
            error = f"the server did not start: {describe_error(err)}"
            logger.error(error)
            runner.failed.update({f"specpipe_{mode}": error for mode in modes})
        methods = [specpipe_method(client, mode, config.max_new_tokens, config.num_draft_tokens) for mode in modes]
        warm_up(runner, methods)
        cpu_start = process_cpu_s(server.process.pid) if server else None
        records = interleaved(runner, jobs(methods), config.trials, seed, before)
        return records, server_snapshot(client, server.process.pid, cpu_start) if client else {"error": error}


def run_latency_axis(
    config: BenchConfig, serve_flags: list[str], draft: str, runner: TrialRunner, link_choice: tuple
) -> dict:
    modes = [mode for mode in LATENCY_MODES if mode in config.modes]
    if not config.latencies_ms:
        return {"skipped": "no latencies asked for (--latencies none)"}
    if not modes:
        return {"skipped": "none of sequential, pipelined, specbranch in --modes"}
    link_class, problem = link_choice
    result = {
        "link": link_class.kind,
        "simulated": link_class.simulated,
        "netns_problem": problem,
        "latencies_ms": list(config.latencies_ms),
        "modes": modes,
    }
    try:
        link = link_class(draft, config.draft_device)
    except Exception as err:
        logger.error("latency axis: the link did not come up: %s", describe_error(err))
        return {**result, "error": f"the link did not come up: {describe_error(err)}"}
    try:
        result["trials"], result["server"] = serve_and_run(
            config,
            [*serve_flags, *serve_args(link)],
            runner,
            modes,
            seed=config.seed + 1,
            jobs=lambda methods: [(m, 0.0, {"latency_ms": ms}) for ms in config.latencies_ms for m in methods],
            before=lambda labels: link.set_delay(labels["latency_ms"]),
        )
    finally:
        link.close()
    result["errors"] = {
        f"specpipe_{mode}": runner.failed[f"specpipe_{mode}"] for mode in modes if f"specpipe_{mode}" in runner.failed
    }
    return result


def plan_rules_axis(config: BenchConfig):
    """The sampling-rules axis (rules.py), run on the main trials' server: (its result so far, or
    why it is skipped; jobs(methods by mode) -> its trial jobs). Every (setting, rule, mode),
    autoregressive included: the rule decides how the target alone samples too."""
    modes = [mode for mode in RULE_MODES if mode in config.modes]
    if not config.rules:
        return {"skipped": "not asked for (--rules none)"}, lambda by_mode: []
    if Mode.AUTOREGRESSIVE not in config.modes or not modes:
        return {"skipped": "needs autoregressive and one of sequential, specbranch in --modes"}, lambda by_mode: []

    def jobs(by_mode):
        return [
            (
                with_params(by_mode[mode], rule, top_p=top_p, drafter_invariant=invariant),
                temperature,
                {"top_p": top_p, "rule": rule},
            )
            for temperature, top_p in SETTINGS
            for rule, invariant in RULES.items()
            for mode in (Mode.AUTOREGRESSIVE, *modes)
        ]

    return {"settings": [list(s) for s in SETTINGS], "rules": list(RULES), "modes": [str(m) for m in modes]}, jobs


def progress_total(config: BenchConfig, num_prompts: int) -> int:
    """Requests the run makes: reference, calibration grid, trials, warm-ups, latency axis."""
    latency_modes = [mode for mode in LATENCY_MODES if mode in config.modes] if config.latencies_ms else []
    methods = 4 + len(config.modes)
    per_prompt = (
        1
        + len(config.temperatures) * (len(HF_THREADS) * len(config.assistant_grid) + config.trials * methods)
        + config.trials * len(config.latencies_ms) * len(latency_modes)
    )
    load = len(config.clients) * len(config.temperatures) * len(config.modes)
    rule_modes = [mode for mode in RULE_MODES if mode in config.modes] if config.rules else []
    rules = len(SETTINGS) * config.trials * num_prompts * len(RULES) * (1 + len(rule_modes)) if rule_modes else 0
    return num_prompts * per_prompt + len(config.modes) + len(latency_modes) + load + rules


def server_flags(config: BenchConfig, target: str, draft: str) -> list[str]:
    """`specpipe serve`'s flags for every server of the run: the models on their devices, the
    block length, and the placement (auto: as `specpipe serve` defaults; none: left to the OS)."""
    return [
        *("--target", target, "--draft", draft),
        *("--target-device", config.target_device, "--draft-device", config.draft_device),
        *("--num-draft-tokens", str(config.num_draft_tokens)),
        *("--pin", config.pin),
    ]


def run(config: BenchConfig) -> dict:
    from tqdm.auto import tqdm

    from specpipe.launch.bench import report
    from specpipe.models import load_tokenizer

    started = time.time()
    link_choice = choose_link(config.link, config.latencies_ms)  # before the long part: a bad --link fails fast
    target, draft = resolve_models(config)
    texts = load_prompts(config)
    tokenizer = load_tokenizer(target)
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    hf = HFRunner(target, draft, config.target_device, config.draft_device)
    serve_flags = server_flags(config, target, draft)
    with tqdm(total=progress_total(config, len(prompts)), desc="specpipe bench", unit="req", dynamic_ncols=True) as bar:
        reference = []
        for prompt_ids in prompts:  # also warms up the in-process models
            reference.append(hf.generate(prompt_ids, config.max_new_tokens, 0.0, 0).token_ids)
            bar.update(1)
        runner = TrialRunner(prompts, reference, config.seed, bar)
        grid = tune_assistant(hf, runner, config.temperatures, config.max_new_tokens, config.assistant_grid)
        hf_methods = hf.methods(config.max_new_tokens, grid)
        rules, rule_jobs = plan_rules_axis(config)
        records, server = serve_and_run(
            config,
            serve_flags,
            runner,
            config.modes,
            seed=config.seed,
            jobs=lambda methods: [(m, t, {}) for t in config.temperatures for m in hf_methods + methods]
            + rule_jobs(dict(zip(config.modes, methods))),
        )
        if "skipped" not in rules:  # its trials ran beside the main ones, on the same server
            rules["trials"] = [record for record in records if "rule" in record]
            rules["errors"] = {name: error for name, error in runner.failed.items() if "+" in name}
        records = [record for record in records if "rule" not in record]
        errors = {name: error for name, error in runner.failed.items() if "+" not in name}
        latency = run_latency_axis(config, serve_flags, draft, runner, link_choice)
        bar.set_postfix_str("concurrency axis")
        load = (
            run_load_axis(config, serve_flags, hf, prompts, reference, bar)
            if config.clients
            else {"skipped": "no levels asked for (--clients none)"}
        )
        bar.set_postfix_str("timing one step of each model")
        context = prompts[0] + reference[0][: config.max_new_tokens // 2]  # about the mean context of a request
        costs = measure_costs(hf, context, report.needed_ks(records))
    return {
        "command_line": config.command_line,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "machine": report.machine(),
        "config": vars_of(config),
        "models": {
            "target": target,
            "draft": draft,
            "target_params": hf.target.num_parameters(),
            "draft_params": hf.draft.num_parameters(),
        },
        "prompts": [{"text": text, "num_tokens": len(ids)} for text, ids in zip(texts, prompts)],
        "reference_outputs": reference,
        "costs": costs,
        "hf_assisted_grid": grid,
        "trials": records,
        "errors": errors,
        "server": server,
        "latency": latency,
        "load": load,
        "rules": rules,
    }


def vars_of(config: BenchConfig) -> dict:
    from dataclasses import asdict

    return {**asdict(config), "request_timeout_s": REQUEST_TIMEOUT_S}


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """`specpipe bench`. Takes the CLI's parsed namespace or an argv list; returns the exit status
    (1 when some method's greedy output differs from autoregressive)."""
    if isinstance(args, argparse.Namespace):
        command_line = shlex.join(["specpipe", *sys.argv[1:]])
    else:
        argv = list(sys.argv[1:] if args is None else args)
        parser = argparse.ArgumentParser(prog="specpipe bench", description="The benchmark of DESIGN §5.")
        add_bench_args(parser)
        args = parser.parse_args(argv)
        command_line = shlex.join(["specpipe", "bench", *argv])
    config = config_from_args(args, command_line)
    import torch

    from specpipe.launch.bench import report, tables

    from transformers.utils import logging as hf_logging

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate's advice and model-loading bars; the run has its own bar
    hf_logging.disable_progress_bar()
    try:
        results = report.summarize(run(config))
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    paths = tables.write_outputs(results, Path(config.out))
    print(f"wrote {', '.join(str(path) for path in paths)}")
    if not results["correctness"]["all_match"]:
        logger.error(
            "MISMATCH: greedy output differs from HF autoregressive for %s",
            sorted({m["method"] for m in results["correctness"]["mismatches"]}),
        )
        return 1
    return 0
