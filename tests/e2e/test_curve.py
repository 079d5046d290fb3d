"""CURVE on the internal ZeroMQ sockets (specpipe/curve.py), on real processes.

`specpipe curve-keygen DIR` writes the key folder. A server started with `--curve-keys DIR` gives
the same outputs as a plain one: a greedy specbranch request, and a seeded temperature-1 request
in sequential mode, whose draft q cross the CURVE data plane (draft PUSH to target PULL). And its
workers really are CURVE servers: on every socket they listen on (both control sockets, the
target's data plane), as libzmq's socket monitor reports the handshake, a plain client fails it
(mechanism mismatch), so does a CURVE client with a key outside `clients/` (ZAP refuses it), and
the folder's client key succeeds (the control: a server that dropped `--curve-keys` fails). A worker
started with `--curve-keys` answers a Ping from a DEALER that holds the folder's client key (the
control, so that silence below means refusal, not a broken test), but gives no Pong within
NO_ANSWER_S to a plain DEALER or to one with a key that is not in `clients/`, and afterwards still
answers the right one. The probe command (`python -m specpipe.launch.probe`, a pod's exec probe)
passes with the folder's keys and fails without.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import psutil
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from specpipe import Client, wire
from specpipe.launch.cli import main as cli
from specpipe.launch.local import spawn_worker, stop_process
from specpipe.proto.specpipe.worker.v1 import worker_pb2

from checks import listening_endpoints, worker
from tiny import PROMPTS

# A refused client hears nothing: this long without a Pong counts as "no answer".
NO_ANSWER_S = 1.0
# An accepted client's first Pong includes the CURVE handshake and ZAP round trip.
ANSWER_S = 10.0
REQUESTS = [dict(prompt_ids=PROMPTS[0], max_new_tokens=24, mode="specbranch", temperature=0.0),
            dict(prompt_ids=PROMPTS[1], max_new_tokens=24, mode="sequential", temperature=1.0, seed=11)]
KEY_FILES = ["server.key", "server.key_secret", "client.key", "client.key_secret", "clients/client.key"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curve") / "keys"
    cli(["curve-keygen", str(folder)])
    return folder


def ping(endpoint: str, curve_keys: tuple[bytes, bytes, bytes] | None, timeout_s: float):
    """Ping a worker from a fresh DEALER; curve_keys = (client public, client secret, server
    public) or None for a plain socket. Returns the Pong, or None if none came in time."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if curve_keys is not None:
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = curve_keys
    socket.connect(endpoint)
    try:
        socket.send_multipart(wire.encode(worker_pb2.Command(ping=worker_pb2.Ping(nonce=7))))
        if not socket.poll(int(timeout_s * 1000)):
            return None
        reply, _ = wire.decode(worker_pb2.Reply, socket.recv_multipart())
        return reply.pong
    finally:
        socket.close(0)


def handshake(endpoint: str, socket_type: int, curve_keys: tuple[bytes, bytes, bytes] | None) -> str:
    """Connect a fresh socket (curve_keys as in `ping`) and return how its handshake ended, as
    the socket monitor names it: HANDSHAKE_SUCCEEDED, or a HANDSHAKE_FAILED_* (PROTOCOL: a plain
    client to a CURVE server, or the reverse; AUTH: ZAP refused the key; NO_DETAIL: the server
    closed the connection first). Sends nothing."""
    socket = zmq.Context.instance().socket(socket_type)
    socket.setsockopt(zmq.LINGER, 0)
    if curve_keys is not None:
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = curve_keys
    monitor = socket.get_monitor_socket()
    try:
        socket.connect(endpoint)
        while monitor.poll(int(ANSWER_S * 1000)):
            event = zmq.Event(recv_monitor_message(monitor)["event"])
            if event.name.startswith("HANDSHAKE_"):
                return event.name
        return "no handshake"
    finally:
        socket.disable_monitor()
        monitor.close()
        socket.close()


def test_keygen_writes_the_folder(tmp_path):
    folder = tmp_path / "keys"
    cli(["curve-keygen", str(folder)])
    assert all((folder / name).is_file() for name in KEY_FILES)
    for name in ("server", "client"):
        public, secret = zmq.auth.load_certificate(folder / f"{name}.key_secret")
        assert secret and zmq.auth.load_certificate(folder / f"{name}.key") == (public, None)
        assert stat.S_IMODE((folder / f"{name}.key_secret").stat().st_mode) == 0o600
    assert zmq.auth.load_certificate(folder / "clients/client.key") == zmq.auth.load_certificate(folder / "client.key")
    with pytest.raises(SystemExit, match="not overwriting"):
        cli(["curve-keygen", str(folder)])


def test_curve_server_gives_the_plain_servers_outputs(serve, keys):
    secure = Client(serve("draft_close", "--curve-keys", str(keys)).addr)
    plain = Client(serve("draft_close", "--transport", "zmq").addr)   # test_transport's server
    for request in REQUESTS:
        assert secure.complete(**request)[0] == plain.complete(**request)[0], request
    stats = secure.stats()
    assert all(w.healthy for w in stats.workers)
    # What the served workers listen on: the draft's control socket; the target's control socket
    # and its data plane (the one endpoint of the target the draft is connected to).
    pids = {role: worker(stats, role).pid for role in ("draft", "target")}
    listening = {role: listening_endpoints(pid) for role, pid in pids.items()}
    draft_peers = {f"tcp://{c.raddr.ip}:{c.raddr.port}" for c in psutil.Process(pids["draft"]).net_connections("tcp")
                   if c.raddr}
    (data,) = listening["target"] & draft_peers
    sockets = {endpoint: zmq.DEALER for endpoints in listening.values() for endpoint in endpoints} | {data: zmq.PUSH}
    assert len(sockets) == 3, listening
    client_public, client_secret = zmq.auth.load_certificate(keys / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    outcomes = {(endpoint, name): handshake(endpoint, socket_type, curve_keys)
                for endpoint, socket_type in sockets.items()
                for name, curve_keys in (("plain", None), ("stranger", (*zmq.curve_keypair(), server_public)),
                                         ("allowed", (client_public, client_secret, server_public)))}
    refused = {key: outcome for key, outcome in outcomes.items() if outcome.startswith("HANDSHAKE_FAILED_")}
    assert set(refused) == {key for key in outcomes if key[1] != "allowed"}, outcomes
    assert {outcomes[key] for key in outcomes if key[1] == "allowed"} == {"HANDSHAKE_SUCCEEDED"}, outcomes
    # ...and the refused clients cost nothing: the server still serves exactly.
    assert secure.complete(**REQUESTS[1])[0] == plain.complete(**REQUESTS[1])[0]


def test_worker_answers_only_clients_with_an_allowed_key(tiny_models, keys):
    client_public, client_secret = zmq.auth.load_certificate(keys / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    allowed = (client_public, client_secret, server_public)
    stranger = (*zmq.curve_keypair(), server_public)
    worker = spawn_worker("target", str(tiny_models["target"]), extra=["--data-port", "0", "--curve-keys", str(keys)])
    try:
        assert ping(worker.endpoint, allowed, ANSWER_S) is not None, "the allowed client got no Pong"
        assert ping(worker.endpoint, None, NO_ANSWER_S) is None, "a plain DEALER got an answer"
        assert ping(worker.endpoint, stranger, NO_ANSWER_S) is None, "a key outside clients/ got an answer"
        assert worker.process.poll() is None
        assert ping(worker.endpoint, allowed, ANSWER_S) is not None, "the worker stopped serving"
        probe = [sys.executable, "-m", "specpipe.launch.probe", worker.endpoint, "--timeout", str(ANSWER_S)]
        env = {name: value for name, value in os.environ.items() if name != "SPECPIPE_CURVE_KEYS"}
        assert subprocess.run([*probe, "--curve-keys", str(keys)], env=env, timeout=60).returncode == 0
        assert subprocess.run([*probe[:-1], str(NO_ANSWER_S)], env=env, timeout=60,
                              capture_output=True).returncode == 1, "a plain probe got an answer"
    finally:
        stop_process(worker.process)
