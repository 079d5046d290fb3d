"""`specpipe demo`: the quick start in one command. Builds the demo pair if it is not there,
starts the real three-process server on it, streams a few completions of held-out prompts, then
runs the same prompts in every mode and prints their speed side by side, as ratios over
target-only autoregressive decoding on the same server."""

from __future__ import annotations

import sys
import time

from specpipe.client import Client
from specpipe.launch.local import ServerProcess, pin_flags
from specpipe.modes import Mode


def run_demo(num_prompts: int = 3, max_new_tokens: int = 96, out=sys.stdout) -> dict:
    from specpipe.demo_pair import demo_pair_dir, load_heldout_prompts

    root = demo_pair_dir()
    prompts = load_heldout_prompts()[:num_prompts]
    print(f"demo pair: {root}\nstarting specpipe serve (coordinator + draft worker + target worker)...", file=out)
    began = time.monotonic()
    with ServerProcess(["--target", str(root / "target"), "--draft", str(root / "draft")]) as server:  # --pin auto
        print(f"serving on {server.addr} (up in {time.monotonic() - began:.1f}s)\n", file=out)
        client = Client(server.addr)
        for prompt in prompts:
            _stream_one(client, prompt, max_new_tokens, out)
        summary = _compare_modes(client, prompts, max_new_tokens, out)
    return summary


def _stream_one(client: Client, prompt: str, max_new_tokens: int, out) -> None:
    print("\033[1m" + prompt + "\033[0m", end="", file=out, flush=True)
    last = None
    for last in client.generate(prompt, max_new_tokens=max_new_tokens):
        print(last.text, end="", file=out, flush=True)
    stats = last.stats
    print(
        f"\n  [{last.finish_reason}: {stats.generated_tokens} tokens, {stats.tokens_per_second:.0f} tok/s, "
        f"acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens per verification, "
        f"branches {stats.branches_hit}/{stats.branches_forked} hit]\n",
        file=out,
    )


def _compare_modes(client: Client, prompts: list[str], max_new_tokens: int, out) -> dict:
    """Every mode on every prompt (greedy), interleaved; tokens per second over the total."""
    totals = {mode: [0, 0.0, 0, 0] for mode in Mode}  # tokens, seconds, drafted, accepted
    outputs: dict[Mode, list] = {mode: [] for mode in Mode}
    for prompt in prompts:
        for mode in Mode:
            began = time.monotonic()
            token_ids, _, last = client.complete(prompt, max_new_tokens=max_new_tokens, mode=mode)
            totals[mode][0] += len(token_ids)
            totals[mode][1] += time.monotonic() - began
            totals[mode][2] += last.stats.draft_tokens
            totals[mode][3] += last.stats.accepted_tokens
            outputs[mode].append(token_ids)
    base = totals[Mode.AUTOREGRESSIVE][0] / totals[Mode.AUTOREGRESSIVE][1]
    print(f"{'mode':<16}{'tok/s':>8}{'speedup':>9}{'acceptance':>12}  same output as autoregressive", file=out)
    summary = {}
    for mode in Mode:
        tokens, seconds, drafted, accepted = totals[mode]
        rate = tokens / seconds
        same = outputs[mode] == outputs[Mode.AUTOREGRESSIVE]
        summary[mode.value] = {"tokens_per_second": rate, "speedup": rate / base, "same_output": same}
        acceptance = f"{accepted / drafted:.2f}" if drafted else "-"
        print(f"{mode.value:<16}{rate:>8.1f}{rate / base:>8.2f}x{acceptance:>12}  {'yes' if same else 'NO'}", file=out)
    pinned = ", the target pinned to a core of its own" if pin_flags() else ""
    print(
        f"\n(greedy; each worker on one CPU thread{pinned}; ratios from this one run — see `specpipe bench` "
        "for medians over repeated, interleaved trials)",
        file=out,
    )
    return summary
