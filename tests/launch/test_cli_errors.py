"""First contact: every start-up mistake a user can make ends `specpipe serve` (or a worker, or
`specpipe generate` with no server to talk to) with ONE line on stderr naming the cause and the fix,
a non-zero exit code (2 for a flag's value), and no traceback.

Method: the real command line as a subprocess, on the tiny models; the mistakes that preflight
catches must fail before any process starts or model loads (stderr would then carry the workers'
log lines at the default INFO level, so "one line" also proves "before loading"). A worker's own
failure comes after serve has bound its gRPC port (health NOT_SERVING while the models load), which
serve logs at INFO: that log line may precede the one error line. No server runs here: the ones with a server are in tests/e2e/test_cli.py and tests/e2e/test_production.py.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from tiny import build_tokenizer

# The slowest case imports transformers and reads two tokenizers (seconds on a loaded 2-core box).
CLI_TIMEOUT_S = 120
# An address where nothing listens and nothing can: port 1 on loopback is refused at once.
REFUSED = "http://127.0.0.1:1"
# One refresh of transformers' weight-loading progress bar (tqdm: no newline of its own).
PROGRESS_BAR = re.compile(r"\r?Loading weights: [^\n]*?it/s\]")
# A start-up line at INFO (cli.py's format) of serve's own process (e.g. the gRPC bind it logs
# before the workers load) or of a worker it spawned, and transformers' weight-loading progress.
STARTUP_LOG = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO (coordinator|draft-worker|target-worker) |Loading weights:)"
)
# Mistakes found once the workers have started: one only a worker finds, after serve has bound its
# gRPC port (health NOT_SERVING while the workers load) and logged it; and the tokenizers' match,
# checked while the workers load (it imports transformers, seconds). The INFO lines of the
# coordinator and of the workers loading may precede the one error line.
WORKERS_STARTED = {"a worker that cannot load its model", "tokenizers differ"}


def run_cli(*args: str, module: str = "specpipe.launch.cli", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def one_line(out: subprocess.CompletedProcess, code: int, *needles: str, logs_first: bool = False) -> str:
    """Assert the documented failure shape; return the line. `logs_first`: start-up INFO lines may
    come before it (a mistake found after serve bound its gRPC port)."""
    stderr = out.stderr
    if logs_first:  # a worker's model-loading bar may share serve's line (two writers, one stderr)
        stderr = PROGRESS_BAR.sub("", stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    if logs_first:
        lines = [line for line in lines if not STARTUP_LOG.match(line)]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    assert stderr.strip().splitlines()[-1] == lines[0], out.stderr
    assert out.returncode == code, (out.returncode, out.stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def listening():
    """A port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    """Model folders and files, good and bad."""
    root = tmp_path_factory.mktemp("cli_errors")
    other = root / "other_tokenizer"  # the draft's config, a tokenizer of another vocabulary
    other.mkdir()
    shutil.copy(tiny_models["draft"] / "config.json", other)
    build_tokenizer(other, vocab_size=280)
    broken = root / "broken"  # a model folder whose weights file is garbage
    shutil.copytree(tiny_models["target"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    (root / "empty_token").write_text("\n")
    (root / "not.pem").write_text("hello\n")
    (root / "latin1.jinja").write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    (root / "no_config").mkdir()
    return {"root": root, "other": other, "broken": broken}


def serve_args(tiny_models, *extra: str, target=None, draft=None) -> list[str]:
    return [
        "serve",
        "--port",
        "0",
        "--target",
        str(target or tiny_models["target"]),
        "--draft",
        str(draft or tiny_models["draft"]),
        *extra,
    ]


# (case, serve flags given (tiny models, files, a taken port), exit code, what the line must name)
MISTAKES = [
    ("missing model folder", lambda t, f, p: dict(target=f["root"] / "nowhere"), 2, ["--target", "does not exist"]),
    (
        "folder without config.json",
        lambda t, f, p: dict(draft=f["root"] / "no_config"),
        2,
        ["--draft", "no config.json"],
    ),
    (
        "tokenizers differ",
        lambda t, f, p: dict(draft=f["other"]),
        2,
        ["do not share a tokenizer", "vocabulary sizes differ"],
    ),
    ("gRPC port in use", lambda t, f, p: ["--port", str(p)], 2, ["--port {port}", "already in use"]),
    ("metrics port in use", lambda t, f, p: ["--metrics-port", str(p)], 2, ["--metrics-port {port}", "already in use"]),
    ("HTTP port in use", lambda t, f, p: ["--http-port", str(p)], 2, ["--http-port {port}", "already in use"]),
    ("not an address here", lambda t, f, p: ["--host", "192.0.2.1"], 2, ["--host 192.0.2.1"]),
    ("device that does not exist", lambda t, f, p: ["--target-device", "cuda:99"], 2, ["--target-device cuda:99"]),
    ("not a device", lambda t, f, p: ["--draft-device", "gpu"], 2, ["--draft-device gpu", "not a device name"]),
    ("bad CPU list", lambda t, f, p: ["--target-cpus", "0-x"], 2, ["--target-cpus", "bad CPU list"]),
    ("CPU the host lacks", lambda t, f, p: ["--draft-cpus", "4095"], 2, ["--draft-cpus 4095", "no CPU 4095"]),
    (
        "token file missing",
        lambda t, f, p: ["--auth-token-file", str(f["root"] / "nope")],
        2,
        ["--auth-token-file", "cannot read"],
    ),
    (
        "token file empty",
        lambda t, f, p: ["--auth-token-file", str(f["root"] / "empty_token")],
        2,
        ["--auth-token-file", "empty"],
    ),
    (
        "TLS cert without key",
        lambda t, f, p: ["--tls-cert", str(f["root"] / "not.pem")],
        2,
        ["--tls-cert and --tls-key go together"],
    ),
    (
        "TLS file unreadable",
        lambda t, f, p: ["--tls-cert", str(f["root"] / "nope"), "--tls-key", str(f["root"] / "not.pem")],
        2,
        ["--tls-cert", "cannot read"],
    ),
    (
        "TLS files not PEM",
        lambda t, f, p: ["--tls-cert", str(f["root"] / "not.pem"), "--tls-key", str(f["root"] / "not.pem")],
        2,
        ["not a PEM certificate chain"],
    ),
    (
        "chat template missing",
        lambda t, f, p: ["--http-port", "0", "--chat-template", str(f["root"] / "nope.jinja")],
        2,
        ["--chat-template", "nope.jinja", "cannot read"],
    ),
    (
        "chat template not UTF-8",
        lambda t, f, p: ["--chat-template", str(f["root"] / "latin1.jinja")],
        2,
        ["--chat-template", "not UTF-8"],
    ),
    ("CURVE folder missing", lambda t, f, p: ["--curve-keys", str(f["root"] / "nokeys")], 2, ["--curve-keys"]),
    (
        "worker interface off loopback without keys",
        lambda t, f, p: ["--worker-host", "0.0.0.0"],
        2,
        ["--worker-host 0.0.0.0", "plain text", "--curve-keys DIR", "--insecure-internal"],
    ),
    (
        "a worker that cannot load its model",
        lambda t, f, p: dict(target=f["broken"]),
        2,
        ["the target worker could not start", "cannot load model", "broken"],
    ),
]


@pytest.mark.parametrize("case, flags, code, needles", MISTAKES, ids=[case[0] for case in MISTAKES])
def test_serve_mistake_is_one_line(tiny_models, files, listening, case, flags, code, needles):
    given = flags(tiny_models, files, listening)
    argv = serve_args(tiny_models, **given) if isinstance(given, dict) else serve_args(tiny_models, *given)
    one_line(
        run_cli(*argv), code, *(needle.format(port=listening) for needle in needles), logs_first=case in WORKERS_STARTED
    )
    if case in WORKERS_STARTED:  # serve stopped the workers it had started before it exited
        assert not _workers_running({str(path) for path in given.values()})


def _workers_running(models: set[str]) -> list[str]:
    """Command lines of worker processes still running any of these models (only this case's own
    model folders: servers of other tests may run the shared tiny models meanwhile)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline").read().split("\0")
        except OSError:
            continue
        if any(role in argv for role in ("specpipe.draft_worker", "specpipe.target_worker")) and models & set(argv):
            found.append(" ".join(argv))
    return found


def test_unreachable_hub_id_is_one_line_and_fast(tiny_models, tmp_path):
    """A hub id, no network (the hub endpoint refuses), nothing in the cache: named at once, exit
    1 (not the flags' fault), instead of ~25 s of retries and two tracebacks."""
    env = {"HF_ENDPOINT": REFUSED, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""}
    line = one_line(
        run_cli(*serve_args(tiny_models, target="some-org/some-model"), env=env),
        1,
        "--target some-org/some-model",
        "cannot connect",
        "hf download some-org/some-model",
    )
    assert REFUSED in line


def test_cached_hub_id_goes_on_from_the_cache_when_the_hub_is_unreachable(tiny_models, files, tmp_path):
    """The check does not refuse a hub id it finds in the local cache: it goes on, offline (here
    to the tokenizer check, made to fail on purpose so that serve stops there)."""
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--some-org--cached"
    shutil.copytree(tiny_models["target"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_ENDPOINT": REFUSED, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""}
    one_line(
        run_cli(*serve_args(tiny_models, target="some-org/cached", draft=files["other"]), env=env),
        2,
        "do not share a tokenizer",
        logs_first=True,
    )


def test_worker_alone_says_one_line(tiny_models, tmp_path):
    one_line(
        run_cli("--model", str(tmp_path / "nowhere"), "--port", "0", module="specpipe.draft_worker"),
        2,
        "specpipe draft worker: error:",
        "does not exist",
    )


@pytest.mark.parametrize(
    "args, module, needles",
    [
        (
            ("serve", "--urgent-fork-rows", "-1"),
            "specpipe.launch.cli",
            ("specpipe serve: error:", "--urgent-fork-rows"),
        ),
        (("serve", "--threads", "two"), "specpipe.launch.cli", ("specpipe serve: error:", "--threads", "'two'")),
        (("serve", "--no-such-flag"), "specpipe.launch.cli", ("error: unrecognized arguments: --no-such-flag",)),
        (("generate",), "specpipe.launch.cli", ("specpipe generate: error:", "prompt")),
        (("--model", "m", "--threads", "two"), "specpipe.target_worker", ("--threads", "'two'")),
    ],
    ids=["a value its type refuses", "not a number", "an unknown flag", "a missing argument", "a worker's flag"],
)
def test_a_flag_argparse_cannot_read_is_one_line(args, module, needles):
    """argparse's own mistakes (a value a flag's type refuses, an unknown flag, a missing argument)
    are one line too, naming the flag and where the usage is, exit code 2 (launch/errors.py,
    OneLineParser): no usage block before it."""
    line = one_line(run_cli(*args, module=module), 2, *needles)
    assert line.endswith("--help)"), line


def test_debug_shows_the_traceback(tiny_models, tmp_path):
    out = run_cli("--log-level", "debug", *serve_args(tiny_models, "--target-cpus", "0-x"))
    assert out.returncode == 2 and "Traceback" in out.stderr and "bad CPU list" in out.stderr


GENERATE_MISTAKES = [
    (
        "no server",
        lambda port, root: ["--addr", f"127.0.0.1:{port}"],
        1,
        ["UNAVAILABLE", "Connection refused", "nothing listens", "specpipe serve"],
    ),
    (
        "unresolvable host",
        lambda port, root: ["--addr", "no-such-host.invalid:50051"],
        1,
        ["UNAVAILABLE", "cannot resolve"],
    ),
    ("not HOST:PORT", lambda port, root: ["--addr", "127.0.0.1"], 2, ["--addr 127.0.0.1", "HOST:PORT"]),
    ("port out of range", lambda port, root: ["--addr", "127.0.0.1:99999"], 2, ["--addr 127.0.0.1:99999"]),
    ("token file missing", lambda port, root: ["--token-file", str(root / "nope")], 2, ["--token-file"]),
    ("CA file missing", lambda port, root: ["--tls-ca", str(root / "nope")], 2, ["--tls-ca", "cannot read"]),
]


@pytest.mark.parametrize("case, flags, code, needles", GENERATE_MISTAKES, ids=[c[0] for c in GENERATE_MISTAKES])
def test_generate_mistake_is_one_line(tmp_path, case, flags, code, needles):
    with socket.socket() as sock:  # a port that was free a moment ago, and nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = run_cli("generate", "def f(", "--max-new-tokens", "4", *flags(port, tmp_path))
    one_line(out, code, *needles)
    assert out.stdout == ""
