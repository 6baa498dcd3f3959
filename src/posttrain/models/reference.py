"""The reference policy π_ref of preference training (DPO and its variants, KTO): which network plays it
(`reference_kind`), TR-DPO's update of its weights (`sync_reference`, Gorbatovski et al. 2024), and a TokenLogps that
computes it (`reference_logps_fn`). recipes.dpo's docstring explains the three kinds."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from posttrain.models.forward import TokenLogps


def reference_kind(*, precompute: bool, lora: bool, sync_steps: int, sync_alpha: float) -> str:
    """"copy", "base" or "policy" (see the module docstring)."""
    sync = sync_steps > 0
    if (not precompute and (not lora or sync)) or (sync and sync_alpha < 1.0):
        return "copy"
    if lora and not sync:
        return "base"
    return "policy"


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as the plain network would hold them: a peft model's LoRA deltas merged (W + s·B·A), names
    without peft's prefixes. A plain model's parameters are returned as they are."""
    if not hasattr(model, "get_base_model"):
        return dict(model.named_parameters())
    inner = model.get_base_model()
    out = {name.replace(".base_layer.", "."): p for name, p in inner.named_parameters() if "lora_" not in name}
    for name, module in inner.named_modules():
        if hasattr(module, "get_delta_weight") and getattr(module, "merged", False) is False:
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    key = f"{name}.weight"
                    out[key] = out[key] + module.get_delta_weight(adapter)
    return out


@torch.no_grad()
def sync_reference(ref_model: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO update of the reference weights: π_ref <- α·π_θ + (1 − α)·π_ref (α = 1: hard copy)."""
    weights = effective_weights(policy)
    for name, p in ref_model.named_parameters():
        if alpha == 1.0:
            p.copy_(weights[name])
        else:
            p.mul_(1.0 - alpha).add_(weights[name].to(p.dtype), alpha=alpha)


@contextlib.contextmanager
def reference_logps_fn(kind: str, policy: nn.Module, ref_model: nn.Module | None, chunk_size: int):
    """A TokenLogps that computes π_ref, in eval mode: the frozen copy, the policy without adapters, or the policy."""
    net = ref_model if kind == "copy" else policy
    if net is None:
        raise ValueError("reference kind 'copy' needs the frozen copy (ref_model)")
    was_training = net.training
    net.eval()
    adapters_off = policy.disable_adapter() if kind == "base" else contextlib.nullcontext()
    try:
        with adapters_off, torch.no_grad():
            yield TokenLogps(net, chunk_size=chunk_size)
    finally:
        net.train(was_training)
