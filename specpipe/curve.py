"""CURVE security for the internal ZeroMQ sockets (ZeroMQ RFC 26 CurveZMQ, authenticated through
ZAP, RFC 27): encryption plus client authentication between hosts, with pyzmq's `zmq.auth`.

One key folder, `--curve-keys DIR` (env SPECPIPE_CURVE_KEYS) on every process:

    DIR/server.key, DIR/server.key_secret   the workers' keypair (their ROUTER and the target's PULL)
    DIR/client.key, DIR/client.key_secret   the clients' keypair (the coordinator's DEALERs, the draft's PUSH)
    DIR/clients/*.key                       public keys a worker lets in (ZAP refuses every other)

A process loads only what its sockets need (`load_keys`): a worker `server.key_secret` and
`clients/`, a client `server.key` and `client.key_secret`; the draft worker, both. A server socket
must be bound after `start_authenticator` runs on its context: libzmq lets every CURVE client in
while no ZAP handler is installed.

This module knows nothing of commands or tensors: it configures sockets and checks keys.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

SERVER_NAME, CLIENT_NAME, CLIENTS_FOLDER = "server", "client", "clients"
# A client retrying with a refused key reconnects every 100 ms: warn once per key, for this many keys.
MAX_LOGGED_REFUSALS = 100


class CurveError(Exception):
    """A key folder or a libzmq build that cannot secure the sockets; the message says what to do."""


@dataclass(frozen=True)
class CurveKeys:
    """The keys one process needs, z85-encoded; the secret ones stay out of repr."""

    folder: str
    server_public: bytes
    server_secret: bytes | None = field(default=None, repr=False)  # a worker's (CURVE server)
    client_public: bytes | None = None  # a client's (coordinator, draft's PUSH)
    client_secret: bytes | None = field(default=None, repr=False)
    allowed_clients: frozenset[bytes] = frozenset()  # server: the keys in clients/


def require_curve() -> None:
    if not zmq.has("curve"):
        raise CurveError(
            f"--curve-keys: this libzmq ({zmq.zmq_version()}) was built without CURVE; install a "
            f"pyzmq wheel (they bundle libsodium-backed CURVE) or a libzmq built with it"
        )


def generate_keys(folder: str | os.PathLike) -> list[Path]:
    """One server and one client keypair in `folder` (created, mode 0700), the client's public key
    also in `clients/`; secrets are mode 0600. Refuses to overwrite keys already there."""
    require_curve()
    root = Path(folder)
    existing = [
        path for path in (root / f"{SERVER_NAME}.key_secret", root / f"{CLIENT_NAME}.key_secret") if path.exists()
    ]
    if existing:
        raise CurveError(f"{existing[0]} exists: not overwriting keys (remove the folder to start over)")
    (root / CLIENTS_FOLDER).mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    created = []
    for name in (SERVER_NAME, CLIENT_NAME):
        public, secret = (Path(path) for path in zmq.auth.create_certificates(root, name))
        secret.chmod(0o600)
        created += [public, secret]
    allowed = root / CLIENTS_FOLDER / f"{CLIENT_NAME}.key"
    shutil.copyfile(root / f"{CLIENT_NAME}.key", allowed)
    return [*created, allowed]


def load_keys(folder: str | os.PathLike, *, server: bool = False, client: bool = False) -> CurveKeys:
    """The keys of a process that runs CURVE servers (`server`), clients (`client`) or both. Reads
    everything now, so a missing file fails at start-up with its name."""
    assert server or client, "load_keys for neither a server nor a client"
    require_curve()
    root = Path(folder)
    if not root.is_dir():
        raise CurveError(f"--curve-keys {root}: no such folder (create one with `specpipe curve-keygen {root}`)")
    keys: dict = {}
    if server:
        keys["server_public"], keys["server_secret"] = _keypair(root / f"{SERVER_NAME}.key_secret")
        keys["allowed_clients"] = _allowed_clients(root / CLIENTS_FOLDER)
    if client:
        keys["client_public"], keys["client_secret"] = _keypair(root / f"{CLIENT_NAME}.key_secret")
        if not server:
            keys["server_public"] = _read(root / f"{SERVER_NAME}.key")[0]
    return CurveKeys(folder=str(root), **keys)


def _read(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise CurveError(f"--curve-keys: cannot read {path}: {err}") from None


def _keypair(path: Path) -> tuple[bytes, bytes]:
    public, secret = _read(path)
    if not secret:
        raise CurveError(f"--curve-keys: {path} holds no secret key")
    return public, secret


def _allowed_clients(path: Path) -> frozenset[bytes]:
    allowed = frozenset(zmq.auth.load_certificates(path)) if path.is_dir() else frozenset()
    if not allowed:
        raise CurveError(f"--curve-keys: no client public keys (*.key) in {path}: every client would be refused")
    return allowed


def configure_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make `socket` a CURVE server; before its bind, after `start_authenticator` on its context."""
    assert keys.server_secret, "configure_server without the server's secret key"
    socket.curve_secretkey = keys.server_secret
    socket.curve_publickey = keys.server_public
    socket.curve_server = True


def bind_server_socket(
    context: zmq.Context, socket_type: int, bind: str, max_message_bytes: int, keys: CurveKeys | None = None
) -> tuple[zmq.Socket, str]:
    """A worker's listening socket, set up the one way all of them are: no linger, oversized
    messages refused by libzmq, CURVE when keys are given; returns (socket, bound endpoint)."""
    socket = context.socket(socket_type)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if keys is not None:
        configure_server(socket, keys)
    socket.bind(bind)
    return socket, socket.getsockopt_string(zmq.LAST_ENDPOINT)


def configure_client(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make `socket` a CURVE client of the workers' server key; before its connect."""
    assert keys.client_secret, "configure_client without the client's secret key"
    socket.curve_secretkey = keys.client_secret
    socket.curve_publickey = keys.client_public
    socket.curve_serverkey = keys.server_public


class _AllowedClients:
    """ZAP credentials provider: a client passes when its public key is in clients/."""

    def __init__(self, keys: CurveKeys):
        self.keys = keys
        self.refused: set[bytes] = set()

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.keys.allowed_clients:
            return True
        if client_key not in self.refused and len(self.refused) < MAX_LOGGED_REFUSALS:
            self.refused.add(client_key)
            logger.warning(
                "refused a CURVE client whose key %s is not in %s",
                client_key.decode(),
                Path(self.keys.folder) / CLIENTS_FOLDER,
            )
        return False


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    """The ZAP handler of every CURVE server socket of `context` (a thread); stop() it at exit."""
    authenticator = ThreadAuthenticator(context, log=logger)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=_AllowedClients(keys))
    return authenticator
