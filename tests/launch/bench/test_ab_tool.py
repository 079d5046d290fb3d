"""The served A/B tool (launch/bench/ab.py): an arm runs its git ref's code, not the checkout's,
and every arm is set against the first. The whole run (real servers, the demo pair) is `slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specpipe.launch.bench import ab


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ab.REPO), *args], check=True, capture_output=True, text=True).stdout


def test_an_overlay_is_the_refs_code_laid_out_as_the_installed_package(tmp_path):
    folder = ab.overlay("HEAD", tmp_path / "code")
    pipeline = folder / "specpipe" / "coordinator" / "pipeline.py"
    assert pipeline.read_text() == git("show", "HEAD:coordinator/pipeline.py")
    assert (folder / "specpipe" / "proto" / "specpipe" / "v1" / "specpipe_pb2.py").is_file()
    assert not (folder / "coordinator").exists() and not (folder / "source").exists()
    # On PYTHONPATH, run outside the checkout (as ab.serve runs a server: `python -m` and `-c` put
    # the working folder first), it is what a server and its workers import, the installed
    # checkout besides; from inside the checkout it would not be.
    env = dict(os.environ, PYTHONPATH=str(folder))
    probe = "import specpipe.coordinator.pipeline as p, specpipe.launch.cli as c; print(p.__file__); print(c.__file__)"
    for where, theirs in ((tmp_path, True), (ab.REPO, False)):
        found = subprocess.run(
            [sys.executable, "-c", probe], env=env, cwd=where, check=True, capture_output=True, text=True
        )
        assert all(line.startswith(str(folder)) == theirs for line in found.stdout.split()), found.stdout


def test_arms_need_distinct_names_and_flags_an_arm(capsys):
    for argv in (
        ["--arm", "a=HEAD"],
        ["--arm", "a=HEAD", "--arm", "a=."],
        ["--arm", "a=HEAD", "--arm", "b=."] + ["--flags", "c=--x"],
    ):
        with pytest.raises(SystemExit):
            ab.parse(argv)
    args = ab.parse(["--arm", "a=HEAD", "--arm", "b=.", "--flags", "b=--urgent-fork-rows 1"])
    assert [(arm.name, arm.ref, arm.flags) for arm in args.arms] == [
        ("a", "HEAD", []),
        ("b", ".", ["--urgent-fork-rows", "1"]),
    ]


def test_requests_name_the_mode_and_seed_asked_for():
    args = ab.parse(["--arm", "a=HEAD", "--arm", "b=.", "--temperature", "1"])
    assert ab.request_params(args) == {"max_new_tokens": 64, "temperature": 1.0, "mode": "specbranch"}
    args = ab.parse(["--arm", "a=HEAD", "--arm", "b=.", "--mode", "default", "--seed", "5"])
    assert ab.request_params(args) == {"max_new_tokens": 64, "temperature": 0.0, "seed": 5}  # (the server's mode)


def test_each_arm_is_set_against_the_first_by_round_and_by_paired_request():
    arms = [ab.Arm("a", "HEAD"), ab.Arm("b", ".", ["--urgent-fork-rows", "1"])]
    arms[0].speeds, arms[0].requests = [100.0, 200.0, 100.0], [10.0, 20.0, 30.0, 40.0]
    arms[1].speeds, arms[1].requests = [110.0, 180.0, 130.0], [11.0, 20.0, 36.0, 36.0]
    rows = ab.summary(arms)
    assert rows[0]["round_ratio"] == rows[0]["request_ratio"] == 1.0
    assert rows[1]["tokens_per_second"] == 130.0
    assert rows[1]["round_ratio"] == pytest.approx(1.1) and rows[1]["round_ratio_range"] == pytest.approx([0.9, 1.3])
    assert rows[1]["request_ratio"] == pytest.approx((1.0 + 1.1) / 2)  # (of 1.1, 1.0, 1.2, 0.9)
    assert "b (. --urgent-fork-rows 1):   130.0 tok/s, per round 1.100 (0.90-1.30), per request 1.050" in ab.text(
        rows, 3
    )


def test_latency_ms_puts_each_arms_draft_behind_a_link_of_its_own(capsys):
    """--latency-ms: a draft worker per arm behind the bench's link (a namespace with netem where
    it works, else the relay), reached by the arm's server through --draft-addr."""
    arms = [ab.Arm("a", "HEAD"), ab.Arm("b", ".", ["--urgent-fork-rows", "1"])]
    links = ab.start_links(arms, 2.0)
    try:
        assert [link.delay_ms for link in links] == [2.0, 2.0]
        endpoints = [arm.flags[arm.flags.index("--draft-addr") + 1] for arm in arms]
        assert endpoints == [link.endpoint for link in links] and len(set(endpoints)) == 2
        assert arms[1].flags[:2] == ["--urgent-fork-rows", "1"]
        assert all(link.worker.poll() is None for link in links), "each arm's draft worker runs"
    finally:
        for link in links:
            link.close()
    assert all(link.worker.poll() is not None for link in links)
    assert capsys.readouterr().out.count("draft behind a 2 ms link") == 2


@pytest.mark.slow  # (two servers on two cores: ~40 s; the overlay they run on is checked above)
def test_a_run_prints_every_arm_against_the_first(tmp_path, capsys):
    out = tmp_path / "ab.json"
    ab.main(
        [
            "--arm",
            "head=HEAD",
            "--arm",
            "here=.",
            "--rounds",
            "1",
            "--prompts",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
            str(out),
            "--latency-ms",
            "1",
        ]
    )
    rows = json.loads(out.read_text())
    assert [row["arm"] for row in rows] == ["head", "here"]
    assert rows[0]["round_ratio"] == rows[0]["request_ratio"] == 1.0
    assert all(row["tokens_per_second"] > 0 and row["round_ratio"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "round 1: head " in printed and "ratios against head" in printed and "here (. --draft-addr" in printed
