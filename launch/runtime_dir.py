"""The private runtime directory of one server on one host: where its internal ZeroMQ sockets live
as `ipc://` paths, so that only the user who started it can reach them. A Unix socket in a folder
of mode 0700 cannot be connected to by any other user (root aside), whatever the socket's own mode.

`RuntimeDir()` makes a fresh folder `specpipe-<pid>-<random>` (mode 0700) under $XDG_RUNTIME_DIR
when that is a private folder of this user (the XDG spec's: owned by the user, mode 0700), else
under the temp dir (`tempfile.gettempdir()`, then /tmp where a socket path there would be too
long). The name is new every time (mkdtemp: never an existing folder, never a stale one). Its
maker holds an flock on `.lock` inside for as long as it runs, so this user's stale folders (a
server killed with SIGKILL cannot remove its own) are those whose lock anyone can take: they are
removed before a new one is made. (A lock, not the pid in the name: a pid says nothing across
PID namespaces, containers that share /tmp.) `close()`, or leaving the `with`, removes the folder
and its sockets. `why_not_private(folder)` says why a folder is not one only this user can enter.

This module knows nothing of ZeroMQ or of which process binds what (launch/endpoints.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "specpipe-"
# A runtime folder by name (PREFIX, its maker's pid for a human reading `ls`, mkdtemp's random part).
FOLDER_NAME = re.compile(rf"^{PREFIX}\d+-[A-Za-z0-9_]+$")
LOCK_NAME = ".lock"  # flocked by the folder's maker while it runs
# sockaddr_un's sun_path holds 108 bytes with the final NUL (Linux; 104 on macOS): a longer ipc
# path cannot be bound at all.
MAX_SOCKET_PATH = 103
# The longest socket name a server puts in its folder ("target-data.sock"), and the folder name's
# own length ("specpipe-" + a pid of up to 7 digits + "-" + mkdtemp's 8 characters).
LONGEST_SOCKET_NAME = 16
FOLDER_NAME_LENGTH = 25
FALLBACK_BASE = "/tmp"


def why_not_private(folder: str | os.PathLike) -> str:
    """ "" when `folder` is a directory of this user that no one else may enter, else why not."""
    try:
        info = os.lstat(folder)
    except OSError as err:
        return f"cannot read {folder} ({err.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a directory"
    if info.st_uid != os.geteuid():
        return f"{folder} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    if info.st_mode & 0o077:
        return f"{folder} has mode {stat.S_IMODE(info.st_mode):04o}: other users may enter it (want 0700)"
    return ""


def candidate_bases() -> list[str]:
    """Where a runtime directory may go, best first: $XDG_RUNTIME_DIR (only a private one of this
    user: set by a login of another user, it is not ours), the temp dir, /tmp."""
    bases = []
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and not why_not_private(xdg):
        bases.append(xdg)
    return bases + [tempfile.gettempdir(), FALLBACK_BASE]


def pick_base() -> str:
    """The first candidate base whose socket paths fit sun_path and hold no whitespace (the
    workers' READY line is split on it)."""
    for base in candidate_bases():
        fits = len(base) + 1 + FOLDER_NAME_LENGTH + 1 + LONGEST_SOCKET_NAME <= MAX_SOCKET_PATH
        if fits and not any(char.isspace() for char in base) and os.path.isdir(base):
            return base
    return FALLBACK_BASE


def _lock(folder: str | os.PathLike) -> int | None:
    """An fd holding the exclusive flock of `folder`'s lock file (made if missing), or None when
    someone else holds it (or there is none to open)."""
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale(base: str) -> list[str]:
    """Remove this user's runtime folders in `base` whose maker no longer holds their lock (one
    without a lock file yet is being made: left alone); returns them."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(base, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not (FOLDER_NAME.match(name) and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()):
            continue
        if not os.path.exists(os.path.join(path, LOCK_NAME)):
            continue
        fd = _lock(path)
        if fd is not None:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)
            removed.append(path)
    return removed


class RuntimeDir:
    """A fresh private folder for one server's ipc sockets; removed by `close()` (a context manager)."""

    def __init__(self, base: str | None = None):
        base = base or pick_base()
        for path in remove_stale(base):
            logger.info("removed the stale runtime folder %s (its server no longer runs)", path)
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))  # mode 0700
        problem = why_not_private(self.path)
        assert not problem, f"mkdtemp made a folder others may enter: {problem}"
        self._lock_fd = _lock(self.path)  # held until close(): the folder is live
        assert self._lock_fd is not None, f"cannot lock the new folder {self.path}"

    def endpoint(self, name: str) -> str:
        """The ipc:// endpoint of socket `name` in this folder."""
        assert len(name) <= LONGEST_SOCKET_NAME, f"socket name {name!r} is longer than the room left for it"
        return f"ipc://{self.path / name}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RuntimeDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
