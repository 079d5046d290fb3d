"""What the deployment-file tests (test_deploy_files, test_k8s, test_slurm) share: the code's own
parsers, made strict, so every command line in a file is read as the program would read it."""

from __future__ import annotations

import argparse

import pytest

from specpipe.launch import torchrun as torchrun_entry
from specpipe.launch import worker_flags as worker_entry
from specpipe.launch.serve_flags import add_serve_args

# Environment variables the parsers take defaults from: the files must not depend on the test's.
ADDRESS_ENV = (
    "SPECPIPE_DRAFT_ADDR",
    "SPECPIPE_TARGET_ADDR",
    "SPECPIPE_BIND_HOST",
    "SPECPIPE_TARGET_DATA_ADDR",
    "SPECPIPE_AUTH_TOKEN_FILE",
    "SPECPIPE_CURVE_KEYS",
    "SPECPIPE_TRANSPORT",
)


class StrictParser(argparse.ArgumentParser):
    """argparse that takes flags only as spelled in full (a file must not lean on argparse's
    prefix matching) and raises with argparse's own message instead of exiting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message):
        raise AssertionError(f"{self.prog}: {message}")


@pytest.fixture
def strict_parsers(monkeypatch):
    """The worker and torchrun entries build their own parsers (launch/errors.py's OneLineParser):
    make those strict too (through those modules' view of it only), and clear the environment
    defaults."""
    monkeypatch.setattr(worker_entry, "OneLineParser", StrictParser)
    monkeypatch.setattr(torchrun_entry, "OneLineParser", StrictParser)
    for name in ADDRESS_ENV:
        monkeypatch.delenv(name, raising=False)


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = StrictParser(prog="specpipe serve")
    add_serve_args(parser)
    return parser.parse_args(argv)


def parse_draft_worker(argv: list[str]):
    return worker_entry.parse_config("draft", argv)


def parse_torchrun_entry(argv: list[str]) -> argparse.Namespace:
    return torchrun_entry.build_parser().parse_args(argv)


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None
