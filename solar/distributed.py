"""torch.distributed helpers for `solar.train` (torchrun / multi-node).

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT), picks NCCL on CUDA and gloo on CPU, and returns a `DistInfo`.
Without those variables it returns a single-process `DistInfo` and touches nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "resolve_device", "get_dist", "barrier"]


@dataclass
class DistInfo:
    """Who this process is: rank, world size, local rank, the device it trains on, the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Optional[object] = None   # the process group for losses (None when world == 1)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT = DistInfo()


def get_dist() -> DistInfo:
    """The DistInfo set by the last `init_distributed` call (single process by default)."""
    return _CURRENT


def resolve_device(device="auto", local_rank: int = 0, *, name: str = "run.device") -> torch.device:
    """The torch.device that `device` asks for: "auto" (cuda:<local_rank> when CUDA is available,
    else cpu), "cpu", "cuda" (cuda:<local_rank>), "cuda:N" or a torch.device.  Anything else, or a
    CUDA device torch cannot see, is a ValueError naming `name`."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name}: expected a device string ('auto', 'cpu', 'cuda', 'cuda:N') or a torch.device, "
                        f"got {type(device).__name__}")
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {str(device)!r} was asked for but torch sees no CUDA device")
        n = torch.cuda.device_count()
        if d.index is None:
            d = torch.device("cuda", local_rank % max(1, n))
        elif d.index >= n:
            raise ValueError(f"{name}: {str(device)!r} was asked for but torch sees {n} CUDA device(s)")
    return d


def init_distributed(device: str = "auto", backend: Optional[str] = None,
                     init_method: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and choose this rank's device.

    backend: None = "nccl" for CUDA devices, "gloo" otherwise.  init_method: None = the
    environment (torchrun's MASTER_ADDR / MASTER_PORT); else e.g. "file:///shared/rdzv" (a
    file rendezvous needs no free TCP port; RANK and WORLD_SIZE still come from the
    environment)."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            # long waits happen (rank 0 alone builds data / evaluates): SOLAR_DIST_TIMEOUT_MIN, default 24 h
            timeout = timedelta(minutes=float(os.environ.get("SOLAR_DIST_TIMEOUT_MIN", 24 * 60)))
            kw = {} if init_method is None else dict(init_method=init_method, rank=rank, world_size=world)
            dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"), timeout=timeout,
                                    **kw)
        rank, world = dist.get_rank(), dist.get_world_size()
        _CURRENT = DistInfo(rank, world, local_rank, dev, dist.group.WORLD)
    else:
        _CURRENT = DistInfo(0, 1, 0, dev, None)
    return _CURRENT


def barrier() -> None:
    """dist.barrier() when distributed, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

