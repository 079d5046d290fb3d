"""ServerMetrics on its own: names under the `specpipe:` prefix, what the servicer's observe_*
calls add up to, and the scrape-time gauges read from admission and the workers' last heartbeat."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from specpipe.coordinator.admission import Admission, AdmissionLimits
from specpipe.coordinator.metrics import METRIC_NAMES, ServerMetrics
from specpipe.coordinator.schedules import RunStats


def samples(metrics: ServerMetrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def make():
    pong = SimpleNamespace(busy_seconds=3.0, uptime_seconds=12.0, live_requests=2, live_branches=5)
    workers = [
        SimpleNamespace(role="draft", healthy=True, last_pong=pong, live_counts=lambda: (2, 5)),
        SimpleNamespace(role="target", healthy=False, last_pong=None, live_counts=lambda: (0, 0)),
    ]
    admission = Admission(AdmissionLimits(4, 4))
    return ServerMetrics(admission, workers), admission


def test_every_declared_name_is_exported():
    metrics, _ = make()
    metrics.observe_success("length", 1.0)
    metrics.observe_failure("CANCELLED")
    metrics.observe_batch("target", 4, 20)
    names = {name for name, _ in samples(metrics)}
    for name in METRIC_NAMES:
        assert name in names or f"{name}_count" in names or f"{name}_total" in names, name
    assert all(name.startswith("specpipe:") for name in names)


def test_observations_add_up():
    metrics, admission = make()
    admission.running, admission.tokens_in_flight = 2, 300
    metrics.observe_admitted(prompt_tokens=7, queue_seconds=0.2)
    metrics.observe_chunk(3, since_arrival=0.05, since_last=None)  # first chunk: TTFT, 2 ITL of 0
    metrics.observe_chunk(4, since_arrival=0.15, since_last=0.1)  # 4 ITL of 0.025
    metrics.observe_run(
        RunStats(
            drafted_tokens=9,
            draft_tokens=8,
            accepted_tokens=5,
            verifications=2,
            branches_forked=3,
            branches_hit=1,
            rejections=2,
            rejections_at_fork=1,
            main_rolled_back_tokens=6,
            rank_tried=[1, 1],
            rank_hits=[0, 1],
            committed_per_verification=[3, 4],
        )
    )
    metrics.observe_success("eos", 0.3)
    metrics.observe_batch("target", 8, 40)
    metrics.observe_batch("target", 16, 96)
    metrics.observe_batch("draft", 20, 20)
    got = samples(metrics)
    assert got[("specpipe:worker_batch_rows_count", (("role", "target"),))] == 2
    assert got[("specpipe:worker_batch_rows_sum", (("role", "target"),))] == 24
    assert got[("specpipe:worker_batch_tokens_sum", (("role", "target"),))] == 136
    assert got[("specpipe:worker_batch_tokens_sum", (("role", "draft"),))] == 20
    assert got[("specpipe:generation_tokens_total", ())] == 7
    assert got[("specpipe:prompt_tokens_total", ())] == 7
    assert got[("specpipe:time_to_first_token_seconds_count", ())] == 1
    assert got[("specpipe:inter_token_latency_seconds_count", ())] == 6
    assert abs(got[("specpipe:inter_token_latency_seconds_sum", ())] - 0.1) < 1e-9
    assert got[("specpipe:spec_decode_num_draft_tokens_total", ())] == 8
    assert got[("specpipe:spec_decode_num_accepted_tokens_total", ())] == 5
    assert got[("specpipe:spec_decode_num_rolled_back_tokens_total", ())] == 4
    assert got[("specpipe:spec_decode_branches_forked_total", ())] == 3
    assert got[("specpipe:spec_decode_branches_hit_total", ())] == 1
    assert got[("specpipe:spec_decode_num_rejections_total", ())] == 2
    assert got[("specpipe:spec_decode_num_rejections_at_fork_total", ())] == 1
    assert got[("specpipe:spec_decode_num_main_rolled_back_tokens_total", ())] == 6
    assert got[("specpipe:spec_decode_branch_rank_tried_total", (("rank", "1"),))] == 1
    assert got[("specpipe:spec_decode_branch_rank_hits_total", (("rank", "0"),))] == 0
    assert got[("specpipe:spec_decode_branch_rank_hits_total", (("rank", "1"),))] == 1
    assert got[("specpipe:mean_acceptance_length", ())] == 3.5
    assert got[("specpipe:request_success_total", (("finished_reason", "eos"),))] == 1
    assert got[("specpipe:num_requests_running", ())] == 2
    assert got[("specpipe:num_tokens_in_flight", ())] == 300
    assert got[("specpipe:worker_healthy", (("role", "draft"),))] == 1
    assert got[("specpipe:worker_healthy", (("role", "target"),))] == 0
    assert got[("specpipe:worker_busy_fraction", (("role", "draft"),))] == 0.25
    assert got[("specpipe:live_branches", (("role", "draft"),))] == 5
    # A down worker holds nothing we know of: 0, beside worker_healthy 0 (never its old count).
    assert got[("specpipe:live_branches", (("role", "target"),))] == 0
    assert ("specpipe:worker_busy_fraction", (("role", "target"),)) not in got  # no heartbeat yet: no figure


def test_two_servers_do_not_share_counters():
    first, _ = make()
    second, _ = make()
    first.observe_failure("INTERNAL")
    assert ("specpipe:request_failure_total", (("code", "INTERNAL"),)) not in samples(second)
