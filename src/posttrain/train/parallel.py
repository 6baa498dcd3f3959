"""Data parallelism on PyTorch's own engines, chosen by one key every training recipe shares: `parallelism`.

- `none`: one process; launching it under torchrun is an error (the ranks would train W unrelated copies).
- `ddp`: torch's DistributedDataParallel under torchrun (each rank holds the whole model and optimizer; gradients are
  all-reduced); in one process it is a no-op, so `ddp` is the default.
- `fsdp2`: `torch.distributed.fsdp.fully_shard` (FSDP2, DTensor) on each decoder layer and on the root, so every rank
  holds 1/W of the parameters, gradients and optimizer state; layers are all-gathered just in time for forward and
  backward and gradients reduce-scattered. On CUDA a MixedPrecisionPolicy computes in bf16 with fp32 gradient
  reduction (`mixed_precision`); CPUOffloadPolicy keeps the shards in host memory (`cpu_offload`). Needs torchrun
  (any world size, 1 included); activation checkpointing and LoRA compose with it.

Both DDP and FSDP2 average gradients over ranks: a recipe that normalizes its loss by a count summed over ranks
multiplies that loss by the world size (`Dist.world_size`) to get the single-process gradient.

`accelerate launch` runs the same processes as torchrun; its FSDP settings are honoured (FSDP → fsdp2, offload_params
→ cpu_offload, mixed_precision bf16 → mixed_precision) and what has no counterpart here (DeepSpeed, fp8, FSDP1 only
options) stops the run with a message that says to use torchrun. Nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from posttrain.errors import ConfigError
from posttrain.train.distributed import Dist

Parallelism = Literal["none", "ddp", "fsdp2"]
PARALLELISMS: tuple[str, ...] = get_args(Parallelism)


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun / torch.distributed.run (or a launcher that sets its env)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def accelerate_settings(env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The `accelerate launch` settings this library honours, read from the env it sets; None when not launched by
    accelerate. Raises ConfigError for settings that have no counterpart here."""
    env = dict(os.environ if env is None else env)
    if not any(k.startswith("ACCELERATE_") for k in env):
        return None
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("accelerate launch with DeepSpeed is not supported; launch with "
                          "`torchrun --nproc_per_node=N -m posttrain.cli <recipe> parallelism=fsdp2` instead.")
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("no", "bf16"):
        raise ConfigError(f"accelerate launch with mixed_precision={mp} is not supported (bf16 or no); launch with "
                          "torchrun and set `parallelism=fsdp2 mixed_precision=true` instead.")
    out: dict[str, Any] = {"mixed_precision": mp == "bf16"}
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = env.get("FSDP_VERSION", env.get("ACCELERATE_FSDP_VERSION", "2"))
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy not in ("FULL_SHARD", "1"):
            raise ConfigError(f"accelerate launch with FSDP sharding strategy {strategy} is not supported (FULL_SHARD "
                              "only); launch with torchrun and `parallelism=fsdp2` instead.")
        out.update(parallelism="fsdp2", fsdp_version=version,
                   cpu_offload=env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true")
    else:
        out["parallelism"] = "ddp"
    return out


def resolve_parallelism(config: Any) -> dict[str, Any]:
    """{parallelism, mixed_precision, cpu_offload} for this launch, checked before anything is loaded or written.

    Errors (ConfigError, exit 2): an unknown name; fsdp2 without torchrun; `none` under a multi-process launch; an
    accelerate launch whose settings contradict the config or have no counterpart.
    """
    parallelism = getattr(config, "parallelism", "ddp")
    if parallelism not in PARALLELISMS:
        raise ConfigError(f"key 'parallelism' must be one of {list(PARALLELISMS)}, got {parallelism!r}.")
    out = {"parallelism": parallelism, "mixed_precision": bool(getattr(config, "mixed_precision", True)),
           "cpu_offload": bool(getattr(config, "cpu_offload", False))}
    acc = accelerate_settings()
    if acc is not None and acc["parallelism"] == "fsdp2":
        if parallelism == "none":
            raise ConfigError("accelerate launch asks for FSDP but the config says parallelism=none; drop one.")
        out["parallelism"] = "fsdp2"
        out["cpu_offload"] = out["cpu_offload"] or acc["cpu_offload"]
        out["mixed_precision"] = acc["mixed_precision"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if out["parallelism"] == "fsdp2" and not launched_by_torchrun():
        raise ConfigError("parallelism=fsdp2 needs a process group: launch with `torchrun --nproc_per_node=N -m "
                          "posttrain.cli <recipe> ... parallelism=fsdp2` (N = 1 is fine).")
    if out["parallelism"] == "none" and world_size > 1:
        raise ConfigError(f"parallelism=none runs in one process, but this launch has WORLD_SIZE={world_size}; use "
                          "parallelism=ddp or fsdp2, or start it without torchrun.")
    return out


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks inside `module`: modules whose class a Hugging Face model lists in `_no_split_modules`
    (LlamaDecoderLayer, BertLayer, ...), outermost first."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers: list[nn.Module] = []
    for m in module.modules():
        if type(m).__name__ in names and not any(m in list(layer.modules()) for layer in layers):
            layers.append(m)
    return layers


def parallelize(module: nn.Module, d: Dist) -> nn.Module:
    """`module` ready for data-parallel training: unchanged (none, or one process with ddp), wrapped in torch DDP, or
    sharded in place with fully_shard (each decoder layer, then the root), as `d.parallelism` says. Build the optimizer afterwards: FSDP2
    replaces the parameters by DTensor shards. A module with no trainable parameter (a frozen reference) is sharded
    under fsdp2 and left whole under ddp."""
    if d.parallelism == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        # TokenLogps returns views of its log-prob buffer; nothing here modifies them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        if d.device.type == "cuda" and d.mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs["offload_policy"] = CPUOffloadPolicy() if d.cpu_offload and d.device.type == "cuda" else OffloadPolicy()
        for layer in decoder_layers(module):
            fully_shard(layer, **kwargs)
        for name in getattr(module, "fp32_modules", ()):  # e.g. PPO's value head: computes in float32 under bf16
            fully_shard(getattr(module, name), **{**kwargs, "mp_policy": MixedPrecisionPolicy(
                param_dtype=torch.float32, reduce_dtype=torch.float32)})
        fully_shard(module, **kwargs)
        module._get_fsdp_state()._lazy_init()  # type: ignore[operator]  # fix the root now: generation runs the layers
        # without the root, and the first module to run forward would otherwise become the root
        return module
    if d.parallelism == "ddp" and d.enabled and any(p.requires_grad for p in module.parameters()):
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    return module


def local_numel(p: torch.Tensor) -> int:
    """Elements of a parameter this rank holds: its FSDP2 shard (a DTensor's local part), or all of it."""
    to_local = getattr(p, "to_local", None)
    return to_local().numel() if to_local is not None else p.numel()


def is_sharded(module: nn.Module) -> bool:
    """Whether fully_shard was applied to `module`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def no_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient reduction of a micro-batch that is not the last of its optimizer step (DDP's no_sync,
    FSDP2's set_requires_gradient_sync)."""
    if not skip:
        yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # type: ignore[operator]
    elif hasattr(module, "no_sync"):
        with module.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Hold every shard of an FSDP2 root module gathered (whole parameters on every rank) for the block: generation
    calls the inner network token by token, on each rank a different number of times, so no collective may run
    inside. Enter it between optimizer steps, not between a forward and its backward. A no-op when not sharded."""
    if not is_sharded(module):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    parts = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in parts:
        m.unshard()
    for m in parts[1:]:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in parts[1:]:
            m.set_reshard_after_forward(True, recurse=False)
        # reshards every group and forgets the forwards that ran inside (their order differs across ranks and would
        # otherwise steer the next backward's prefetching into mismatched collectives)
        _reset_iter_state(module, parts)


def _reset_iter_state(module: nn.Module, parts: list) -> None:
    """FSDP2's `reset_iter_state()` (torch >= 2.13); on older torch the same by hand: reshard every group and clear
    the recorded forward order and iteration root (found on torch 2.11 by bench/gpu_check.py)."""
    reset = getattr(module, "reset_iter_state", None)
    if reset is not None:
        reset()
        return
    for m in parts:
        m.reshard()
    state = module._get_fsdp_state()  # type: ignore[operator]
    order = getattr(getattr(state, "_comm_ctx", None), "post_forward_order", None)
    if order is not None:
        order.clear()
    for s in state._state_ctx.all_states:
        pending = getattr(s, "_modules_to_run_forward", None)
        if pending is not None:
            pending.clear()
    state._state_ctx.iter_forward_root = None


def clip_grad_norm(parameters, max_norm: float) -> float:
    """torch's clip_grad_norm_ over (possibly sharded) parameters; the global norm as a float. With max_norm <= 0 it
    only measures (the norm is what train.guards.NonFiniteGuard checks; scaling by 1 leaves gradients bit-identical)."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `module`'s state dict whole, on the CPU (a collective under FSDP2: call it on every rank)."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu()
    return out


def all_gather_objects(value: Any, d: Dist) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] (just [value] in one process)."""
    if not d.enabled:
        return [value]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


def all_reduce_max(value: int, d: Dist) -> int:
    """The largest `value` over ranks."""
    if not d.enabled:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
