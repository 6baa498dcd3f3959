"""The reverse-process loop shared by every scheduler (Ho et al. 2020 Algorithm 2; DDIM §4.2 on a sub-sequence τ).

The loop owns the network call; the scheduler owns the step. `denoise_fn(x_t, t)` maps x_t [B, ...] and integer
timesteps t [B] to the network's output [B, ...]; the scheduler is anything with `step(...)` and `init_noise_sigma`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from posttrain.diffusion.schedules import SchedulerOutput

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Scheduler(Protocol):
    init_noise_sigma: float

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, *, prev_t: int | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> SchedulerOutput: ...


def initial_noise(shape: Sequence[int], scheduler: Scheduler, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T ~ N(0, init_noise_sigma² I) of the given shape, e.g. [B, 2] or [B, 64]."""
    return scheduler.init_noise_sigma * torch.randn(tuple(shape), generator=generator, dtype=dtype)


@torch.no_grad()
def sample_loop(
    denoise_fn: DenoiseFn,
    scheduler: Scheduler,
    timesteps: Sequence[int],
    x_init: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noises: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run x_{τ_S} -> … -> x_{τ_1} -> x_0 over the descending `timesteps` (the last jump goes to prev_t = −1).

    noises[i], if given, is the noise of step i (shape of x_init); otherwise steps draw from `generator`."""
    x = x_init
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)  # [B]
        model_output = denoise_fn(x, t_batch)
        noise = None if noises is None else noises[i]
        x = scheduler.step(model_output, int(t), x, prev_t=prev_t, noise=noise, generator=generator).prev_sample
    return x
