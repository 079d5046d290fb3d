"""torch.distributed set-up, in one function (STYLE §6): read the rank and the rendezvous from the
environment (what torchrun sets: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), pick the
backend from the device (NCCL on CUDA, gloo on CPU), and fail with a message that names the
address, the port and what timed out — never hang.

Ranks: the target worker is rank 0 (it also hosts the coordinator under torchrun), the draft rank
1 (DESIGN §7); SPECPIPE_TARGET_RANK / SPECPIPE_DRAFT_RANK override that.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# The data plane's receiver waits in recv for as long as the server idles. On a group with the
# set-up timeout that recv would give up (gloo raises after it, NCCL's watchdog aborts the
# process), so the data plane gets a group of its own whose timeout is, in practice, never.
DATA_PLANE_TIMEOUT = datetime.timedelta(days=365)


class DistributedSetupError(RuntimeError):
    """The process group could not be formed: the message says where and what timed out."""


@dataclass(frozen=True)
class GroupInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    target_rank: int
    draft_rank: int
    data_group: object = None  # the data plane's process group (DATA_PLANE_TIMEOUT)


def device_for_local_rank(local_rank: int | None = None) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there, else cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise DistributedSetupError(f"--transport torch needs {name} in the environment (torchrun sets it)")
    return value


def init_from_env(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> GroupInfo:
    import torch.distributed as dist

    addr, port = _env("MASTER_ADDR"), _env("MASTER_PORT")
    rank, world_size = int(_env("RANK")), int(_env("WORLD_SIZE"))
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    logger.info(
        "rank %d/%d joining the %s group at %s:%s (timeout %.0fs)", rank, world_size, backend, addr, port, timeout_s
    )
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous(f"tcp://{addr}:{port}?rank={rank}&world_size={world_size}", timeout=timeout))
        # Under torchrun the agent's store outlives a restart of the ranks (--max-restarts): keys of
        # the previous attempt (the old peers' addresses) must not be read as this one's.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"specpipe/attempt_{attempt}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        # A first collective proves every peer is there (init alone may return before they are).
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        data_group = dist.new_group(list(range(world_size)), timeout=DATA_PLANE_TIMEOUT, backend=backend)
    except Exception as err:
        raise DistributedSetupError(
            f"rank {rank} of {world_size} could not form the torch.distributed {backend} group at "
            f"{addr}:{port} within {timeout_s:.0f}s (waiting for the other ranks to join): {err}"
        ) from err
    return GroupInfo(
        rank=rank,
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", rank)),
        backend=backend,
        target_rank=int(os.environ.get("SPECPIPE_TARGET_RANK", 0)),
        draft_rank=int(os.environ.get("SPECPIPE_DRAFT_RANK", 1)),
        data_group=data_group,
    )
