"""The private runtime folder (launch/runtime_dir.py), on the real filesystem: mode 0700 and this
user's, under a private $XDG_RUNTIME_DIR and not under someone else's or an open one, new every
time, gone with everything in it after close; a stale folder (its maker killed, its lock free) is
removed by the next one, a live one (another process holds its lock) and anything not named like
ours are left. What a server does with it is tested end to end: sockets only its user reaches in
tests/e2e/test_private_sockets.py, removal at Ctrl-C in tests/e2e/test_serving.py (--pin none)
and, per rank, in tests/e2e/test_torchrun.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from specpipe.launch import runtime_dir
from specpipe.launch.runtime_dir import RuntimeDir, remove_stale, why_not_private

# A child that makes a runtime folder in BASE, prints its path, and waits to be killed.
HOLDER = (
    "import sys, time; from specpipe.launch.runtime_dir import RuntimeDir; "
    "print(RuntimeDir(sys.argv[1]).path, flush=True); time.sleep(60)"
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def short_tmp():
    """A folder under /tmp with a path short enough for socket paths below it (pytest's are not)."""
    folder = tempfile.mkdtemp(prefix="sprt-", dir="/tmp")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_folder_is_private_new_and_removed(tmp_path):
    first, second = RuntimeDir(str(tmp_path)), RuntimeDir(str(tmp_path))
    assert first.path != second.path and first.path.parent == tmp_path
    assert mode(first.path) == 0o700 and os.stat(first.path).st_uid == os.geteuid()
    assert why_not_private(first.path) == ""
    assert first.endpoint("draft.sock") == f"ipc://{first.path}/draft.sock"
    (first.path / "draft.sock").write_text("")
    with second:
        pass
    first.close()
    assert not first.path.exists() and not second.path.exists()


def test_xdg_runtime_dir_only_when_it_is_ours_and_private(short_tmp, tmp_path, monkeypatch):
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    with RuntimeDir() as runtime:
        assert runtime.path.parent == xdg
    xdg.chmod(0o755)  # open to others: not a runtime dir of the XDG spec's kind
    assert str(xdg) not in runtime_dir.candidate_bases()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert runtime_dir.candidate_bases()[0] != str(tmp_path / "missing")


def test_a_base_too_long_for_a_socket_path_is_passed_over(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 90)
    deep.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    assert runtime_dir.pick_base() != str(deep)


def test_why_not_private_names_the_problem(tmp_path):
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o755)
    assert "mode 0755" in why_not_private(open_folder)
    (tmp_path / "file").write_text("")
    assert "not a directory" in why_not_private(tmp_path / "file")
    assert "cannot read" in why_not_private(tmp_path / "missing")


def test_stale_folders_go_live_ones_and_others_stay(tmp_path):
    holders = [
        subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        live, killed = (holder.stdout.readline().strip() for holder in holders)
        holders[1].kill()
        holders[1].wait()
        unlocked = tmp_path / "specpipe-1-abcdefgh"  # ours by name but no lock file: being made
        unlocked.mkdir(mode=0o700)
        other = tmp_path / "specpipe-cache"
        other.mkdir()
        assert remove_stale(str(tmp_path)) == [killed]
        assert os.path.isdir(live) and unlocked.is_dir() and other.is_dir() and not os.path.exists(killed)
        with RuntimeDir(str(tmp_path)):  # a new folder sweeps too: nothing left to sweep now
            assert os.path.isdir(live)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    assert remove_stale(str(tmp_path)) == [live]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder of another user")
def test_another_users_folder_is_never_swept(tmp_path):
    theirs = tmp_path / "specpipe-2-zzzzzzzz"
    theirs.mkdir(mode=0o700)
    (theirs / runtime_dir.LOCK_NAME).write_text("")
    os.chown(theirs, 65534, 65534)
    assert remove_stale(str(tmp_path)) == [] and theirs.is_dir()
