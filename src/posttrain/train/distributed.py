"""Data parallelism through torch.distributed, as set up by `torchrun` or `accelerate launch` (env:// variables).

One process: everything here is a no-op. Several: gloo on CPU, nccl on CUDA; the model is wrapped in DDP, each rank
reads its own slice of every global batch, and global counts (tokens, sequences) are summed across ranks so that the
loss normalization matches one big batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

R = TypeVar("R")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group if launched by torchrun/accelerate (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def all_reduce_sum(value: float | torch.Tensor, d: Dist) -> float:
    """Sum a number over ranks (identity in one process)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if d.enabled:
        t = t.to(d.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def wrap_ddp(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel when running on several processes, else as is."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def no_sync(module: torch.nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce for all but the last micro-batch of an accumulation step."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def barrier(d: Dist) -> None:
    """Wait for every process (no-op in a single process)."""
    if d.enabled:
        dist.barrier()


def cleanup(d: Dist) -> None:
    """Leave the process group if one was joined."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(body: Callable[[Any, Any, Dist], R], config: Any, resume: Any) -> R:
    """body(config, resume, d) inside the process group that `config.device` and the launcher ask for; the group is
    left again whether the body returns or raises."""
    d = init_distributed(config.device)
    try:
        return body(config, resume, d)
    finally:
        cleanup(d)
