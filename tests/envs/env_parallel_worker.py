"""Run under `torchrun --nproc_per_node=2`: the 2-process side of tests/envs/test_envs_parallel.py.

    torchrun --nproc_per_node=2 tests/envs/env_parallel_worker.py <root>
"""

from __future__ import annotations

import sys

import torch
from envs_helpers import write_env_job  # this script's folder is on sys.path

torch.set_num_threads(1)


def main() -> None:
    from posttrain.config import build_config
    from posttrain.recipes.grpo import GRPOConfig, run

    run(build_config(GRPOConfig, write_env_job(sys.argv[1], world_size=2, out_name="two")))


if __name__ == "__main__":
    try:
        main()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
