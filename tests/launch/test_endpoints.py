"""Where the internal sockets listen and when they must be secured (launch/endpoints.py), in
process, without sockets: which addresses count as loopback; plain text across hosts refused with
one message naming --curve-keys and --insecure-internal, allowed with keys, warned about with
--insecure-internal; a lone worker's binds and its data-plane connection checked alike, an ipc
socket only in a private folder; the flags serve gives the workers it spawns (ipc control sockets
always, the data plane on TCP only when a draft elsewhere must reach it). The running server is
tested in tests/e2e/test_private_sockets.py and tests/e2e/test_curve.py, the command line's one
line in tests/launch/test_cli_errors.py.
"""

from __future__ import annotations

import argparse
import logging

import pytest

from specpipe.config import WorkerConfig
from specpipe.launch import endpoints
from specpipe.launch.errors import UsageError
from specpipe.launch.runtime_dir import RuntimeDir


@pytest.mark.parametrize(
    "address, crosses",
    [
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("localhost", False),
        ("::1", False),
        ("[::1]", False),
        ("tcp://127.0.0.1:50061", False),
        ("tcp://[::1]:5", False),
        ("ipc:///run/user/0/x.sock", False),
        ("inproc://x", False),
        ("0.0.0.0", True),
        ("*", True),
        ("::", True),
        ("10.0.0.2", True),
        ("node7", True),
        ("eth0", True),
        ("tcp://0.0.0.0:*", True),
        ("tcp://10.0.0.1:5", True),
        ("tcp://127.0.0.1:9;10.0.0.1:5", True),
    ],
)
def test_what_crosses_hosts(address, crosses):
    assert endpoints.crosses_hosts(address) == crosses


def test_plain_text_across_hosts_is_refused_allowed_with_keys_and_warned_when_insecure(caplog):
    named = [("--worker-host", "127.0.0.1"), ("--draft-addr", "tcp://10.0.0.2:50061")]
    with pytest.raises(UsageError) as refused:
        endpoints.require_secure(named, curve_keys="", insecure=False)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("--draft-addr tcp://10.0.0.2:50061 is not on a loopback address")
    assert "--curve-keys DIR" in line and "--insecure-internal" in line
    endpoints.require_secure(named, curve_keys="/keys", insecure=False)
    with caplog.at_level(logging.WARNING):
        endpoints.require_secure(named, curve_keys="", insecure=True)
    assert [record.getMessage().split(" crosses")[0] for record in caplog.records] == [
        "--insecure-internal: --draft-addr tcp://10.0.0.2:50061"
    ]
    endpoints.require_secure([("--worker-host", "127.0.0.1"), ("--draft-addr", "")], curve_keys="", insecure=False)


def worker(role: str, **fields) -> WorkerConfig:
    return WorkerConfig(
        role=role, model="m", **{"bind": "tcp://127.0.0.1:*", "data_bind": "tcp://127.0.0.1:*", **fields}
    )


def test_a_lone_worker_checks_its_binds_and_its_data_plane_connection(tmp_path):
    endpoints.check_worker(worker("target"))
    for config, needle in (
        (worker("target", data_bind="tcp://0.0.0.0:50063"), "the data-plane socket"),
        (worker("draft", bind="tcp://10.1.1.1:50061"), "the control socket"),
        (worker("draft", target_data_addr="tcp://10.1.1.2:50063"), "--target-data-addr"),
    ):
        with pytest.raises(UsageError, match=needle):
            endpoints.check_worker(config)
    endpoints.check_worker(worker("draft", bind="tcp://10.1.1.1:50061", curve_keys="/keys"))
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(
        UsageError,
        match=r"open has mode 0755: other users may enter it.*mkdir -m 700 DIR\), "
        r"or give --insecure-internal",
    ):
        endpoints.check_worker(worker("draft", bind=f"ipc://{open_folder}/draft.sock"))
    with RuntimeDir(str(tmp_path)) as runtime:
        endpoints.check_worker(worker("draft", bind=runtime.endpoint("draft.sock")))


def serve_args(**given) -> argparse.Namespace:
    defaults = dict(
        worker_host="127.0.0.1",
        draft_addr=None,
        target_addr=None,
        target_data_addr="",
        target_data_port=0,
        curve_keys="",
        insecure_internal=False,
        transport="zmq",
    )
    return argparse.Namespace(**{**defaults, **given})


def test_serve_binds_its_workers_in_the_private_folder(tmp_path):
    with RuntimeDir(str(tmp_path)) as runtime:
        flags = endpoints.serve_worker_flags(serve_args(), runtime, {"target": ["--kv-slots", "4"]})
        assert flags == {
            "target": [
                "--kv-slots",
                "4",
                "--bind",
                f"ipc://{runtime.path}/target.sock",
                "--data-bind",
                f"ipc://{runtime.path}/target-data.sock",
            ],
            "draft": ["--bind", f"ipc://{runtime.path}/draft.sock"],
        }
        # A draft elsewhere reaches the data plane over TCP (--worker-host); control stays ipc.
        remote = endpoints.serve_worker_flags(
            serve_args(draft_addr="tcp://10.0.0.2:1", worker_host="10.0.0.1", insecure_internal=True), runtime, {}
        )
        assert remote == {
            "target": ["--bind", f"ipc://{runtime.path}/target.sock", "--insecure-internal"],
            "draft": ["--bind", f"ipc://{runtime.path}/draft.sock", "--insecure-internal"],
        }
        # Known before the target starts (an ipc path): the draft starts beside it. Not for TCP (the
        # target may pick its port), the torch transport, or a target not spawned.
        assert endpoints.spawned_data_bind(serve_args(), runtime) == f"ipc://{runtime.path}/target-data.sock"
        for other in (
            dict(draft_addr="tcp://10.0.0.2:1", worker_host="10.0.0.1"),
            dict(target_data_port=5555),
            dict(transport="torch"),
            dict(target_addr="tcp://127.0.0.1:1"),
        ):
            assert endpoints.spawned_data_bind(serve_args(**other), runtime) == "", other
    assert endpoints.serve_worker_flags(serve_args(), None, {"draft": ["x"]}) == {"draft": ["x"]}
    assert endpoints.spawned_data_bind(serve_args(), None) == ""
    with pytest.raises(UsageError, match="--worker-host 0.0.0.0"):
        endpoints.check_serve(serve_args(worker_host="0.0.0.0"))
    endpoints.check_serve(
        serve_args(worker_host="0.0.0.0", target_addr="tcp://127.0.0.1:1", draft_addr="tcp://127.0.0.1:2")
    )  # nothing spawned binds it
