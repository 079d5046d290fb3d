"""`specpipe bench`'s configuration: its flags, the full and quick presets, BenchConfig built from
them once (`config_from_args`), and what the config names: the model pair and the prompts. Knows
nothing of servers, trials or tables (run.py, report.py, tables.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from specpipe.config import PolicyConfig
from specpipe.modes import MODE_NAMES, Mode

# Defaults: the full run fits 20 minutes on 2 cores with the demo pair; --quick about two.
FULL = {
    "num_prompts": 6,
    "max_new_tokens": 64,
    "trials": 5,
    "latencies": "0,1,5",
    "assistant_grid": (2, 4, 6, 8),
    "clients": "1,4,8,16,32",
}
QUICK = {
    "num_prompts": 3,
    "max_new_tokens": 32,
    "trials": 2,
    "latencies": "0,5",
    "assistant_grid": (2, 4),
    "clients": "1,8",
}


@dataclass(frozen=True)
class BenchConfig:
    target: str | None
    draft: str | None
    target_device: str  # cpu, cuda:N or auto: the server's target worker and HF's target
    draft_device: str  # the server's draft worker (also the latency axis' remote one) and HF's assistant
    prompts_file: str | None
    num_prompts: int
    max_new_tokens: int
    trials: int
    temperatures: tuple[float, ...]
    modes: tuple[Mode, ...]
    latencies_ms: tuple[float, ...]  # empty: no latency axis
    clients: tuple[int, ...]  # the concurrency axis' levels; empty: not run
    rules: bool  # the sampling-rules axis (Leviathan against drafter-invariant)
    link: str  # auto | netns | proxy
    num_draft_tokens: int
    assistant_grid: tuple[int, ...]  # fixed num_assistant_tokens tried for HF's best
    quick: bool
    pin: str  # auto | none: the server's processes on their own cores
    out: str
    seed: int
    command_line: str


# --- flags ------------------------------------------------------------------------------------


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target model folder or hub id (default: the demo pair)")
    parser.add_argument("--draft", help="draft model folder or hub id (default: the demo pair)")
    parser.add_argument(
        "--target-device",
        default="cpu",
        help="cpu, cuda:N or auto: the target worker's device, and the Hugging Face target's (default cpu)",
    )
    parser.add_argument(
        "--draft-device",
        default="cpu",
        help="cpu, cuda:N or auto: the draft worker's device, and the Hugging Face assistant's (default cpu)",
    )
    parser.add_argument(
        "--prompts-file",
        help="JSON list of strings (or of {'prompt': ...}), or a text file with "
        "one prompt per line (default: the demo pair's held-out prompts)",
    )
    parser.add_argument(
        "--num-prompts", type=int, help=f"first N prompts (default {FULL['num_prompts']}, quick {QUICK['num_prompts']})"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"per request (default {FULL['max_new_tokens']}, quick {QUICK['max_new_tokens']})",
    )
    parser.add_argument(
        "--trials", type=int, help=f"interleaved repeats (default {FULL['trials']}, quick {QUICK['trials']})"
    )
    parser.add_argument("--temperatures", default="0,1", help="comma-separated; 0 = greedy (default 0,1)")
    parser.add_argument("--modes", default=",".join(MODE_NAMES), help="specpipe modes to run (default all)")
    parser.add_argument(
        "--latencies",
        help="one-way draft link latencies in ms, comma-separated, or 'none' "
        f"(default {FULL['latencies']}, quick {QUICK['latencies']})",
    )
    parser.add_argument(
        "--clients",
        help="concurrent clients of the concurrency axis, comma-separated, or 'none' "
        f"(default {FULL['clients']}, quick {QUICK['clients']})",
    )
    parser.add_argument(
        "--rules",
        default="both",
        choices=["both", "none"],
        help="the sampling-rules axis: seeded requests at T=1 and at T=0.7 / top_p 0.9 with the "
        "default rule and with drafter_invariant, sequential and specbranch (default both)",
    )
    parser.add_argument(
        "--link",
        default="auto",
        choices=["auto", "netns", "proxy"],
        help="latency link: network namespace + netem, or a simulated TCP delay relay (auto: netns where it works)",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=int,
        default=PolicyConfig.num_draft_tokens,
        help=f"specpipe draft tokens per block, the most (default {PolicyConfig.num_draft_tokens}, as `specpipe serve`)",
    )
    parser.add_argument(
        "--pin",
        default="auto",
        choices=["auto", "none"],
        help="auto (default): with two or more usable cores, pin the target worker to the first, "
        "the draft worker to the second and the coordinator to a third if there is one, else "
        "to the second, as `specpipe serve` does (the in-process Hugging Face runs use one "
        "thread); none: leave placement to the OS",
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts, trials and tokens (about 2 minutes)")
    parser.add_argument("--out", default="bench-results", help="output folder (default bench-results/)")
    parser.add_argument("--seed", type=int, default=0, help="method order and sampling seeds")


def _floats(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(float(item) for item in text.split(","))


def config_from_args(args: argparse.Namespace, command_line: str) -> BenchConfig:
    preset = QUICK if args.quick else FULL
    names = tuple(name.strip() for name in args.modes.split(",") if name.strip())
    unknown = set(names) - set(MODE_NAMES)
    if unknown:
        raise SystemExit(f"--modes: unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODE_NAMES)}")
    modes = tuple(Mode(name) for name in names)
    latencies = _floats(args.latencies if args.latencies is not None else preset["latencies"])
    if any(value < 0 for value in latencies):
        raise SystemExit("--latencies must be >= 0 ms")
    clients = tuple(int(n) for n in _floats(args.clients if args.clients is not None else preset["clients"]))
    if any(n < 1 for n in clients):
        raise SystemExit("--clients must be >= 1")
    return BenchConfig(
        target=args.target,
        draft=args.draft,
        target_device=args.target_device,
        draft_device=args.draft_device,
        prompts_file=args.prompts_file,
        num_prompts=args.num_prompts or preset["num_prompts"],
        max_new_tokens=args.max_new_tokens or preset["max_new_tokens"],
        trials=args.trials or preset["trials"],
        temperatures=_floats(args.temperatures) or (0.0,),
        modes=modes,
        latencies_ms=latencies,
        clients=clients,
        rules=args.rules == "both",
        link=args.link,
        num_draft_tokens=args.num_draft_tokens,
        assistant_grid=preset["assistant_grid"],
        quick=args.quick,
        pin=args.pin,
        out=args.out,
        seed=args.seed,
        command_line=command_line,
    )


def resolve_models(config: BenchConfig) -> tuple[str, str]:
    if config.target and config.draft:
        return config.target, config.draft
    from specpipe.demo_pair import demo_pair_dir

    root = demo_pair_dir()
    return config.target or str(root / "target"), config.draft or str(root / "draft")


def load_prompts(config: BenchConfig) -> list[str]:
    if config.prompts_file is None:
        from specpipe.demo_pair import load_heldout_prompts

        prompts = load_heldout_prompts()
    else:
        text = Path(config.prompts_file).read_text()
        if config.prompts_file.endswith(".json"):
            prompts = [item["prompt"] if isinstance(item, dict) else item for item in json.loads(text)]
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("no prompts to run")
    return prompts[: config.num_prompts]
