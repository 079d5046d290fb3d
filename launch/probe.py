"""`python -m specpipe.launch.probe [--timeout S] [--curve-keys DIR] [ENDPOINT]`: is a worker alive
and its event loop turning? Exit 0 when it answers a Ping, 1 (one line on stderr) when not.

A worker speaks ZeroMQ, not HTTP or gRPC, so a Kubernetes probe of the draft pod is this command
(an `exec` probe). It sends the same Ping the coordinator's heartbeat sends: the worker's single
event loop answers it between two forward steps, so an answer proves the loop turns, not just that
the port is open (a TCP probe passes while the loop hangs). A worker binds its port only after its
model has loaded, so this also serves as the start-up and readiness probe.

It imports no torch (it runs every probe period): zmq, protobuf and the CURVE key loader only.
With `--curve-keys` (env SPECPIPE_CURVE_KEYS, as every specpipe process) it connects as the CURVE
client the coordinator is. This module knows nothing of models or scheduling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import zmq

from specpipe.config import DEFAULT_DRAFT_PORT, ENV_CURVE_KEYS, zmq_endpoint
from specpipe.proto.specpipe.worker.v1 import worker_pb2

# The probe's own default deadline: far above one forward step of a large model (the worker answers
# between steps), well under Kubernetes' usual probe periods.
DEFAULT_TIMEOUT_S = 5.0
NONCE = 1  # one ping per process: any fixed nonce identifies the answer


def ping(endpoint: str, timeout: float, curve_keys: str = "") -> worker_pb2.Pong:
    """The worker's Pong; TimeoutError when none comes within `timeout` seconds."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if curve_keys:
        from specpipe import curve

        curve.configure_client(socket, curve.load_keys(curve_keys, client=True))
    try:
        socket.connect(endpoint)
        socket.send(worker_pb2.Command(ping=worker_pb2.Ping(nonce=NONCE)).SerializeToString())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not socket.poll(int(left * 1000) + 1):
                break
            reply = worker_pb2.Reply()
            reply.ParseFromString(socket.recv_multipart()[0])
            if reply.WhichOneof("kind") == "pong" and reply.pong.nonce == NONCE:
                return reply.pong
        raise TimeoutError(f"no answer from {endpoint} within {timeout:g}s")
    finally:
        socket.close(0)
        context.term()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m specpipe.launch.probe", description="Exit 0 if the specpipe worker at ENDPOINT answers a ping."
    )
    parser.add_argument(
        "endpoint",
        nargs="?",
        default=zmq_endpoint("127.0.0.1", DEFAULT_DRAFT_PORT),
        help=f"the worker's control endpoint (default tcp://127.0.0.1:{DEFAULT_DRAFT_PORT})",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the answer")
    parser.add_argument(
        "--curve-keys",
        default=os.environ.get(ENV_CURVE_KEYS, ""),
        metavar="DIR",
        help=f"connect as a CURVE client with the keys in DIR (env {ENV_CURVE_KEYS})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pong = ping(args.endpoint, args.timeout, args.curve_keys)
    except Exception as err:  # a probe reports, it never shows a traceback
        print(f"specpipe probe: {args.endpoint}: {err}", file=sys.stderr)
        return 1
    print(f"{pong.role} worker pid {pong.pid} up {pong.uptime_seconds:.0f}s, {pong.live_requests} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
