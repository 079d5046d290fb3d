"""The torchrun entry's wiring, without starting anything: its --help lists the serve flags, the
coordinator it spawns gets the user's coordinator flags and the workers' endpoints (and none of
the flags that only the ranks use), 'auto' resolves to an address of this host, and outside
torchrun it stops with a message instead of hanging. tests/e2e/test_torchrun.py runs it for real."""

from __future__ import annotations

import argparse
import socket

import pytest

from specpipe.launch import torchrun
from specpipe.launch.serve_flags import add_serve_args

SUPPRESSED = {"--draft-addr", "--target-addr", "--target-data-port", "--target-data-addr"}


def serve_flags() -> set[str]:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}


def test_help_lists_the_serve_flags():
    text = torchrun.build_parser().format_help()
    for flag in serve_flags() - SUPPRESSED:
        assert flag in text, flag
    assert "--dist-timeout" in text and "auto" in text


def test_coordinator_gets_its_flags_and_the_worker_endpoints():
    argv = [
        "--target",
        "/m/t",
        "--draft=/m/d",
        "--port",
        "0",
        "--mode",
        "pipelined",
        "--dtype",
        "bfloat16",
        "--worker-host",
        "auto",
        "--host",
        "auto",
        "--threads=2",
        "--max-concurrent-requests",
        "4",
        "--dist-timeout",
        "9",
        "--log-level",
        "DEBUG",
        "--policy",
        "fixed",
    ]
    assert torchrun.build_parser().parse_args(argv).dist_timeout == 9
    command = torchrun.coordinator_argv(
        argv, "10.0.0.1", "/m/t", "/m/d", "tcp://127.0.0.1:7", "tcp://10.0.0.2:8", "DEBUG"
    )
    assert command[1:6] == ["-m", "specpipe.launch.cli", "--log-level", "DEBUG", "serve"]
    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    args = serve.parse_args(command[6:])
    assert (args.host, args.port, args.mode, args.policy) == ("10.0.0.1", 0, "pipelined", "fixed")
    assert (args.target, args.draft) == ("/m/t", "/m/d")
    assert (args.target_addr, args.draft_addr) == ("tcp://127.0.0.1:7", "tcp://10.0.0.2:8")
    assert args.max_concurrent_requests == 4
    for flag in ("--dtype", "--worker-host", "--threads", "--threads=2", "--dist-timeout", "auto", "bfloat16"):
        assert flag not in command, flag


def test_auto_host_is_an_address_of_this_host(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert torchrun.resolve_host("192.0.2.7") == "192.0.2.7"
    address = torchrun.resolve_host("auto")
    with socket.socket() as probe:
        probe.bind((address, 0))  # only an address of this host can be bound


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "start this under torchrun"),
        (
            {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "exactly 2 ranks",
        ),
    ],
)
def test_outside_a_two_rank_torchrun_it_says_why(monkeypatch, capsys, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        torchrun.main(["--target", "/m/t", "--draft", "/m/d"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_zmq_transport_is_refused(capsys):
    with pytest.raises(SystemExit):
        torchrun.main(["--transport", "zmq"])
    assert "process group" in capsys.readouterr().err
