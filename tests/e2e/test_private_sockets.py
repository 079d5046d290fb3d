"""The internal sockets of a one-host `specpipe serve` are private to the user who started it
(issue 23; launch/endpoints.py, launch/runtime_dir.py), on the session's running server (no server
of its own).

Method: the server's summary names its private folder; the folder is this user's, mode 0700, and
holds the workers' control sockets and the target's data plane; the server's process tree (the
coordinator and both workers, read with psutil) listens on no TCP port but the public gRPC one, so
nothing internal is on 127.0.0.1 where any local user could connect. Then (root only: it drops
privileges) a child running as another user (setpriv to nobody, no groups) tries to list the
folder and to connect() to every socket in it, and every attempt fails with EACCES; the server
still answers a request afterwards. That the folder goes away on Ctrl-C is tested with the server
of tests/e2e/test_serving.py that is stopped anyway (test_pin_none_...). Because the data socket's
path is known before the target starts, the draft starts beside the target, not after it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import psutil
import pytest

from specpipe import Client

from checks import internal_sockets, worker
from tiny import PROMPTS

STRANGER_UID = 65534  # nobody
# Run by the stranger: list the folder, then connect to each socket in it (NAME) and to each
# internal TCP port on loopback (tcp:PORT); print what each did.
STRANGER = """
import json, os, socket, sys
folder, names = sys.argv[1], sys.argv[2:]
seen = {}
try:
    os.listdir(folder); seen[folder] = "listed"
except OSError as err:
    seen[folder] = err.strerror
for name in names:
    tcp = name.startswith("tcp:")
    with socket.socket(socket.AF_INET if tcp else socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(("127.0.0.1", int(name[4:])) if tcp else os.path.join(folder, name)); seen[name] = "connected"
        except OSError as err:
            seen[name] = err.strerror
print(json.dumps(seen))
"""
SOCKETS = {"target.sock", "draft.sock", "target-data.sock"}


@pytest.fixture(scope="module")
def server(serve):
    return serve("draft")


def listening_tcp_ports(pid: int) -> set[int]:
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        conn.laddr.port
        for process in processes
        for conn in process.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


def test_internal_sockets_are_in_a_private_folder_and_not_on_tcp(server):
    folder, tcp, curve = internal_sockets(server)
    assert folder is not None and not tcp, server.summary
    info = os.stat(folder)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    assert SOCKETS <= {entry.name for entry in folder.iterdir() if entry.is_socket()}
    assert listening_tcp_ports(server.process.pid) == {int(server.addr.rsplit(":", 1)[1])}


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to run a child as another user"
)
def test_another_user_cannot_reach_them_and_the_server_keeps_serving(server):
    python = shutil.which("python3", path="/usr/bin:/bin")  # one that user may run (ours may sit under /root)
    if python is None:
        pytest.skip("no /usr/bin/python3 for the other user to run")
    folder, _, _ = internal_sockets(server)
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_socket())
    grpc_port = int(server.addr.rsplit(":", 1)[1])
    internal_tcp = [f"tcp:{port}" for port in sorted(listening_tcp_ports(server.process.pid) - {grpc_port})]
    out = subprocess.run(
        [
            "setpriv",
            f"--reuid={STRANGER_UID}",
            f"--regid={STRANGER_UID}",
            "--clear-groups",
            python,
            "-I",
            "-c",
            STRANGER,
            str(folder),
            *names,
            *internal_tcp,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    refused = {name: "Permission denied" for name in [str(folder), *names]}
    assert seen == refused, seen  # and no internal TCP port to try (each one tried shows up here)
    assert SOCKETS <= set(names), names
    token_ids = Client(server.addr).complete(prompt_ids=PROMPTS[0], max_new_tokens=8, mode="specbranch")[0]
    assert len(token_ids) > 0


def test_the_draft_starts_beside_the_target_not_after_it(server):
    """The draft is pointed at the target's data socket before that is bound (ZeroMQ connects once
    it is), so the two load at once: serve is ready in about one worker's start-up, not two. Their
    processes start within a second or two of each other; one after the other, the draft would
    start only once the target had imported torch and loaded its model (seconds here)."""
    stats = Client(server.addr).stats()
    started = {role: psutil.Process(worker(stats, role).pid).create_time() for role in ("target", "draft")}
    assert abs(started["draft"] - started["target"]) < 2.0, started
