"""The methods `specpipe bench` times, and the loop that times them (the package docstring has the glossary).

A Method runs one prompt and returns an Outcome: its tokens, the client-side wall time, the time
to the first token and the counters of DESIGN §7's per-request stats. HFRunner drives Hugging
Face `generate` in this process (target alone, or with `assistant_model`); `specpipe_method`
sends the request to a running server pinned to one mode. TrialRunner turns one method over all
prompts into one raw record and never lets a failing method stop the run. Nothing here writes
files or knows about tables.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable

from specpipe.modes import Mode

logger = logging.getLogger(__name__)

# The thread counts HF's baselines run at; each HF method's best is taken over them (a baseline at
# its best setting: the server's two workers use two cores).
HF_THREADS = (1, 2)
COST_REPEATS = 30  # interleaved repeats per micro-timing (medians), after specpipe.tools.timing's warm-up


@dataclass
class Outcome:
    """One request: its tokens, client-side wall time and the counters of DESIGN §7's stats."""

    token_ids: list[int]
    seconds: float
    ttft_s: float
    counters: dict  # draft_tokens, accepted_tokens, rolled_back_tokens, verifications, branches_*, committed_tokens
    target_busy_s: float


@dataclass
class Method:
    name: str
    run: Callable[[list[int], float, int], Outcome]  # (prompt_ids, temperature, seed) -> Outcome
    num_draft_tokens: Callable[[float], int | None]  # per temperature; None: not fixed


# --- Hugging Face, in this process -------------------------------------------------------------


class _FirstTokenClock:
    """A `generate` streamer that notes when the first new token arrives (its first put is the prompt)."""

    def __init__(self):
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class HFRunner:
    """Target-only and assisted `generate`, counting forward calls (draft tokens and verifications
    of assisted generation come from those counts) and timing the target's forwards."""

    def __init__(self, target_path: str, draft_path: str, target_device: str = "cpu", draft_device: str = "cpu"):
        from specpipe.models import load_model
        from specpipe.tools.timing import synchronize

        self.synchronize = synchronize  # (a GPU's forward ends after its call returns)
        self.target = load_model(target_path, device=target_device)
        self.draft = load_model(draft_path, device=draft_device)
        self.device = self.target.device
        eos = self.target.generation_config.eos_token_id or self.target.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.assistant_defaults = {
            name: getattr(self.draft.generation_config, name, None)
            for name in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
        }
        self.calls = {"target": 0, "draft": 0}
        self.target_s, self._started = 0.0, 0.0
        self.target.register_forward_pre_hook(self._target_start)
        self.target.register_forward_hook(self._target_end)
        self.draft.register_forward_pre_hook(lambda module, args: self._count("draft"))

    def _count(self, role: str) -> None:
        self.calls[role] += 1

    def _target_start(self, module, args) -> None:
        self.calls["target"] += 1
        self.synchronize(self.device)
        self._started = time.perf_counter()

    def _target_end(self, module, args, output) -> None:
        self.synchronize(self.device)
        self.target_s += time.perf_counter() - self._started

    def configure_assistant(self, num_tokens: int | None) -> None:
        """None: the assistant's own settings; k: exactly k draft tokens per round."""
        settings = (
            self.assistant_defaults
            if num_tokens is None
            else {
                "num_assistant_tokens": num_tokens,
                "num_assistant_tokens_schedule": "constant",
                "assistant_confidence_threshold": 0.0,
            }
        )
        for name, value in settings.items():
            setattr(self.draft.generation_config, name, value)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        threads: int = 1,
        assisted: bool = False,
    ) -> Outcome:
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        sampling = (
            {"do_sample": False}
            if temperature == 0
            else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        )
        clock = _FirstTokenClock()
        self.calls.update(target=0, draft=0)
        self.target_s = 0.0
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                output = self.target.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=min(self.eos_ids) if self.eos_ids else 0,
                    streamer=clock,
                    assistant_model=self.draft if assisted else None,
                    **sampling,
                )
        finally:
            torch.set_num_threads(1)
        token_ids = output[0, len(prompt_ids) :].tolist()  # (waits for a GPU's last kernels)
        seconds = time.perf_counter() - start
        for index, token_id in enumerate(token_ids):
            if token_id in self.eos_ids:
                token_ids = token_ids[: index + 1]
                break
        verifications = self.calls["target"]
        drafted = self.calls["draft"] if assisted else 0
        accepted = max(0, min(drafted, len(token_ids) - verifications)) if assisted else 0
        counters = {
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "rolled_back_tokens": drafted - accepted,
            "verifications": verifications,
            "branches_forked": 0,
            "branches_hit": 0,
            "committed_tokens": len(token_ids),
        }
        return Outcome(token_ids, seconds, (clock.at or start + seconds) - start, counters, self.target_s)

    def method(
        self,
        name: str,
        max_new_tokens: int,
        threads: int | Callable[[float], int] = 1,
        assisted: bool = False,
        num_draft_tokens: Callable[[float], int | None] = lambda temperature: None,
    ) -> Method:
        """`threads`: a count, or the count for a temperature (the calibrated best)."""

        def run(prompt_ids: list[int], temperature: float, seed: int) -> Outcome:
            if assisted:
                self.configure_assistant(num_draft_tokens(temperature))
            count = threads(temperature) if callable(threads) else threads
            return self.generate(prompt_ids, max_new_tokens, temperature, seed, count, assisted)

        return Method(name, run, num_draft_tokens)

    def methods(self, max_new_tokens: int, grid: dict) -> list[Method]:
        """The four HF methods; `hf_assisted_best` uses the calibrated k and threads of each temperature."""
        return [
            self.method("hf_autoregressive", max_new_tokens),
            self.method("hf_autoregressive_2threads", max_new_tokens, threads=2),
            self.method("hf_assisted_default", max_new_tokens, assisted=True),
            self.method(
                "hf_assisted_best",
                max_new_tokens,
                assisted=True,
                num_draft_tokens=lambda temperature: grid[f"{temperature:g}"]["best"],
                threads=lambda temperature: grid[f"{temperature:g}"]["threads"] or 1,
            ),
        ]


def measure_costs(hf: HFRunner, context_ids: list[int], ks: set[int]) -> dict:
    """Medians (seconds) of one target step, one draft step and one target verify of k + 1 tokens
    for each k, each with `context_ids` already in the KV cache; interleaved so noise hits all."""
    import torch

    from specpipe.tools.timing import median_step_seconds  # the demo build's c is timed the same way

    torch.set_num_threads(1)
    steps = [("t_ar", hf.target, 1), ("t_draft", hf.draft, 1)]
    steps += [(f"t_verify_{k}", hf.target, k + 1) for k in sorted(ks) if k + 1 <= len(context_ids)]
    medians = median_step_seconds(steps, torch.tensor([context_ids]), COST_REPEATS)
    return {
        "context_tokens": len(context_ids),
        "repeats": COST_REPEATS,
        "t_ar_s": medians["t_ar"],
        "t_draft_s": medians["t_draft"],
        "t_verify_s": {str(k): medians[f"t_verify_{k}"] for k in sorted(ks) if f"t_verify_{k}" in medians},
    }


# --- specpipe, through the server --------------------------------------------------------------


class ModeFallback(RuntimeError):
    """The server answered a request in another mode than the one asked for."""


def specpipe_method(client, mode: Mode, max_new_tokens: int, num_draft_tokens: int) -> Method:
    from specpipe.proto.specpipe.v1 import specpipe_pb2

    def run(prompt_ids: list[int], temperature: float, seed: int, **params) -> Outcome:
        """params: more request fields (top_p, drafter_invariant)."""
        token_ids, first, last = [], None, None
        start = time.perf_counter()
        for last in client.generate(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            mode=mode,
            **params,
        ):
            if last.token_ids and first is None:
                first = time.perf_counter()
            token_ids += last.token_ids
        seconds = time.perf_counter() - start
        stats = last.stats
        if stats.mode not in (mode.proto, specpipe_pb2.MODE_UNSPECIFIED):
            raise ModeFallback(f"asked for {mode}, the server ran {specpipe_pb2.Mode.Name(stats.mode)}")
        counters = {
            name: getattr(stats, name)
            for name in (
                "draft_tokens",
                "accepted_tokens",
                "rolled_back_tokens",
                "verifications",
                "branches_forked",
                "branches_hit",
                "rejections",
                "main_rolled_back_tokens",
                "rejections_at_fork",
                "prepared_hits",
            )
        }
        counters["committed_tokens"] = round(stats.mean_accepted_length * stats.verifications)
        for rank, (tried, hits) in enumerate(itertools.zip_longest(stats.branch_rank_tried, stats.branch_rank_hits)):
            counters[f"rank{rank}_tried"], counters[f"rank{rank}_hits"] = tried or 0, hits or 0
        return Outcome(
            token_ids, seconds, (first or start + seconds) - start, counters, stats.target_busy_fraction * seconds
        )

    return Method(
        f"specpipe_{mode}", run, lambda temperature: None if mode == Mode.AUTOREGRESSIVE else num_draft_tokens
    )


def add_counters(counters) -> dict:
    """The sum of counter dicts, key by key (a key some lack counts 0 there: a request that met
    no branch of rank 1 reports no rank 1)."""
    total: dict = {}
    for one in counters:
        for name, value in one.items():
            total[name] = total.get(name, 0) + value
    return total


def describe_error(err: BaseException) -> str:
    import grpc

    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


# --- trials --------------------------------------------------------------------------------------


def request_seed(seed: int, trial: int, prompt_index: int) -> int:
    """The same seed for every method on one (trial, prompt): sampled runs see the same randomness budget."""
    return (seed * 1_000_003 + trial * 1_009 + prompt_index) % (1 << 63)


class TrialRunner:
    """Runs one method over all prompts and turns it into one raw record; remembers failed methods
    (skipped from then on) and checks greedy output against the reference."""

    def __init__(self, prompts: list[list[int]], reference: list[list[int]], seed: int, bar):
        self.prompts, self.reference, self.seed, self.bar = prompts, reference, seed, bar
        self.failed: dict[str, str] = {}

    def run(self, method: Method, temperature: float, trial: int, **labels) -> dict | None:
        if method.name in self.failed:
            self.bar.update(len(self.prompts))
            return None
        self.bar.set_postfix_str(f"trial {trial + 1} T={temperature:g} {method.name}", refresh=False)
        record = {
            "trial": trial,
            "temperature": temperature,
            "method": method.name,
            **labels,
            "configured_draft_tokens": method.num_draft_tokens(temperature),
            "error": None,
        }
        outcomes = []
        for index, prompt_ids in enumerate(self.prompts):
            try:
                outcomes.append(method.run(prompt_ids, temperature, request_seed(self.seed, trial, index)))
            except Exception as err:  # a failing method is a result, not a crash
                record["error"] = self.failed[method.name] = describe_error(err)
                logger.error("%s failed at T=%g: %s", method.name, temperature, record["error"])
                self.bar.update(len(self.prompts) - index)
                return record
            self.bar.update(1)
        seconds = sum(outcome.seconds for outcome in outcomes)
        tokens = sum(len(outcome.token_ids) for outcome in outcomes)
        record.update(
            tokens=tokens,
            seconds=seconds,
            tokens_per_second=tokens / seconds,
            ttft_s=[outcome.ttft_s for outcome in outcomes],
            target_busy_s=sum(outcome.target_busy_s for outcome in outcomes),
            counters=add_counters(outcome.counters for outcome in outcomes),
            outputs=[outcome.token_ids for outcome in outcomes],
        )
        if temperature == 0:
            record["matches_autoregressive"] = [
                outcome.token_ids == expected for outcome, expected in zip(outcomes, self.reference)
            ]
            if not all(record["matches_autoregressive"]):
                logger.error(
                    "MISMATCH: %s greedy output differs from HF autoregressive on prompt(s) %s (trial %d%s)",
                    method.name,
                    [i for i, ok in enumerate(record["matches_autoregressive"]) if not ok],
                    trial + 1,
                    "".join(f", {key}={value}" for key, value in labels.items()),
                )
        return record


def warm_up(runner: TrialRunner, methods: list[Method]) -> None:
    """One greedy request per server method: lazy set-up stays out of the timings, and a mode the
    server does not serve is found before the trials (a method that already failed is skipped)."""
    for method in methods:
        if method.name in runner.failed:
            runner.bar.update(1)
            continue
        try:
            method.run(runner.prompts[0], 0.0, 0)
        except Exception as err:
            runner.failed[method.name] = describe_error(err)
            logger.error("%s failed its warm-up: %s", method.name, runner.failed[method.name])
        runner.bar.update(1)


def interleaved(runner: TrialRunner, jobs: list[tuple], trials: int, seed: int, before=None) -> list[dict]:
    """jobs: (method, temperature, labels). Trial t runs every job once, in an order shuffled by (seed, t)."""
    records = []
    for trial in range(trials):
        order = list(jobs)
        random.Random(seed * 7919 + trial).shuffle(order)
        for method, temperature, labels in order:
            if before is not None:
                before(labels)
            record = runner.run(method, temperature, trial, **labels)
            if record is not None:
                records.append(record)
    return records


def tune_assistant(hf: HFRunner, runner: TrialRunner, temperatures, max_new_tokens: int, ks: tuple[int, ...]) -> dict:
    """HF assisted generation's best fixed num_assistant_tokens and thread count (HF_THREADS) per
    temperature: tokens/s over all prompts for each pair, before the first trial. A failure fails
    hf_assisted_best. {temperature: {"tokens_per_second": {threads: {k: tokens/s}}, "best": k,
    "threads": its thread count}}."""
    grid: dict = {}
    for temperature in temperatures:
        speeds: dict[str, dict[str, float]] = {}
        try:
            for threads in HF_THREADS:
                for k in ks:
                    hf.configure_assistant(k)
                    start, tokens = time.perf_counter(), 0
                    for index, prompt_ids in enumerate(runner.prompts):
                        seed = request_seed(runner.seed, -1, index)
                        tokens += len(
                            hf.generate(prompt_ids, max_new_tokens, temperature, seed, threads, assisted=True).token_ids
                        )
                        runner.bar.update(1)
                    speeds.setdefault(str(threads), {})[str(k)] = tokens / (time.perf_counter() - start)
        except Exception as err:
            runner.failed["hf_assisted_best"] = f"calibration failed: {describe_error(err)}"
            logger.error("HF assisted calibration failed at T=%g: %s", temperature, runner.failed["hf_assisted_best"])
        pairs = [(tps, int(threads), int(k)) for threads, by_k in speeds.items() for k, tps in by_k.items()]
        _, threads, k = max(pairs) if pairs else (None, None, None)
        grid[f"{temperature:g}"] = {"tokens_per_second": speeds, "best": k, "threads": threads}
    return grid
