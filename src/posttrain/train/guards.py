"""Step guards shared by every training loop: non-finite steps are skipped, never applied or saved.

`NonFiniteGuard.ok(loss, grad_norm)` decides, identically on every rank, whether an optimizer step may be applied:
a step whose loss or gradient norm is NaN or ±inf on ANY rank is skipped everywhere (the recipe does not call
optimizer.step() or scheduler.step(), so parameters, optimizer moments and the LR schedule stay as they were; the
gradients are dropped by the usual zero_grad). Skips are counted and logged; after `max_consecutive` skips in a row
the run stops with NonFiniteError (exit 2). `check_finite_weights` refuses to write a checkpoint or final model
whose weights are not finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from posttrain.errors import PosttrainError


class NonFiniteError(PosttrainError):
    """Training produced NaN or inf values (loss, gradients or weights) and cannot go on."""


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class NonFiniteGuard:
    """Counts skipped steps; see the module docstring. `d` is the recipe's train.distributed.Dist (None: one
    process)."""

    def __init__(self, max_consecutive: int, d: Any = None):
        self.max_consecutive = max_consecutive
        self.d = d
        self.consecutive = 0
        self.skipped = 0
        self.last_skipped = False

    def ok(self, *values: Any, step: int | None = None) -> bool:
        """True if every value (loss, gradient norm...) is finite on every rank; otherwise count a skip, and raise
        NonFiniteError once `max_consecutive` steps in a row were skipped."""
        bad = 0.0 if all(_finite(v) for v in values) else 1.0
        if self.d is not None and getattr(self.d, "enabled", False):
            from posttrain.train.distributed import all_reduce_sum

            bad = all_reduce_sum(bad, self.d)  # the same decision on every rank
        self.last_skipped = bad > 0
        if not self.last_skipped:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        where = f" at step {step}" if step is not None else ""
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"the loss or gradient norm was NaN/inf in {self.consecutive} optimizer steps in a row{where} "
                f"(key 'max_nonfinite_steps' = {self.max_consecutive}); the run stops with its weights intact. "
                "Lower 'lr', keep 'max_grad_norm' > 0, or check the data; resume from the last checkpoint.")
        import logging

        logging.getLogger(__name__).warning("non-finite loss or gradient norm%s: step skipped (%d in a row)", where,
                                            self.consecutive)
        return False

    def metrics(self) -> dict[str, float]:
        """Per-step metrics: whether this step was skipped, and the run's total."""
        return {"train/nonfinite_skipped": float(self.last_skipped), "train/nonfinite_total": float(self.skipped)}


def check_finite_weights(modules: Iterable[nn.Module], where: str) -> None:
    """Raise NonFiniteError (before anything is written to `where`) if any parameter or buffer is NaN or inf."""
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
                raise NonFiniteError(f"not writing {where}: weight '{name}' holds NaN/inf values. The previous "
                                     "checkpoints are kept; resume from one with a lower 'lr'.")
