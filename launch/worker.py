"""Shared entry of the two worker processes: `python -m specpipe.draft_worker ...` and
`python -m specpipe.target_worker ...` both land here with their role (their flags:
launch/worker_flags.py).

Start-up (pin, keys, model, engine, bind) either ends in `READY <endpoint> [data=<endpoint>]
params=N device=D dtype=T` on stdout, or in one line naming what failed and a non-zero exit
(2: a flag's value; launch/report.py): on stderr, or as `FAILED CODE MESSAGE` on stdout for a
launcher that asked for it (env SPECPIPE_STARTUP_REPORT=stdout). Past READY, a crash keeps its
traceback for the log."""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq

from specpipe.config import (
    add_niceness,
    DEFAULT_DRAFT_SLOTS,
    DEFAULT_TARGET_SLOTS,
    WorkerConfig,
    pin_cpus,
)
from specpipe.launch.errors import UsageError
from specpipe.launch.report import reporting
from specpipe.proposal import ProposalTemperatures, load_table

# Set by the launcher (launch/local.py) in a worker's environment: report a start-up failure on
# stdout as `FAILED CODE MESSAGE`, beside the READY line it waits for, instead of on stderr.
ENV_STARTUP_REPORT = "SPECPIPE_STARTUP_REPORT"
# The most a worker's niceness may be raised by (Linux's range ends at 19).
MAX_NICE = 19
# The context behind the forwards that time the prepacked copies at start-up (tune_prepacked_here):
# a short prompt's worth, as the forwards of a served request see.
TUNE_CONTEXT = 64


def main(role: str, argv=None) -> None:
    from specpipe.trace import trace
    from specpipe.worker_loop import run

    from specpipe.launch.worker_flags import parse_config

    config = parse_config(role, argv)
    with startup_errors(role):
        trace.open(role)
        loop, authenticator, ready = start(config)
    run(loop, ready)
    if authenticator is not None:
        authenticator.stop()
    if config.transport == "torch":
        # The data-plane receiver thread is blocked in recv: tearing the group down under it
        # would abort the process. The loop has stopped cleanly, so leave at once.
        logging.shutdown()
        os._exit(0)


def bind_error(flags: tuple[str, str], endpoint: str, err: Exception) -> UsageError:
    """The one line for a socket that cannot bind; `flags`: (the port's flag, the endpoint's)."""
    if endpoint.startswith("ipc://"):
        return UsageError(
            f"{flags[1]}: cannot bind {endpoint} ({err}): the folder must exist and be this user's, "
            f"and the path fit in 103 bytes"
        )
    return UsageError(f"{flags[0]}: cannot bind {endpoint} ({err}): pick a free port, or 0 for any")


def weight_layout(config: WorkerConfig, device: torch.device) -> str:
    """The Linear weights' memory order for this worker: as configured, or (auto) column-major on
    the CPU, for the target and the draft alike (see specpipe/models.py: column-major multiplies
    one token and blocks of tokens faster there), row-major on GPUs (their kernels take either)."""
    if config.weight_layout != "auto":
        return config.weight_layout
    return "column" if device.type == "cpu" else "row"


def start(config: WorkerConfig):
    """Everything before the loop runs: pin, secure, load the model, build the engine, bind.
    Returns (WorkerLoop, the ZAP authenticator or None, the READY line's extra fields)."""
    from specpipe.launch.endpoints import check_worker
    from specpipe.models import ModelLoadError, load_model, resolve_device
    from specpipe.worker_loop import WorkerLoop, exit_with_parent

    try:
        pin_cpus(config.cpus)  # before torch starts its threads
    except ValueError as err:
        raise UsageError(f"--cpus: {err}") from None
    if not 0 <= config.nice <= MAX_NICE:
        raise UsageError(f"--nice: {config.nice} is outside 0..{MAX_NICE}")
    add_niceness(config.nice)
    check_worker(config)  # no plain text across hosts, no ipc socket others may reach
    if config.exit_with_parent:
        exit_with_parent()
    curve_keys, authenticator = secure(config)  # before any bind: see specpipe/curve.py
    torch.set_num_threads(config.num_threads)
    try:
        device = resolve_device(config.device)  # before the model loads: a wrong image fails in seconds
    except ModelLoadError as err:
        raise UsageError(f"--device: {err}") from None
    model = None if config.drafter == "ngram" else load_model(config.model, device=str(device), dtype=config.dtype)
    from specpipe.kv_store import UnsupportedModel

    try:
        engine, data_endpoint = build_engine(config, model, device, curve_keys)
    except zmq.ZMQError as err:
        raise bind_error(("--data-port", "--data-bind"), config.data_bind, err) from None
    except UnsupportedModel as err:
        raise UsageError(f"--model {config.model}: {err}") from None
    try:
        loop = WorkerLoop(engine, config.role, config.bind, curve_keys=curve_keys)
    except zmq.ZMQError as err:
        raise bind_error(("--port", "--bind"), config.bind, err) from None
    # What the launcher prints in its start-up summary.
    ready = f" data={data_endpoint}" if data_endpoint else ""
    params = sum(param.numel() for param in model.parameters()) if model is not None else 0
    return loop, authenticator, f"{ready} params={params} device={device} dtype={config.dtype}"


def startup_errors(role: str):
    """A start-up failure as one line: on stderr (`specpipe ROLE worker: error: ...`), or, when a
    launcher started this worker (env SPECPIPE_STARTUP_REPORT=stdout), as `FAILED CODE MESSAGE` on
    stdout, where the launcher reads READY, so that it reports the failure as its own one line."""
    say = None
    if os.environ.get(ENV_STARTUP_REPORT) == "stdout":

        def say(message: str, code: int) -> None:
            print(f"FAILED {code} {message}", flush=True)

    return reporting(f"specpipe {role} worker", logging.getLogger().isEnabledFor(logging.DEBUG), say)


def secure(config: WorkerConfig):
    """(CurveKeys, the running ZAP authenticator) under --curve-keys, else (None, None); call it
    before any bind, and keep the authenticator referenced (it stops when collected). The draft is
    also a CURVE client (its data-plane PUSH). A bad key folder exits with the reason."""
    if not config.curve_keys:
        return None, None
    import zmq

    from specpipe import curve

    try:
        keys = curve.load_keys(
            config.curve_keys,
            server=True,
            client=config.role == "draft" and config.transport == "zmq" and bool(config.target_data_addr),
        )
    except curve.CurveError as err:
        raise UsageError(str(err)) from None
    return keys, curve.start_authenticator(zmq.Context.instance(), keys)


def build_engine(config: WorkerConfig, model, device, curve_keys=None):
    """The role's engine wired to its data plane; returns (engine, data endpoint or "").
    `curve_keys`: the zmq data plane runs over CURVE (the authenticator already runs). `model`:
    None for the ngram drafter; its Linear weights are laid out here first (`weight_layout`; with
    the auto layout, on the CPU, prepacked for oneDNN too, models.prepack_linears: the output
    embedding, and for a target every Linear; build_store then keeps the copies only where it
    times them faster, tune_prepacked_here), so every launch (serve, a worker alone, torchrun)
    gets the same. Each choice is logged and kept in the engine's `setup` (its Pongs carry it to
    GetStats)."""
    from specpipe import dataplane
    from specpipe.models import prepack_linears, use_weight_layout

    setup: list[str] = []
    if model is not None:
        layout = weight_layout(config, torch.device(device))
        changed = use_weight_layout(model, layout)
        say(config.role, setup, f"{changed} Linear weights laid out {layout}-major")
        if config.weight_layout == "auto":  # (a layout asked for by name is kept as it is: no copies)
            prepacked = prepack_linears(model, layers=config.role == "target")
            say(config.role, setup, f"{prepacked} Linear weights prepacked for oneDNN")

    group = None
    if config.transport == "torch":
        from specpipe.distributed import init_from_env

        group = init_from_env(device, config.dist_timeout_s)
    if config.role == "draft":
        from specpipe.draft_worker.engine import DraftEngine

        if group is not None:
            sender = dataplane.TorchSender(group.target_rank, device, group.data_group)
        else:
            sender = (
                dataplane.ZmqSender(config.target_data_addr, curve_keys=curve_keys) if config.target_data_addr else None
            )
        engine = DraftEngine(
            build_drafter(config, model, device, setup), probs_sender=sender, proposal=proposal_table(config)
        )
        engine.setup = setup
        return engine, ""
    from specpipe.models import vocab_size
    from specpipe.predictor import load_predictor
    from specpipe.target_worker.engine import BatchLimits, TargetEngine

    predictor = load_predictor(config.model) if config.use_predictor else None
    if predictor is not None:
        logging.getLogger(__name__).info("acceptance-length predictor loaded: %r", predictor)
    limits = BatchLimits(config.max_batch_tokens, config.max_batch_requests, config.prefill_chunk)
    store = build_store(config, model, device, config.kv_slots or DEFAULT_TARGET_SLOTS, setup)
    data_endpoint = ""
    if group is not None:
        receiver = dataplane.TorchReceiver(group.draft_rank, vocab_size(model), device, group.data_group)
    else:
        receiver = dataplane.ZmqReceiver(config.data_bind, curve_keys=curve_keys)
        data_endpoint = receiver.endpoint
    engine = TargetEngine(model, store, device, limits, probs_receiver=receiver, predictor=predictor)
    engine.setup = setup
    return engine, data_endpoint


def say(role: str, setup: list[str] | None, line: str) -> None:
    """Log one of the worker's start-up choices (`ROLE: line`) and keep it in `setup`."""
    logging.getLogger(__name__).info("%s: %s", role, line)
    if setup is not None:
        setup.append(line)


def proposal_table(config: WorkerConfig) -> ProposalTemperatures:
    """The draft's proposal temperatures: --temperature-scale's factor, else the table beside a
    model draft's weights, else the request's own temperature (an ngram drafter has no table)."""
    if config.temperature_scale is not None:
        table = ProposalTemperatures.uniform(config.temperature_scale)
    else:
        try:
            found = load_table(config.model) if config.drafter == "model" else None
        except ValueError as err:  # a file there that is not a table: the user's to fix
            raise UsageError(
                f"{err}: refit it with `specpipe calibrate-draft`, or pass --temperature-scale 1"
            ) from None
        table = found or ProposalTemperatures()
    logging.getLogger(__name__).info(
        "draft proposal temperature scales %s at request temperatures %s", table.scales, table.temperatures
    )
    return table


def build_store(config: WorkerConfig, model, device, slots: int, setup: list[str] | None = None):
    """The model's KV store (after checking the model can run over it: an UnsupportedModel names
    its type and why), allocated now: on a GPU its memory is taken at once, so a store that does
    not fit fails at start-up naming the flags, never an out-of-memory error mid-request; on a CPU
    the OS backs only the pages sequences write. On a GPU the slots are cut to what fits. The
    model's prepacked copies, if any, are then timed over it and kept where they pay
    (tune_prepacked_here: the first forwards over the store, so here)."""
    from specpipe.kv_store import KVStore, written_out_forward
    from specpipe.model_check import prepare_model
    from specpipe.models import context_length

    prepare_model(model, device)
    if written_out_forward(model) is not None:
        say(config.role, setup, "packed forwards run the layers written out (lean_forward.py)")
    slot_len = min(config.max_seq_len or context_length(model), context_length(model))
    if torch.device(device).type == "cuda":
        slots = slots_that_fit(model, device, slots, slot_len)
    store = KVStore(slots, slot_len, device)
    store.reserve(model)
    say(config.role, setup, f"KV store: {slots} slots of {slot_len} positions")
    chosen = tune_prepacked_here(model, store)
    for group, min_rows in chosen.items():
        use = (
            f"oneDNN copies from {min_rows} rows" if min_rows else "plain weights (oneDNN copies slower here: dropped)"
        )
        say(config.role, setup, f"{group}: {use}")
    return store


def tune_prepacked_here(model, store) -> dict[str, int | None]:
    """models.tune_prepacked, timed with the worker's own packed forwards: n tokens behind a
    context of TUNE_CONTEXT in a slot of the store borrowed meanwhile. Nothing to time (and {})
    where the model has no prepacked copies."""
    from specpipe.kv_store import Row, forward_packed
    from specpipe.models import PREPACK_TUNE_TOKENS, PrepackedLinear, tune_prepacked

    tokens = [n for n in PREPACK_TUNE_TOKENS if n < store.slot_len]
    if not tokens or not any(isinstance(module, PrepackedLinear) for module in model.modules()):
        return {}
    context = min(TUNE_CONTEXT, store.slot_len - max(tokens))
    ids = torch.zeros(context + max(tokens), dtype=torch.long, device=store.device)
    slot = store.allocate()

    def forward_seconds(n: int) -> float:
        start = time.perf_counter()
        forward_packed(model, store, [Row(slot, context, n)], ids[context : context + n], keep=list(range(n)))
        return time.perf_counter() - start

    try:
        with torch.inference_mode():
            forward_packed(model, store, [Row(slot, 0, context)], ids[:context], keep=[context - 1])
            return tune_prepacked(model, forward_seconds, tokens)
    finally:
        store.free(slot)


def slots_that_fit(model, device, slots: int, slot_len: int) -> int:
    """How many slots of `slot_len` positions fit in the GPU's free memory (KV_MEMORY_SHARE of it)."""
    from specpipe.kv_store import KV_MEMORY_SHARE, bytes_per_position

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    fitting = int(free * KV_MEMORY_SHARE) // (slot_len * bytes_per_position(model))
    if fitting < 1:
        raise UsageError(
            f"not one KV slot of {slot_len} positions fits the {free / 2**30:.1f} GiB free on {device}: "
            f"lower --max-seq-len"
        )
    if fitting < slots:
        logging.getLogger(__name__).warning(
            "KV store: %d slots requested, %d fit in the free memory of %s", slots, fitting, device
        )
    return min(slots, fitting)


def build_drafter(config: WorkerConfig, model, device, setup: list[str] | None = None):
    from specpipe.draft_worker.drafter import ModelDrafter, NgramDrafter

    if config.drafter == "ngram":
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(config.model).get_text_config(decoder=True)
        return NgramDrafter(text_config.vocab_size, config.max_seq_len or 1 << 20)
    store = build_store(config, model, device, config.kv_slots or DEFAULT_DRAFT_SLOTS, setup)
    return ModelDrafter(model, store, device, config.prefill_chunk)
