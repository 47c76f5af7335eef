"""Process-group set-up for single-process, ``torchrun`` (DDP) and DeepSpeed runs.

The engine reads the standard launcher variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), which
``torchrun`` and the ``deepspeed`` launcher both set. Without them a plain run is a single process and no
process group is created; a DeepSpeed run then sets them for one rank in-process (DeepSpeed always wants a
process group, and would otherwise look for MPI).
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from memtrain.devices import pick_device
from memtrain.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    #: environment variables this process set for itself (removed again by :func:`shutdown`)
    own_env: list[str] = field(default_factory=list)
    #: a process group was created (also for one DeepSpeed rank); :func:`shutdown` destroys it
    own_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


#: default of ``dist.timeout_s``
DEFAULT_TIMEOUT_S = 600


def init_distributed(
    device_request: str = "auto", backend: str = "auto", engine: str = "plain", timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise describe a single process.

    ``timeout_s``: how long the rendezvous and every collective wait for the other ranks before failing (so
    one rank that dies or hangs ends the run instead of stalling the others).
    ``engine="deepspeed"``: initialise DeepSpeed's communication instead (see :func:`init_deepspeed`)."""
    own = adopt_launcher_env()
    if engine == "deepspeed":
        return init_deepspeed(device_request, backend, own, timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, own_env=own, own_group=world > 1)


def adopt_launcher_env() -> list[str]:
    """The ``deepspeed`` launcher sets LOCAL_SIZE where torchrun sets LOCAL_WORLD_SIZE, which the data loader
    (mosaicml-streaming) needs to know which ranks share a node: copy it over. Returns the names set."""
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
        return ["LOCAL_WORLD_SIZE"]
    return []


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if dist.is_initialized() and info.own_group:
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups
        else:
            dist.destroy_process_group()
    for name in info.own_env:
        os.environ.pop(name, None)


def free_port() -> int:
    """A TCP port that is free on this host now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_deepspeed(device: torch.device):
    """``import deepspeed`` with its accelerator matching ``device`` and without the shared-memory
    all-reduce extension (DeepSpeed builds ``deepspeed_shm_comm`` at every ``init_distributed``, 35-40 s the
    first time and two 66 MB /dev/shm files per run; gloo does the work without it)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise UserError(
            f"dist.engine: deepspeed cannot be imported ({exc}); install it "
            "(pip install deepspeed==0.19.8) or use dist.engine: plain"
        ) from None
    # the submodule itself: the package attribute deepspeed.comm.torch is the torch library
    comm_torch: Any = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None
    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def init_deepspeed(
    device_request: str = "auto",
    backend: str = "auto",
    own: list[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DistInfo:
    """DeepSpeed's process group, from the launcher's variables, or for one in-process rank when there are
    none (RANK=0, WORLD_SIZE=1 and a free MASTER_PORT are set here and removed at :func:`shutdown`)."""
    own = list(own or [])
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        for name, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(free_port())),
        ):
            if name not in os.environ:
                os.environ[name] = value
                own.append(name)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    deepspeed = import_deepspeed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, own_env=own, own_group=True)
