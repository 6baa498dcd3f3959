"""Run under `torchrun --nproc_per_node=2`: the 2-process side of tests/distill/test_distill_parallel.py.

    torchrun --nproc_per_node=2 tests/distill/distill_worker.py <data_root> <out_root> <resume_dir>

Runs every job of distill_jobs.JOBS on 2 ranks (one process group for the launch), then copies the FSDP2 run to
<resume_dir> cut back to its step-1 checkpoint (its DCP shards) and resumes it there on 2 ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from distill_jobs import JOBS, config_keys, run_job, write_data  # this script's folder is on sys.path

torch.set_num_threads(1)


def main() -> None:
    data_root, out_root, resume_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    import torch.distributed as dist

    dist.init_process_group("gloo")  # one group for every run of this launch (the recipe leaves it open)
    data = write_data(data_root)  # already written by the test: only reads paths
    for name in JOBS:
        run_job(config_keys(name, data, out_root, world_size=2))
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.copytree(out_root / "on_policy_fsdp2", resume_dir)
        shutil.rmtree(resume_dir / "final")
        for late in sorted((resume_dir / "checkpoints").glob("step-*"))[1:]:
            shutil.rmtree(late)
    dist.barrier()
    from posttrain.recipes.distill import DistillConfig, run

    keys = config_keys("on_policy_fsdp2", data, out_root, world_size=2, output_dir=str(resume_dir))
    run(DistillConfig(**keys), resume=str(resume_dir / "checkpoints" / "step-00000001"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
