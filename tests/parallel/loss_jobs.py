"""The new losses' 2-process comparison jobs: the GRPO recipe with GSPO, SAPO, DPPO (TV and KL) and RLOO, and the
DPO recipe with SimPO, ORPO and length-averaged IPO, on the data and settings of parallel_jobs (KTO has its own
2-process test in tests/preference). The RL jobs take μ = 2 passes over each batch, so the second pass is
off-policy and the clips, gates and trust-region masks act; each rank generates half of the step's prompts."""

from __future__ import annotations

from pathlib import Path

from parallel_jobs import job

RL_LOSSES = ["gspo", "sapo", "dppo_tv", "dppo_kl", "rloo"]
PREFERENCE_LOSSES = ["simpo", "orpo", "ipo_avg"]
LOSS_JOBS = RL_LOSSES + PREFERENCE_LOSSES


def loss_job(name: str, data: dict[str, str], out: Path, *, world_size: int) -> tuple[str, dict]:
    """(recipe, config keys) of loss `name` for `world_size` ranks, writing to out/name."""
    if name in RL_LOSSES:
        # a narrow GSPO band (its default 3e-4/4e-4 is wider than what one tiny step moves a sequence ratio)
        band = {"epsilon_low": 0.01, "epsilon_high": 0.01} if name == "gspo" else {}
        return job("cispo", data, out, world_size=world_size, loss=name, updates_per_batch=2, max_steps=2,
                   output_dir=str(out / name), **band)
    return job("dpo", data, out, world_size=world_size, loss=name, max_steps=2, output_dir=str(out / name))
