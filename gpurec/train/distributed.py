"""Process group and device for training: one process, `torchrun`, CPU (gloo) or GPU (NCCL).

`torchrun --nproc_per_node N` sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a plain
`gpurec train` is a world of one, still with a process group, because DistributedModelParallel
needs one. The device is chosen automatically: this rank's GPU when CUDA is available, else CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpurec.errors import InvalidInput


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(local_rank: int, requested: str = "auto") -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput("--device cuda asked for, but torch sees no CUDA device (is this the CPU build?)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto") -> DistContext:
    """Join (or create, for a single process) the default process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    chosen = pick_device(local_rank, device)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        # Not under torchrun: a private world of one on loopback. The address is passed, not put in
        # os.environ, so child processes (a torchrun started from here) don't inherit it.
        init_method = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_loopback_port()}"
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, chosen, backend)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (used for logging losses that every rank agrees on)."""
    value = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
