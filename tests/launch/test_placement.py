"""Where the processes run (launch/placement.py): the CPU-list notation, the --pin auto layout,
which layout wins and who yields the CPU. The flags' checks are exercised through the real command
line in test_cli_errors.py; the layout applied, by test_serving (the workers' affinity and nice)."""

from __future__ import annotations

import argparse

import pytest

from specpipe.config import parse_cpus
from specpipe.launch.placement import (
    SHARED_CPU_NICE,
    auto_pins,
    choose_pins,
    core_siblings,
    cpu_list,
    worker_nice,
)


@pytest.mark.parametrize("cpus, text", [({0}, "0"), ({0, 1, 2, 5}, "0-2,5"), ({1, 3, 4, 5, 9}, "1,3-5,9")])
def test_cpu_list_round_trips(cpus, text):
    assert cpu_list(cpus) == text and parse_cpus(text) == cpus


def no_smt(cpu: int) -> set[int]:
    return {cpu}


def smt_pairs(*pairs: tuple[int, int]):
    """siblings() of a host whose physical cores each run the two CPUs of a pair."""
    return lambda cpu: next(set(pair) for pair in pairs if cpu in pair)


@pytest.mark.parametrize(
    "threads, usable, devices, siblings, want",
    [
        (1, {0, 1}, ["cpu", "cpu"], no_smt, {"target": "0", "draft": "1", "coordinator": "1"}),  # the bench's box
        (1, {2, 5}, ["cpu", "cpu"], no_smt, {"target": "2", "draft": "5", "coordinator": "5"}),  # a taskset subset
        (2, {0, 1, 2, 3}, ["cpu", "cpu"], no_smt, {"target": "0-1", "draft": "2-3", "coordinator": "2-3"}),
        # A spare core: the coordinator's own.
        (1, {0, 1, 2}, ["cpu", "cpu"], no_smt, {"target": "0", "draft": "1", "coordinator": "2"}),
        (1, {2, 5, 7, 9}, ["cpu", "cpu"], no_smt, {"target": "2", "draft": "5", "coordinator": "7"}),
        (2, {0, 1, 2, 3, 4}, ["cpu", "cpu"], no_smt, {"target": "0-1", "draft": "2-3", "coordinator": "4"}),
        # SMT: a free physical core first, else the draft's sibling, never the target's.
        (
            1,
            {0, 1, 2, 3, 4, 5},
            ["cpu", "cpu"],
            smt_pairs((0, 3), (1, 4), (2, 5)),
            {"target": "0", "draft": "1", "coordinator": "2"},
        ),
        (1, {0, 1, 2, 3}, ["cpu", "cpu"], smt_pairs((0, 2), (1, 3)), {"target": "0", "draft": "1", "coordinator": "3"}),
        (1, {0, 1, 2}, ["cpu", "cpu"], smt_pairs((0, 2), (1, 3)), {"target": "0", "draft": "1", "coordinator": "1"}),
        # Siblings numbered side by side: the two workers never share a physical core.
        (1, {0, 1, 2, 3}, ["cpu", "cpu"], smt_pairs((0, 1), (2, 3)), {"target": "0", "draft": "2", "coordinator": "3"}),
        (
            1,
            {0, 1, 2, 3, 4, 5},
            ["cpu", "cpu"],
            smt_pairs((0, 1), (2, 3), (4, 5)),
            {"target": "0", "draft": "2", "coordinator": "4"},
        ),
        (
            2,
            {0, 1, 2, 3, 4, 5, 6, 7},
            ["cpu", "cpu"],
            smt_pairs((0, 1), (2, 3), (4, 5), (6, 7)),
            {"target": "0,2", "draft": "4,6", "coordinator": "5"},
        ),
        # Fewer physical cores than threads: whole physical cores each, the coordinator beside the draft.
        (
            2,
            {0, 1, 2, 3},
            ["cpu", "cpu"],
            smt_pairs((0, 1), (2, 3)),
            {"target": "0-1", "draft": "2-3", "coordinator": "2-3"},
        ),
        (
            2,
            {0, 1, 2, 3},
            ["cpu", "cpu"],
            smt_pairs((0, 2), (1, 3)),
            {"target": "0,2", "draft": "1,3", "coordinator": "1,3"},
        ),
        (1, {0}, ["cpu", "cpu"], no_smt, {}),  # one core: nothing to separate
        (2, {0, 1, 2}, ["cpu", "cpu"], no_smt, {}),  # fewer than 2 x threads
        (1, {0, 1, 2}, ["cuda", "cpu"], no_smt, {}),  # a GPU worker: placement is the device's
    ],
)
def test_auto_pins(threads, usable, devices, siblings, want):
    pins, why = auto_pins(threads, devices, usable, siblings)
    assert pins == want and why


def test_a_cpus_siblings_come_from_the_kernel_or_are_itself():
    assert 0 in core_siblings(0)
    assert core_siblings(10**6) == {10**6}  # no such CPU: itself


def args(**given) -> argparse.Namespace:
    flags = dict(
        target_cpus="",
        draft_cpus="",
        coordinator_cpus="",
        pin="auto",
        threads=1,
        target_device="cpu",
        draft_device="cpu",
    )
    return argparse.Namespace(**{**flags, **given})


def test_explicit_cpu_flags_replace_the_automatic_layout():
    pins, _ = choose_pins(args(target_cpus="1"), spawns_both=True)
    assert pins == {"target": "1", "draft": "", "coordinator": ""}


def test_pin_none_and_remote_workers_pin_nothing():
    assert choose_pins(args(pin="none"), spawns_both=True)[0] == {}
    assert choose_pins(args(), spawns_both=False)[0] == {}


@pytest.mark.parametrize(
    "pins, want",
    [
        ({"target": "0", "draft": "1", "coordinator": "1"}, {"draft": SHARED_CPU_NICE}),  # --pin auto
        ({"target": "2-3", "draft": "0-1", "coordinator": "2-3"}, {"target": SHARED_CPU_NICE}),
        ({"target": "0", "draft": "1", "coordinator": "1-2"}, {}),  # overlapping, not the same: left alone
        ({"target": "1", "draft": "", "coordinator": ""}, {}),  # the coordinator not pinned
        ({}, {}),  # --pin none
    ],
)
def test_a_worker_on_the_coordinators_cpus_yields_to_it(pins, want):
    assert worker_nice(pins) == want
