"""What `specpipe serve` checks before it starts anything (the CPU layout: launch/placement.py).

STYLE §5: a typo costs a second, not a model load. Each check raises
  UsageError   (exit code 2) when a flag's value is wrong: the message names the flag and the fix;
  StartupError (exit code 1) when the flags are right but the host is not (the model hub is
               unreachable, a worker could not start).
launch/report.py turns either into one line on stderr.

The checks read files, bind and release ports, parse device names and read tokenizers. torch is
imported only to check a device other than cpu / auto, transformers only to read the tokenizers.
Nothing here starts a process or loads model weights.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from specpipe.config import NGRAM_DRAFTER
from specpipe.launch import endpoints
from specpipe.launch.errors import StartupError, UsageError
from specpipe.launch.placement import check_cpu_lists, choose_pins

# How long the check of a hub id waits for a TCP connection to the model hub before it calls the
# hub unreachable: a reachable hub answers in well under a second; no network fails at once.
HUB_PROBE_TIMEOUT_S = 3.0
DEFAULT_HUB = "https://huggingface.co"  # huggingface_hub's default endpoint (env HF_ENDPOINT)


# -- files -----------------------------------------------------------------------------------------
def check_token_file(path: str) -> None:
    if not path:
        return
    from specpipe.coordinator.auth import AuthConfigError, read_token

    try:
        read_token(path)
    except AuthConfigError as err:
        raise UsageError(f"--auth-token-file: {err}: give a readable file holding one token") from None


def check_tls(cert: str, key: str) -> None:
    """Both or neither; readable; a PEM chain and its matching private key (what gRPC will load)."""
    if not cert and not key:
        return
    if not (cert and key):
        raise UsageError("--tls-cert and --tls-key go together: give both (a PEM certificate chain and its key)")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            Path(path).read_bytes()
        except OSError as err:
            raise UsageError(f"{flag} {path}: cannot read it ({err.strerror})") from None
    try:  # an encrypted key gets an empty password: gRPC cannot use one either (and no prompt)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as err:
        raise UsageError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate chain and its unencrypted "
            f"private key ({err.reason or err})"
        ) from None


def read_chat_template(path: str) -> str:
    """--chat-template's text ("" without one): a readable UTF-8 file."""
    if not path:
        return ""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(
            f"--chat-template {path}: cannot read it ({err.strerror}): give a Jinja chat template file"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"--chat-template {path}: not UTF-8 text: give a Jinja chat template file") from None


def check_curve_keys(folder: str, server: bool) -> None:
    if not folder:
        return
    from specpipe.curve import CurveError, load_keys

    try:
        load_keys(folder, server=server, client=True)
    except CurveError as err:
        raise UsageError(str(err)) from None


# -- ports and devices -----------------------------------------------------------------------------
def check_ports(ports: list[tuple[str, str, str, int | None]]) -> None:
    """[(port flag, host flag, host, port)]: each host is an address of this machine and each port
    (None: not used; 0: any) is free to bind there; no two flags name the same port."""
    seen: dict[tuple[str, int], str] = {}
    for flag, host_flag, host, port in ports:
        if port is None:
            continue
        if port and (host, port) in seen:
            raise UsageError(f"{flag} {port}: {seen[host, port]} already uses port {port}: give each its own")
        seen[host, port] = flag
        check_port_free(flag, host_flag, host, port)


def check_port_free(flag: str, host_flag: str, host: str, port: int) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UsageError(
            f"{host_flag} {host}: cannot resolve it ({err.strerror}): give an address of this machine"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR as the servers set it: only a listening socket counts, not one in TIME_WAIT.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
            probe.listen(1)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"{flag} {port}: {host}:{port} is already in use (another specpipe serve?): "
                    f"pick a free port, or stop what listens there"
                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"{host_flag} {host}: not an address of this machine: give one of its addresses "
                    f"(127.0.0.1, or 0.0.0.0 for all)"
                ) from None
            if err.errno == errno.EACCES:
                raise UsageError(f"{flag} {port}: ports under 1024 need root: pick one above 1024") from None
            raise UsageError(f"{flag} {port}: cannot bind {host}:{port} ({err.strerror})") from None


def check_device(flag: str, name: str) -> None:
    """cpu and auto always work; anything else must name a device this host has."""
    if name in ("cpu", "auto", ""):
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{flag} {name}: not a device name ({err}); use cpu, cuda:N or auto") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", lambda: False)()
    if device.type == "mps":
        available = torch.backends.mps.is_available()
    if not available:
        build = f"torch {torch.__version__}"
        raise UsageError(
            f"{flag} {name}: this host has no {device.type} device ({build} sees none); "
            f"use {flag} cpu, or install the {device.type} build of torch"
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if (device.index or 0) >= count:
        raise UsageError(
            f"{flag} {name}: this host has {count} {device.type} device(s), "
            f"{device.type}:0 to {device.type}:{count - 1}"
        )


# -- models ----------------------------------------------------------------------------------------
def check_model(flag: str, name: str) -> str:
    """A model folder, or a hub id that is in the local cache or on a reachable hub. Returns where
    it comes from ("folder", "hub cache", "hub"). A cached hub id with the hub unreachable sets
    HF_HUB_OFFLINE=1 for this process and the workers it spawns (else every file they read waits
    through the hub client's retries, ~25 s each)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{flag} {name}: the folder has no config.json, so it is not a model folder "
                f"(give the folder save_pretrained wrote)"
            )
        return "folder"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise UsageError(f"{flag} {name}: model folder {name!r} does not exist: give a model folder or a hub id")
    hub = os.environ.get("HF_ENDPOINT") or DEFAULT_HUB
    why = "HF_HUB_OFFLINE is set" if _truthy(os.environ.get("HF_HUB_OFFLINE")) else hub_unreachable(hub)
    if why:  # before huggingface_hub is imported: some versions read it only then
        os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(
            f"{flag} {name}: no such folder here, and not a hub id (ORG/NAME): give a model folder or a hub id"
        ) from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return "hub cache"
    if why:
        raise StartupError(
            f"{flag} {name}: no such folder here, and the model hub cannot serve this hub id "
            f"({hub}: {why}) nor has the local cache it: download it where the hub is "
            f"reachable (hf download {name} --local-dir DIR) and give {flag} DIR"
        )
    return "hub"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable(endpoint: str) -> str:
    """ "" when a TCP connection to the hub's host opens within HUB_PROBE_TIMEOUT_S, else why not."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return ""
    except socket.gaierror as err:
        return f"cannot resolve {url.hostname}: {err.strerror}"
    except OSError as err:
        return f"cannot connect to {url.hostname}:{port}: {err.strerror or 'timed out'}"


def check_tokenizers(target: str, draft: str) -> None:
    """Draft and target read text into the same token ids (DESIGN §4), checked on the tokenizers
    alone, before either model loads."""
    from specpipe.models import ModelLoadError, TokenizerMismatchError, check_same_tokenizer, load_tokenizer

    tokenizers = {}
    for flag, name in (("--target", target), ("--draft", draft)):
        try:
            tokenizers[flag] = load_tokenizer(name)
        except ModelLoadError as err:
            raise UsageError(f"{flag} {name}: {one_line(str(err))}") from None
    try:
        check_same_tokenizer(tokenizers["--draft"], tokenizers["--target"])
    except TokenizerMismatchError as err:
        raise UsageError(
            f"--draft {draft} and --target {target} do not share a tokenizer ({err}): "
            f"speculative decoding needs one, so pick a draft of the target's model family"
        ) from None


def one_line(text: str) -> str:
    """A multi-line library message (transformers, grpc) as one line."""
    return " ".join(text.split())


# -- all of `specpipe serve`'s checks, in order of cost ----------------------------------------------
@dataclass(frozen=True)
class ServePlan:
    """What the checks settled: the models, where each process is pinned, the chat template."""

    target: str
    draft: str
    pins: dict[str, str]  # "target" / "draft" / "coordinator" -> CPU list; missing or "" = not pinned
    pin_why: str  # for the start-up summary
    chat_template: str = ""  # --chat-template's text; "" = none given
    # (target, draft) whose tokenizers must match, checked last (check_tokenizers: it imports
    # transformers, seconds), after the workers that need no check started; None: nothing to check.
    tokenizer_pair: tuple[str, str] | None = None


def check_serve(args, demo_models) -> ServePlan:
    """Every check of the `specpipe serve` flags (launch/cli.py) that can run before a process
    starts (all but the tokenizers' match, which the plan names: check_tokenizers). `demo_models()`
    -> (target, draft) folders of the demo pair, for the model flags not given."""
    spawn_target, spawn_draft = not args.target_addr, not args.draft_addr
    if args.transport == "torch" and not (spawn_target and spawn_draft):
        raise UsageError(
            "--transport torch with a remote worker: start the ranks with torchrun "
            "(python -m specpipe.launch.torchrun), see the README"
        )
    check_cpu_lists(
        {
            "--target-cpus": args.target_cpus,
            "--draft-cpus": args.draft_cpus,
            "--coordinator-cpus": args.coordinator_cpus,
        }
    )
    check_token_file(args.auth_token_file)
    check_tls(args.tls_cert, args.tls_key)
    check_curve_keys(args.curve_keys, server=spawn_target or spawn_draft)
    endpoints.check_serve(args)  # no plain text across hosts without --insecure-internal
    chat_template = read_chat_template(args.chat_template)
    data_port = args.target_data_port if spawn_target and args.transport == "zmq" else None
    check_ports(
        [
            ("--port", "--host", args.host, args.port),
            ("--metrics-port", "--host", args.host, args.metrics_port),
            ("--health-port", "--host", args.host, args.health_port),
            ("--http-port", "--host", args.host, args.http_port),
            ("--target-data-port", "--worker-host", args.worker_host, data_port),
        ]
    )
    for flag, device, spawned in (
        ("--target-device", args.target_device, spawn_target),
        ("--draft-device", args.draft_device, spawn_draft),
    ):
        if spawned:
            check_device(flag, device)
    target, draft = args.target, args.draft
    if not target or not draft:
        demo_target, demo_draft = demo_models()
        target, draft = target or demo_target, draft or demo_draft
    check_model("--target", target)  # the coordinator reads its tokenizer even when it runs elsewhere
    pair = None
    if draft == NGRAM_DRAFTER:
        draft = target  # prompt lookup: no model; its worker reads the target's vocabulary
    elif spawn_draft:
        check_model("--draft", draft)
        pair = (target, draft)
    pins, why = choose_pins(args, spawn_target and spawn_draft)
    return ServePlan(target, draft, pins, why, chat_template, pair)
