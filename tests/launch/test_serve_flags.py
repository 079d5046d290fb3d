"""Serve flags whose values are parsed by a type of our own (launch/serve_flags.py)."""

from __future__ import annotations

import argparse

import pytest

from specpipe.config import PolicyConfig
from specpipe.launch.serve_flags import add_serve_args


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specpipe serve")
    add_serve_args(parser)
    return parser.parse_args(list(argv))


def test_urgent_fork_rows_takes_a_count_or_off():
    assert parse().urgent_fork_rows == PolicyConfig.urgent_fork_rows == 2
    assert parse("--urgent-fork-rows", "0").urgent_fork_rows == 0
    assert parse("--urgent-fork-rows", "off").urgent_fork_rows is None


@pytest.mark.parametrize("value", ["-1", "two", ""])
def test_urgent_fork_rows_refuses_anything_else_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit):
        parse("--urgent-fork-rows", value)
    assert f"argument --urgent-fork-rows: want off or a count >= 0, got {value!r}" in capsys.readouterr().err
