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
    cache_sharers,
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
    pins, why = auto_pins(threads, devices, usable, siblings, one_cache)
    assert pins == want and why


def one_cache(cpu: int) -> set[int]:
    """caches() of a host whose CPUs all share one last-level cache (the hosts above)."""
    return set(range(64))


def caches_of(*groups: range):
    """caches() of a host whose last-level caches are each shared by the CPUs of a group."""
    return lambda cpu: next(set(group) for group in groups if cpu in group)


def unknown_cache(cpu: int) -> None:
    return None


@pytest.mark.parametrize(
    "threads, usable, siblings, caches, want",
    [
        # Two caches (core complexes, sockets): the target in one, the draft in the other, the coordinator
        # on the first spare core.
        (1, set(range(8)), no_smt, caches_of(range(4), range(4, 8)), {"target": "0", "draft": "4", "coordinator": "1"}),
        (
            2,
            set(range(8)),
            no_smt,
            caches_of(range(4), range(4, 8)),
            {"target": "0-1", "draft": "4-5", "coordinator": "2"},
        ),
        (
            2,
            set(range(16)),
            smt_pairs(*[(cpu, cpu + 8) for cpu in range(8)]),
            caches_of(range(0, 4), range(8, 12), range(4, 8), range(12, 16)),
            {"target": "0-1", "draft": "4-5", "coordinator": "2"},
        ),
        # Only the CPUs this server may use count: here two in each cache.
        (1, {2, 3, 4, 5}, no_smt, caches_of(range(4), range(4, 8)), {"target": "2", "draft": "4", "coordinator": "3"}),
        # A cache without room for a worker's threads on physical cores of their own: as with one cache.
        (
            2,
            {0, 1, 2, 4},
            no_smt,
            caches_of(range(4), range(4, 8)),
            {"target": "0-1", "draft": "2,4", "coordinator": "2,4"},
        ),
        (
            2,
            set(range(8)),
            smt_pairs((0, 1), (2, 3), (4, 5), (6, 7)),
            caches_of(range(4), range(4, 8)),
            {"target": "0,2", "draft": "4,6", "coordinator": "5"},
        ),
        (
            2,
            {0, 1, 4, 5},
            smt_pairs((0, 1), (4, 5)),
            caches_of(range(4), range(4, 8)),
            {"target": "0-1", "draft": "4-5", "coordinator": "4-5"},
        ),
        # The kernel does not say: one cache for all, physical cores apart as before.
        (1, {0, 1, 2, 3}, smt_pairs((0, 1), (2, 3)), unknown_cache, {"target": "0", "draft": "2", "coordinator": "3"}),
    ],
)
def test_auto_pins_keeps_the_workers_on_last_level_caches_apart(threads, usable, siblings, caches, want):
    pins, why = auto_pins(threads, ["cpu", "cpu"], usable, siblings, caches)
    assert pins == want and why


def test_a_cpus_last_level_cache_comes_from_the_kernel_or_is_unknown():
    assert cache_sharers(0) is None or 0 in cache_sharers(0)
    assert cache_sharers(10**6) is None


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
