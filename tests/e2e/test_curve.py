"""CURVE on the internal ZeroMQ sockets (specpipe/curve.py), on real processes.

`specpipe curve-keygen DIR` writes the key folder. A server started with `--curve-keys DIR
--worker-host 0.0.0.0` (a worker interface other hosts reach: its target's data plane on TCP there,
the control sockets on ipc in its private folder) gives the same outputs as a plain one: a greedy
specbranch request, and a seeded temperature-1 request in sequential mode, whose draft q cross the
CURVE data plane (draft PUSH to target PULL). End to end through that server, every internal
socket lets in only the folder's client key: a plain peer and a stranger's key get no Pong from
either control socket and never complete the ZMTP handshake with the TCP data plane (a socket
monitor sees it succeed for the right key, the control), and the server keeps serving. A worker
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
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq
import zmq.auth

from specpipe import Client, wire
from specpipe.launch.cli import main as cli
from specpipe.launch.local import spawn_worker, stop_process
from specpipe.proto.specpipe.worker.v1 import worker_pb2

from checks import internal_sockets
from tiny import PROMPTS

# A refused client hears nothing: this long without a Pong counts as "no answer".
NO_ANSWER_S = 1.0
# An accepted client's first Pong includes the CURVE handshake and ZAP round trip.
ANSWER_S = 10.0
REQUESTS = [
    dict(prompt_ids=PROMPTS[0], max_new_tokens=24, mode="specbranch", temperature=0.0),
    dict(prompt_ids=PROMPTS[1], max_new_tokens=24, mode="sequential", temperature=1.0, seed=11),
]
KEY_FILES = ["server.key", "server.key_secret", "client.key", "client.key_secret", "clients/client.key"]
# A worker interface that is not loopback: the wildcard (every host may reach it; tests connect
# through 127.0.0.1), so that serve must secure its TCP sockets.
ACROSS_HOSTS = ["--worker-host", "0.0.0.0"]


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


@pytest.fixture(scope="module")
def secure_server(serve, keys):
    return serve("draft_close", "--curve-keys", str(keys), *ACROSS_HOSTS)


def client_keys(keys) -> dict[str, tuple[bytes, bytes, bytes] | None]:
    """The peers of the tests: the folder's client key, a plain socket, a key outside clients/."""
    client_public, client_secret = zmq.auth.load_certificate(keys / "client.key_secret")
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    return {
        "allowed": (client_public, client_secret, server_public),
        "plain": None,
        "stranger": (*zmq.curve_keypair(), server_public),
    }


def test_curve_server_gives_the_plain_servers_outputs(serve, secure_server):
    secure = Client(secure_server.addr)
    plain = Client(serve("draft_close", "--transport", "zmq").addr)  # test_transport's server
    for request in REQUESTS:
        assert secure.complete(**request)[0] == plain.complete(**request)[0], request
    assert all(worker.healthy for worker in secure.stats().workers)


def handshakes(endpoint: str, curve_keys: tuple[bytes, bytes, bytes] | None, timeout_s: float) -> bool:
    """Whether a fresh PUSH (the draft's side of the data plane) completes the ZMTP handshake
    (CURVE and ZAP included) with `endpoint` within `timeout_s`; it sends nothing."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    if curve_keys is not None:
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = curve_keys
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        socket.connect(endpoint)
        return bool(monitor.poll(int(timeout_s * 1000)))
    finally:
        socket.disable_monitor()
        monitor.close(0)
        socket.close(0)


def test_serve_across_hosts_lets_in_only_its_client_key(secure_server, keys):
    folder, tcp, curve = internal_sockets(secure_server)
    assert curve and folder is not None and set(tcp) == {"target"}, secure_server.summary
    data_plane = tcp["target"][0].replace("0.0.0.0", "127.0.0.1")
    controls = [f"ipc://{folder / name}" for name in ("target.sock", "draft.sock")]
    peers = client_keys(keys)
    for endpoint in controls:
        assert ping(endpoint, peers["allowed"], ANSWER_S) is not None, f"{endpoint}: the allowed client got no Pong"
    assert handshakes(data_plane, peers["allowed"], ANSWER_S), "the allowed key's handshake did not complete"
    # The refused peers all at once (each waits NO_ANSWER_S), one thread per socket.
    checks = {(who, endpoint): (ping, endpoint) for who in ("plain", "stranger") for endpoint in controls}
    checks.update({(who, data_plane): (handshakes, data_plane) for who in ("plain", "stranger")})
    with ThreadPoolExecutor(len(checks)) as pool:
        answers = {
            key: pool.submit(check, endpoint, peers[key[0]], NO_ANSWER_S) for key, (check, endpoint) in checks.items()
        }
    let_in = [key for key, answer in answers.items() if answer.result() not in (None, False)]
    assert not let_in, f"peers without the client key got an answer: {let_in}"
    token_ids = Client(secure_server.addr).complete(**REQUESTS[0])[0]
    assert token_ids and all(worker.healthy for worker in Client(secure_server.addr).stats().workers)


def test_worker_answers_only_clients_with_an_allowed_key(tiny_models, keys):
    peers = client_keys(keys)
    allowed, stranger = peers["allowed"], peers["stranger"]
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
        assert (
            subprocess.run([*probe[:-1], str(NO_ANSWER_S)], env=env, timeout=60, capture_output=True).returncode == 1
        ), "a plain probe got an answer"
    finally:
        stop_process(worker.process)
