"""Served A/B of code versions on one host: `python -m specpipe.launch.bench.ab --arm old=HEAD~3 --arm new=.`

Each arm is a git ref of this repository (`.`: the working tree as it is) and, optionally, serve
flags of its own (`--flags new="--urgent-fork-rows 1"`): one `specpipe serve` per arm, all started
at once (each on the CPUs `--pin auto` gives it; they take turns, never running together), each on
its own code through PYTHONPATH (an overlay: `git archive REF` laid out as the installed package,
so the server and the workers it spawns import that version). Then ROUNDS rounds: in each, every
held-out prompt goes to every arm in turn, one request at a time (or `--clients` at once), the
arms' order rotating prompt by prompt, so a drift of the host's speed (other tenants of a VM,
frequency) falls on every arm alike.

What it prints, per arm against the first: the median over rounds of the ratio of tokens per
second (and its range), and the same median over single requests (each paired with the first arm's
run of the same prompt in the same round). Read them against an A/A run (`--arm a=. --arm b=.`):
on the 2-core VMs this project is developed on, two identical servers differ by 2-3% at the
median and 0.8-1.25x between rounds, so only an effect well outside that means anything; the
benchmark (`specpipe bench`) is what goes in the README.

`--latency-ms MS` puts each arm's draft worker behind a link of that one-way latency (the
benchmark's latency axis: a network namespace with netem where it works, else a delay relay),
served with `--draft-addr`; those draft workers run the working tree's code, whatever the arm's ref.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from specpipe.client import Client
from specpipe.demo_pair import load_heldout_prompts

REPO = Path(__file__).resolve().parents[2]
WORKTREE = "."
FIRST_PORT = 50171
READY_TIMEOUT_S = 300.0


@dataclass
class Arm:
    name: str
    ref: str
    flags: list[str] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)  # tokens per second, per round
    requests: list[float] = field(default_factory=list)  # tokens per second, per request


def overlay(ref: str, folder: Path, repo: Path = REPO) -> Path:
    """`ref`'s files laid out as the installed package in `folder` (the pyproject's package-dir:
    specpipe/, coordinator/ as specpipe/coordinator, ...): put it first on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref], check=True, capture_output=True).stdout
    source = folder / "source"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    layout = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, directory in sorted(layout.items()):  # (specpipe before specpipe.x, its folder)
        shutil.copytree(source / directory, folder.joinpath(*package.split(".")))
    shutil.rmtree(source)
    return folder


def serve(arm: Arm, port: int, path: Path | None, log: Path) -> subprocess.Popen:
    """The arm's server, on `path`'s code (None: the installed checkout's). It runs in the log's
    folder: `python -m` puts its working folder first on sys.path, and in the checkout that would
    be the checkout's `specpipe/`, whatever PYTHONPATH says (for the server and the workers alike)."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "specpipe.launch.cli", "serve", "--port", str(port), *arm.flags]
    return subprocess.Popen(command, env=env, cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_links(arms: list[Arm], latency_ms: float) -> list:
    """A draft worker behind a link of `latency_ms` per arm (the demo pair's draft), its endpoint
    added to the arm's serve flags."""
    from specpipe.demo_pair import demo_pair_dir
    from specpipe.launch.bench.link import choose_link, serve_args

    link_class, _ = choose_link("auto", (latency_ms,))
    links = []
    try:
        for index, arm in enumerate(arms):
            link = link_class(str(demo_pair_dir() / "draft"), index=index)
            links.append(link)
            link.set_delay(latency_ms)
            arm.flags = [*arm.flags, *serve_args(link)]
            print(f"arm {arm.name}: draft behind a {latency_ms:g} ms link ({link.kind})", flush=True)
    except BaseException:
        for link in links:
            link.close()
        raise
    return links


def wait_ready(client: Client, process: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise SystemExit(f"arm {name}: the server exited ({process.returncode}); see its log")
        try:
            client.complete("def f(", max_new_tokens=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise SystemExit(f"arm {name}: no answer in {READY_TIMEOUT_S:.0f}s") from None
            time.sleep(0.5)


def run_round(arms, clients, prompts, params, round_index: int, concurrency: int) -> None:
    """Every prompt on every arm, the arms' order rotating; records each arm's tokens per second."""
    totals = {arm.name: [0, 0.0] for arm in arms}
    if concurrency == 1:
        for index, prompt in enumerate(prompts):
            turn = (round_index * len(prompts) + index) % len(arms)
            for arm in arms[turn:] + arms[:turn]:
                begin = time.perf_counter()
                ids, _, _ = clients[arm.name].complete(prompt, **params)
                seconds = time.perf_counter() - begin
                arm.requests.append(len(ids) / seconds)
                totals[arm.name][0] += len(ids)
                totals[arm.name][1] += seconds
    else:
        turn = round_index % len(arms)
        for arm in arms[turn:] + arms[:turn]:
            begin, counted = time.perf_counter(), []
            queue, lock = list(prompts), threading.Lock()

            def worker(arm=arm, queue=queue, lock=lock, counted=counted):
                while True:
                    with lock:
                        if not queue:
                            return
                        prompt = queue.pop()
                    ids, _, _ = clients[arm.name].complete(prompt, **params)
                    with lock:
                        counted.append(len(ids))

            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            totals[arm.name] = [sum(counted), time.perf_counter() - begin]
    for arm in arms:
        tokens, seconds = totals[arm.name]
        arm.speeds.append(tokens / seconds)


def summary(arms: list[Arm]) -> list[dict]:
    """Per arm: median tokens per second, and against the first arm the median (and range) of the
    per-round ratios and the median of the paired per-request ratios."""
    base, rows = arms[0], []
    for arm in arms:
        rounds = [mine / theirs for mine, theirs in zip(arm.speeds, base.speeds)]
        paired = [mine / theirs for mine, theirs in zip(arm.requests, base.requests)]
        rows.append(
            {
                "arm": arm.name,
                "ref": arm.ref,
                "flags": " ".join(arm.flags),
                "tokens_per_second": statistics.median(arm.speeds),
                "round_ratio": statistics.median(rounds),
                "round_ratio_range": [min(rounds), max(rounds)],
                "request_ratio": statistics.median(paired) if paired else None,
            }
        )
    return rows


def text(rows: list[dict], rounds: int) -> str:
    first = rows[0]["arm"]
    lines = [f"{rounds} rounds; ratios against {first} (medians)"]
    for row in rows:
        low, high = row["round_ratio_range"]
        per_request = f", per request {row['request_ratio']:.3f}" if row["request_ratio"] is not None else ""
        lines.append(
            f"  {row['arm']:>12} ({row['ref']}{' ' + row['flags'] if row['flags'] else ''}): "
            f"{row['tokens_per_second']:7.1f} tok/s, per round {row['round_ratio']:.3f} ({low:.2f}-{high:.2f}){per_request}"
        )
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=REF", help="a git ref, or . (repeat)")
    parser.add_argument("--flags", action="append", default=[], metavar='NAME="FLAGS"', help="serve flags of one arm")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts per round")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mode", default="specbranch", help="the requests' mode; default: name none (the server's)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, help="every request with this seed (default: none, the server draws one)")
    parser.add_argument("--clients", type=int, default=1, help="requests at once per arm")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument(
        "--latency-ms", type=float, help="each arm's draft behind a link of this one-way latency (netns or a relay)"
    )
    args = parser.parse_args(argv)
    if len(args.arm) < 2:
        parser.error("--arm: give two or more")
    arms = {}
    for spec in args.arm:
        name, _, ref = spec.partition("=")
        if not name or not ref or name in arms:
            parser.error(f"--arm {spec!r}: NAME=REF with a new NAME")
        arms[name] = Arm(name, ref)
    for spec in args.flags:
        name, _, flags = spec.partition("=")
        if name not in arms:
            parser.error(f"--flags {spec!r}: no arm {name!r}")
        arms[name].flags = flags.split()
    args.arms = list(arms.values())
    return args


def request_params(args: argparse.Namespace) -> dict:
    """Every request's parameters besides its prompt (`--mode default`: no mode, the server's)."""
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.mode != "default":
        params["mode"] = args.mode
    if args.seed is not None:
        params["seed"] = args.seed
    return params


def main(argv=None) -> None:
    args = parse(argv)
    arms = args.arms
    prompts = load_heldout_prompts()[: args.prompts]
    params = request_params(args)
    with tempfile.TemporaryDirectory(prefix="specpipe-ab-") as scratch:
        scratch, processes, clients, links = Path(scratch), [], {}, []
        try:
            if args.latency_ms is not None:
                links = start_links(arms, args.latency_ms)
            for index, arm in enumerate(arms):
                path = None if arm.ref == WORKTREE else overlay(arm.ref, scratch / f"code-{index}")
                log = scratch / f"serve-{arm.name}.log"
                processes.append(serve(arm, FIRST_PORT + index, path, log))
            for index, arm in enumerate(arms):
                clients[arm.name] = Client(f"127.0.0.1:{FIRST_PORT + index}", retries=0)
                wait_ready(clients[arm.name], processes[index], arm.name)
            run_round(arms, clients, prompts[:2], params, 0, 1)  # warm-up, not counted
            for arm in arms:
                arm.speeds.clear()
                arm.requests.clear()
            for round_index in range(args.rounds):
                run_round(arms, clients, prompts, params, round_index, args.clients)
                for arm, process in zip(arms, processes):
                    if process.poll() is not None:
                        raise SystemExit(f"arm {arm.name}: the server exited mid-run")
                print(
                    f"round {round_index + 1}: " + ", ".join(f"{a.name} {a.speeds[-1]:.1f}" for a in arms), flush=True
                )
        finally:
            for client in clients.values():
                client.close()
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            for link in links:
                link.close()
    rows = summary(arms)
    print(text(rows, args.rounds))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
