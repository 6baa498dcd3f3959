"""Data parallelism through torch.distributed, as set up by `torchrun` or `accelerate launch` (env:// variables).

One process: everything here is a no-op. Several: gloo on CPU, nccl on CUDA; the model is wrapped by train.parallel
(DDP or FSDP2), each rank reads its own slice of every global batch, and global counts (tokens, sequences) are summed
across ranks so that the loss normalization matches one big batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from posttrain.errors import ConfigError

R = TypeVar("R")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallelism: str = "ddp"  # none, ddp or fsdp2 (train.parallel)
    mixed_precision: bool = False  # fsdp2 on CUDA: bf16 compute, fp32 reduction
    cpu_offload: bool = False  # fsdp2 on CUDA: shards kept in host memory

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", *, group: bool = False, **options: Any) -> Dist:
    """Join the process group if launched by torchrun/accelerate (WORLD_SIZE > 1, or any size with `group`).
    options: the Dist fields parallelism, mixed_precision and cpu_offload."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"key 'device' must be auto, cpu or cuda, got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device' is cuda, but no CUDA device is available here (torch.cuda.is_available() "
                          "is False); use device=auto or device=cpu.")
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if (world_size > 1 or group) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, **options)


def all_reduce_sum(value: float | torch.Tensor, d: Dist) -> float:
    """Sum a number over ranks (identity in one process)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if d.enabled:
        t = t.to(d.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def barrier(d: Dist) -> None:
    """Wait for every process (no-op in a single process)."""
    if d.enabled:
        dist.barrier()


def cleanup(d: Dist) -> None:
    """Leave the process group if one was joined."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(body: Callable[[Any, Any, Dist], R], config: Any, resume: Any) -> R:
    """body(config, resume, d) inside the process group that `config.device`, `config.parallelism` and the launcher
    ask for (checked first: train.parallel.resolve_parallelism); the group is left again, and the output folder's
    lock released (train.run_dir), whether the body returns or raises."""
    from posttrain.train.parallel import resolve_parallelism
    from posttrain.train.run_dir import close_runs

    options = resolve_parallelism(config)
    owned = not dist.is_initialized()  # a group the caller opened (several runs in one launch) stays open
    d = init_distributed(config.device, group=options["parallelism"] == "fsdp2", **options)
    try:
        return body(config, resume, d)
    finally:
        close_runs()
        if owned:
            cleanup(d)


def check_rl_launch(prompts_per_step: int, generation_backend: str, d: Dist) -> None:
    """The launch rules GRPO and PPO share: whole prompt groups per rank, and vLLM in one training process only."""
    from posttrain.errors import ConfigError

    if prompts_per_step % d.world_size:
        raise ConfigError(f"key 'prompts_per_step' ({prompts_per_step}) must be a multiple of the world size "
                          f"({d.world_size}): each rank generates whole groups for its share of the step's prompts.")
    if d.enabled and generation_backend != "hf":
        raise ConfigError("generation_backend=vllm runs in one training process for now; launch without torchrun, "
                          "or use generation_backend=hf with parallelism.")
