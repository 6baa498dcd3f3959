"""Run under `torchrun --nproc_per_node=2`: the 2-process side of tests/parallel/test_parallel_losses.py.

    torchrun --nproc_per_node=2 tests/parallel/losses_worker.py <data_root> <out_root>

Runs every job of `loss_jobs.LOSS_JOBS` with 2 ranks (the recipes' default parallelism) under one process group.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from loss_jobs import LOSS_JOBS, loss_job  # this script's folder is on sys.path
from parallel_jobs import register_rewards, run_job

torch.set_num_threads(1)


def main() -> None:
    data_root, out_root = Path(sys.argv[1]), Path(sys.argv[2])
    register_rewards()
    import torch.distributed as dist

    dist.init_process_group("gloo")  # one group for every run of this launch (the recipes leave it open)
    data = {p.stem: str(p) for p in data_root.glob("*.jsonl")}
    data["rl"] = str(data_root / "prompts.jsonl")
    for name in LOSS_JOBS:
        run_job(*loss_job(name, data, out_root, world_size=2))


if __name__ == "__main__":
    try:
        main()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
