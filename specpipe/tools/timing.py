"""Forward-step costs, timed once for the demo build's c and the benchmark's bounds.

`median_step_seconds` runs each step (a model fed its last n context tokens, on top of a KV cache
that already holds the context, cropped back after each run) repeatedly, the steps interleaved
so that noise on a shared machine hits all alike, and returns the median seconds of each. It
times whatever thread count the caller set; it knows nothing of which step is a draft step or a
verification: the callers name them.
"""

from __future__ import annotations

import statistics
import time

import torch

WARMUP_REPEATS = 3  # the first runs of each step (allocations, caches) are not counted


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a GPU runs a forward after its call returns, so a
    wall-clock reading must wait for it. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def median_step_seconds(steps: list[tuple[str, object, int]], context: torch.Tensor, repeats: int) -> dict[str, float]:
    """steps: (name, model, num_tokens). context: [1, context_len] token ids, prefilled into one
    KV cache per model first. Returns {name: median seconds of one step} over `repeats` runs."""
    from transformers import DynamicCache

    assert all(0 < num_tokens <= context.shape[1] for _, _, num_tokens in steps), "steps longer than the context"
    caches = {}
    for _, model, _ in steps:
        if id(model) not in caches:
            caches[id(model)] = DynamicCache(config=model.config)
            model(input_ids=context.to(model.device), cache=caches[id(model)], use_cache=True)
    times: dict[str, list[float]] = {name: [] for name, _, _ in steps}
    for _ in range(repeats + WARMUP_REPEATS):
        for name, model, num_tokens in steps:
            ids = context[:, -num_tokens:].to(model.device)
            synchronize(model.device)
            start = time.perf_counter()
            model(input_ids=ids, cache=caches[id(model)], use_cache=True)
            synchronize(model.device)
            times[name].append(time.perf_counter() - start)
            caches[id(model)].crop(-num_tokens)
    return {name: statistics.median(values[WARMUP_REPEATS:]) for name, values in times.items()}
