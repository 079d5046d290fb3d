"""The concurrency axis of `specpipe bench` (DESIGN §5, issue 13): throughput against clients.

For each level N of `--clients`: Hugging Face `generate` with a static, left-padded batch of N
prompts (what a user would script; 1 and 2 threads, the better one counts), then, through one
`specpipe serve`, each mode with N clients sending requests at once (each client 2 requests back to
back, so the server sees N running all along). Greedy and each temperature asked for. Measured:
aggregate tokens per second, the ratio over the HF batch of the same size in the same run, p50 /
p99 request latency and time to the first token, the mean batch of each worker (GetStats' forward
counters before and after) and, greedy, whether every output equals the target's own.

The HF batch runs every row to max_new_tokens (min_new_tokens), so its tokens/s is the most it can
do; a specpipe request that meets EOS earlier counts only what it produced.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

logger = logging.getLogger(__name__)

REQUESTS_PER_CLIENT = 2
HF_THREADS = (1, 2)  # the baseline at its best setting


def hf_static_batch(
    hf, prompts: list[list[int]], max_new_tokens: int, temperature: float, threads: int, seed: int
) -> dict:
    """One `generate` over all prompts, left-padded: tokens/s of the batch, and its per-row tokens."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    width = max(map(len, prompts))
    pad = min(hf.eos_ids) if hf.eos_ids else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    sampling = (
        {"do_sample": False}
        if temperature == 0
        else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            output = hf.target.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **sampling,
            )
    finally:
        torch.set_num_threads(1)
    outputs = output[:, width:].tolist()  # (waits for a GPU's last kernels)
    seconds = time.perf_counter() - start
    return {
        "threads": threads,
        "seconds": seconds,
        "tokens": len(prompts) * max_new_tokens,
        "tokens_per_second": len(prompts) * max_new_tokens / seconds,
        "outputs": outputs,
    }


def batch_counters(client) -> dict:
    """Each worker's forward counters (GetStats): their difference over a run is its mean batch."""
    return {w.role: (w.forwards, w.forward_rows, w.forward_tokens) for w in client.stats().workers}


def mean_batches(before: dict, after: dict) -> dict:
    means = {}
    for role, (forwards, rows, tokens) in after.items():
        f0, r0, t0 = before.get(role, (0, 0, 0))
        count = forwards - f0
        means[role] = {"rows": (rows - r0) / count, "tokens": (tokens - t0) / count} if count else None
    return means


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def specpipe_level(
    client,
    mode,
    prompts: list[list[int]],
    clients: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    reference: list[list[int]] | None,
) -> dict:
    """`clients` threads, each sending REQUESTS_PER_CLIENT requests back to back."""
    jobs = [(index, prompts[index % len(prompts)]) for index in range(clients * REQUESTS_PER_CLIENT)]

    def one(job):
        index, prompt_ids = job
        start, first, tokens = time.perf_counter(), None, []
        for chunk in client.generate(
            prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + index, mode=mode
        ):
            if chunk.token_ids and first is None:
                first = time.perf_counter()
            tokens += chunk.token_ids
        end = time.perf_counter()
        return index, tokens, end - start, (first or end) - start

    before = batch_counters(client)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    total = sum(len(tokens) for _, tokens, _, _ in results)
    latencies, ttfts = [r[2] for r in results], [r[3] for r in results]
    record = {
        "tokens": total,
        "seconds": wall,
        "tokens_per_second": total / wall,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
        "latency_max_s": max(latencies),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "mean_batch": mean_batches(before, batch_counters(client)),
    }
    if reference is not None:
        record["matches_reference"] = all(
            tokens == reference[index % len(reference)][: len(tokens)] and len(tokens) > 0
            for index, tokens, _, _ in results
        )
    return record


def run_load_axis(
    config, serve_flags: list[str], hf, prompts: list[list[int]], reference: list[list[int]], bar=None
) -> dict:
    """Every level of config.clients, every temperature: the HF batch, then each mode."""
    from specpipe.client import Client
    from specpipe.launch.bench.link import QUIET_ENV
    from specpipe.launch.bench.runners import describe_error
    from specpipe.launch.local import ServerProcess

    result = {
        "clients": list(config.clients),
        "requests_per_client": REQUESTS_PER_CLIENT,
        "max_new_tokens": config.max_new_tokens,
        "modes": [str(m) for m in config.modes],
        "levels": [],
    }
    try:
        server = ServerProcess(serve_flags, env=QUIET_ENV)
    except Exception as err:
        return {**result, "error": f"the server did not start: {describe_error(err)}"}
    with server, Client(server.addr, timeout=600) as client:
        for mode in config.modes:  # warm-up
            client.complete(prompt_ids=prompts[0], max_new_tokens=8, mode=mode)
        for clients in config.clients:
            batch = [prompts[i % len(prompts)] for i in range(clients)]
            for temperature in config.temperatures:
                level = {"clients": clients, "temperature": temperature, "hf_static_batch": {}, "specpipe": {}}
                for threads in HF_THREADS:
                    run = hf_static_batch(hf, batch, config.max_new_tokens, temperature, threads, config.seed)
                    run.pop("outputs")
                    level["hf_static_batch"][str(threads)] = run
                best = max(level["hf_static_batch"].values(), key=lambda r: r["tokens_per_second"])
                level["hf_best"] = {"threads": best["threads"], "tokens_per_second": best["tokens_per_second"]}
                for mode in config.modes:
                    try:
                        record = specpipe_level(
                            client,
                            mode,
                            prompts,
                            clients,
                            config.max_new_tokens,
                            temperature,
                            config.seed,
                            reference if temperature == 0 else None,
                        )
                        record["over_hf_batch"] = record["tokens_per_second"] / best["tokens_per_second"]
                    except Exception as err:
                        record = {"error": describe_error(err)}
                    level["specpipe"][str(mode)] = record
                    if bar is not None:
                        bar.update(1)
                result["levels"].append(level)
                logger.info(
                    "clients %d, T=%g: %s",
                    clients,
                    temperature,
                    ", ".join(f"{m} {r.get('over_hf_batch', 0):.2f}x" for m, r in level["specpipe"].items()),
                )
    return result


def load_summary_rows(load: dict) -> list[list[str]]:
    """Markdown rows: clients, T, HF batch tokens/s, then per mode tokens/s (ratio), p50/p99 s,
    mean batch rows on the target / draft."""
    rows = []
    for level in load.get("levels", []):
        cells = [
            str(level["clients"]),
            f"{level['temperature']:g}",
            f"{level['hf_best']['tokens_per_second']:.0f} ({level['hf_best']['threads']}t)",
        ]
        for mode in load["modes"]:
            record = level["specpipe"].get(mode, {})
            if "error" in record:
                cells.append("error")
                continue
            batch = record["mean_batch"]
            target_rows = (batch.get("target") or {}).get("rows")
            draft_rows = (batch.get("draft") or {}).get("rows")
            cells.append(
                f"{record['tokens_per_second']:.0f} ({record['over_hf_batch']:.2f}×); "
                f"p50/p99 {record['latency_p50_s']:.2f}/{record['latency_p99_s']:.2f} s; "
                f"batch {target_rows or 0:.1f}/{draft_rows or 0:.1f}"
                + (" ✗" if record.get("matches_reference") is False else "")
            )
        rows.append(cells)
    return rows
