"""`specpipe bench --quick` end to end on the tiny models: a real `specpipe serve` (three
processes) and Hugging Face `generate` in this process, run once per module through
`bench.main([...])`. The tests check the invariant (at greedy every method that ran produced
HF autoregressive's tokens), that a method that failed says why, the documented JSON fields and
that results.md and speedup.png exist. No timing is asserted: the machine is shared. The bound
formulas are checked apart, on numbers worked by hand (test_bench_report.py)."""

from __future__ import annotations

import argparse
import json

import pytest

from specpipe.launch import bench
from specpipe.launch.bench import config as bench_config, report, run
from specpipe.launch.bench.runners import HF_THREADS

PROMPTS = ["def fib(n):\n", "class Point:\n    def __init__(self, x, y):"]
ALWAYS_RUN = {
    "hf_autoregressive",
    "hf_autoregressive_2threads",
    "hf_assisted_default",
    "hf_assisted_best",
    "specpipe_autoregressive",
    "specpipe_sequential",
}
TOP_LEVEL = {
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
}
METHOD_FIELDS = {
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
}
MACHINE_FIELDS = {
    "cpu_model",
    "logical_cores",
    "usable_cores",
    "load_average",
    "platform",
    "python",
    "torch",
    "transformers",
    "grpcio",
    "gpus",
}
RECORD_FIELDS = {
    "trial",
    "temperature",
    "method",
    "configured_draft_tokens",
    "error",
    "tokens",
    "seconds",
    "tokens_per_second",
    "ttft_s",
    "target_busy_s",
    "counters",
    "outputs",
}
SPREAD_FIELDS = {"median", "min", "max", "q1", "q3", "n"}


@pytest.fixture(scope="module")
def bench_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    status = bench.main(
        [
            "--quick",
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(tiny_models["draft_close"]),
            "--prompts-file",
            str(prompts),
            "--max-new-tokens",
            "12",
            "--trials",
            "2",
            "--latencies",
            "none",
            "--clients",
            "1,4",
            "--out",
            str(out),
        ]
    )
    return status, out, json.loads((out / "results.json").read_text())


def test_every_method_that_ran_matches_autoregressive(bench_run):
    status, _, results = bench_run
    greedy = results["summary"]["0"]
    ran = {name for name, summary in greedy.items() if summary["trials"]}
    assert ALWAYS_RUN <= ran, results["errors"]
    for name in ran:
        assert greedy[name]["matches_autoregressive"] is True, name
    for record in results["trials"]:
        if record["temperature"] == 0 and record["error"] is None:
            assert record["outputs"] == results["reference_outputs"], record["method"]
    assert results["correctness"] == {"reference": "hf_autoregressive, greedy", "all_match": True, "mismatches": []}
    assert status == 0


def test_a_method_that_did_not_run_says_why(bench_run):
    _, _, results = bench_run
    for summaries in results["summary"].values():
        for name, summary in summaries.items():
            if summary["trials"] == 0:
                assert summary["error"] and results["errors"][name] == summary["error"]


def test_json_has_every_documented_field(bench_run):
    _, _, results = bench_run
    assert set(results) == TOP_LEVEL
    assert set(results["machine"]) == MACHINE_FIELDS
    assert set(results["summary"]) == {"0", "1"}
    assert len(results["prompts"]) == len(results["reference_outputs"]) == 2
    for summaries in results["summary"].values():
        assert ALWAYS_RUN <= set(summaries)
        for name, summary in summaries.items():
            assert set(summary) == METHOD_FIELDS, name
            if summary["trials"]:
                assert set(summary["tokens_per_second"]) == SPREAD_FIELDS
                assert summary["tokens_per_second"]["n"] == summary["trials"] == 2
    assert results["summary"]["0"]["hf_autoregressive"]["speedup"]["median"] == 1.0
    assert results["summary"]["0"]["hf_autoregressive"]["bound"]["kind"] == "autoregressive"
    for record in results["trials"]:
        greedy_only = {"matches_autoregressive"} if record["temperature"] == 0 else set()
        assert record["error"] or set(record) == RECORD_FIELDS | greedy_only, record["method"]
    assert set(results["costs"]) == {"context_tokens", "repeats", "t_ar_s", "t_draft_s", "t_verify_s"}
    for entry in results["hf_assisted_grid"].values():  # every k at every thread count; the best among them
        speeds = entry["tokens_per_second"]
        assert set(speeds) == {str(t) for t in HF_THREADS}
        assert all(set(by_k) == {str(k) for k in bench_config.QUICK["assistant_grid"]} for by_k in speeds.values())
        assert speeds[str(entry["threads"])][str(entry["best"])] == max(
            v for by_k in speeds.values() for v in by_k.values()
        )
    assert set(results["server"]) == {"workers", "live_requests", "leaked", "coordinator_cpu_s"}
    assert results["server"]["leaked"] is False
    for worker in results["server"]["workers"]:  # (how each worker ran its model: its GetStats setup)
        assert any(line.startswith("KV store: ") for line in worker["setup"]), worker
    assert results["latency"] == {"skipped": "no latencies asked for (--latencies none)"}
    for temperature, pairs in results["pairs"].items():  # both methods of each pair ran in both trials
        ran = {name for name, s in results["summary"][temperature].items() if s["trials"] == 2}
        assert set(pairs) == {f"{a}/{b}" for a, b in report.PAIRS if {a, b} <= ran}
        assert "specpipe_autoregressive/hf_autoregressive" in pairs
        for pair in pairs.values():
            assert set(pair) == SPREAD_FIELDS and pair["n"] == 2


def test_the_concurrency_axis_measures_every_mode_against_the_hf_batch(bench_run):
    """--clients 1,4 (--quick alone: 1 and 8): for each level and temperature, the HF static batch (1 and 2
    threads) and every mode, with its ratio over the batch, latency percentiles and the workers'
    mean batch; greedy outputs equal the target's own."""
    _, out, results = bench_run
    load = results["load"]
    assert [(level["clients"], level["temperature"]) for level in load["levels"]] == [
        (1, 0.0),
        (1, 1.0),
        (4, 0.0),
        (4, 1.0),
    ]
    for level in load["levels"]:
        assert set(level["hf_static_batch"]) == {"1", "2"} and level["hf_best"]["tokens_per_second"] > 0
        for mode, record in level["specpipe"].items():
            assert "error" not in record, (mode, record)
            assert record["tokens"] > 0 and record["over_hf_batch"] > 0
            assert record["latency_p50_s"] <= record["latency_p99_s"] <= record["latency_max_s"]
            if level["temperature"] == 0:
                assert record["matches_reference"] is True, mode
            if level["clients"] == 4:
                assert record["mean_batch"]["target"]["rows"] > 1, (mode, record["mean_batch"])
    assert "## Concurrency" in (out / "results.md").read_text()
    assert results["config"]["trials"] == 2 and results["command_line"].startswith("specpipe bench --quick")


def test_the_rules_axis_compares_both_sampling_rules_on_seeded_requests(bench_run):
    """At T=1 and at T=0.7 / top_p 0.9, sequential and specbranch with each rule, autoregressive with
    the same rule as the reference; acceptance and tokens/verify reported per rule. What the records prove about
    the requests the axis sent: drafter-invariant outputs equal autoregressive with the same seed
    (so the flag, the seed and the top_p reached the server; with the default rule each mode is its
    own sampler, so nothing is compared across modes there)."""
    _, out, results = bench_run
    rules = results["rules"]
    assert rules["rules"] == ["leviathan", "drafter_invariant"] and rules["modes"] == ["sequential", "specbranch"]
    assert list(rules["summary"]) == ["T=1 top_p=1", "T=0.7 top_p=0.9"]
    for setting, summaries in rules["summary"].items():
        for name, summary in summaries.items():
            assert summary["error"] is None and summary["trials"] == 2, (setting, name)
            if not name.startswith("specpipe_autoregressive"):
                assert 0 <= summary["acceptance_rate"] <= 1 and summary["tokens_per_verification"] >= 1
                assert summary["speedup"]["median"] > 0
    outputs = {}
    for record in rules["trials"]:
        outputs[record["method"], record["temperature"], record["top_p"], record["trial"]] = record["outputs"]
    for temperature, top_p in rules["settings"]:
        for trial in range(2):

            def got(name):
                return outputs[name, temperature, top_p, trial]

            assert got("specpipe_sequential+drafter_invariant") == got("specpipe_autoregressive+drafter_invariant")
            assert got("specpipe_specbranch+drafter_invariant") == got("specpipe_autoregressive+drafter_invariant")
    assert "## Sampling rules" in (out / "results.md").read_text()


def test_markdown_and_plot_exist(bench_run):
    _, out, results = bench_run
    markdown = (out / "results.md").read_text()
    for heading in (
        "## Greedy (temperature 0)",
        "## Sampling, temperature 1",
        "## Draft link latency",
        "## Costs and bounds",
        "## Side by side",
        "| specpipe autoregressive over HF autoregressive, 1 thread |",
        "| specpipe autoregressive over HF autoregressive, 2 threads |",
        "| specpipe specbranch over HF autoregressive, 2 threads |",
        results["command_line"],
        "The target worker's setup: ",
    ):
        assert heading in markdown
    assert "MISMATCH" not in markdown
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_devices_reach_every_server_and_the_hf_models(bench_run):
    """--target-device / --draft-device: recorded in the config, passed to every server the run
    starts (the latency axis' remote draft worker takes --device), and the HF models are on them."""
    _, out, results = bench_run
    assert results["config"]["target_device"] == results["config"]["draft_device"] == "cpu"
    assert "on cpu" in (out / "results.md").read_text()
    parser = argparse.ArgumentParser()
    bench_config.add_bench_args(parser)
    config = bench_config.config_from_args(
        parser.parse_args(["--target-device", "cuda:0", "--draft-device", "cuda:1"]), ""
    )
    flags = run.server_flags(config, "T", "D")
    assert (
        flags[flags.index("--target-device") + 1] == "cuda:0" and flags[flags.index("--draft-device") + 1] == "cuda:1"
    )
