"""The pure parts of `specpipe serve`'s start-up checks (launch/preflight.py): the CPU-list
notation, the --pin auto layout and which layout wins. The checks themselves are exercised through
the real command line in test_cli_errors.py."""

from __future__ import annotations

import argparse

import pytest

from specpipe.config import parse_cpus
from specpipe.launch.preflight import SHARED_CPU_NICE, auto_pins, choose_pins, cpu_list, worker_nice


@pytest.mark.parametrize("cpus, text", [({0}, "0"), ({0, 1, 2, 5}, "0-2,5"), ({1, 3, 4, 5, 9}, "1,3-5,9")])
def test_cpu_list_round_trips(cpus, text):
    assert cpu_list(cpus) == text and parse_cpus(text) == cpus


@pytest.mark.parametrize(
    "threads, usable, devices, want",
    [
        (1, {0, 1}, ["cpu", "cpu"], {"target": "0", "draft": "1", "coordinator": "1"}),  # the bench's layout
        (1, {2, 5, 7}, ["cpu", "cpu"], {"target": "2", "draft": "5", "coordinator": "5"}),  # a taskset/cgroup subset
        (2, {0, 1, 2, 3}, ["cpu", "cpu"], {"target": "0-1", "draft": "2-3", "coordinator": "2-3"}),
        (1, {0}, ["cpu", "cpu"], {}),  # one core: nothing to separate
        (2, {0, 1, 2}, ["cpu", "cpu"], {}),  # fewer than 2 x threads
        (1, {0, 1}, ["cuda", "cpu"], {}),  # a GPU worker: placement is the device's
    ],
)
def test_auto_pins(threads, usable, devices, want):
    pins, why = auto_pins(threads, devices, usable)
    assert pins == want and why


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
