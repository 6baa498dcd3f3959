"""Run under `torchrun --nproc_per_node=2`: the 2-process side of tests/parallel/test_parallel_fsdp2.py.

    torchrun --nproc_per_node=2 tests/parallel/fsdp2_worker.py <data_root> <out_root> jobs <hf_ckpt> <one2two_dir>
    torchrun --nproc_per_node=2 tests/parallel/fsdp2_worker.py <data_root> <out_root> victim|resume|losses

`jobs` runs every comparison job with parallelism=fsdp2, resumes a 1-process fsdp2 run on 2 ranks, writes per-rank
parameter + gradient + optimizer bytes under fsdp2 and ddp, and checks the bad inputs that need 2 ranks. `victim`
runs the 5-step SFT job and SIGKILLs the launch while step 4's checkpoint is being written; `resume` continues it.
`losses` runs the jobs of loss_jobs.py (tests/parallel/test_parallel_losses.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from parallel_jobs import job, register_rewards, run_job  # this script's folder is on sys.path

torch.set_num_threads(1)


def state_bytes(parallelism: str) -> int:
    """This rank's bytes of parameters, gradients and AdamW state after one step of a tiny model."""
    from posttrain.models import tiny_model
    from posttrain.models.forward import TokenLogps
    from posttrain.train.distributed import init_distributed
    from posttrain.train.optim import build_optimizer
    from posttrain.train.parallel import parallelize

    d = init_distributed("cpu", group=True, parallelism=parallelism)
    model = tiny_model(seed=0, num_layers=4, hidden_size=64)
    fn = parallelize(TokenLogps(model), d)
    optimizer = build_optimizer(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(d.rank))
    fn(ids, ids).logps.sum().backward()
    optimizer.step()

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    total = sum(local(p) for p in params) + sum(local(p.grad) for p in params if p.grad is not None)
    total += sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def main() -> None:
    data_root, out_root, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    register_rewards()
    rank = int(os.environ["RANK"])
    import torch.distributed as dist

    dist.init_process_group("gloo")  # one group for every run of this launch (the recipes leave it open)

    data = {k: str(p) for k, p in ((p.stem, p) for p in data_root.glob("*.jsonl"))}
    data["rl"] = str(data_root / "prompts.jsonl")
    if what == "losses":  # the new losses' jobs of tests/parallel/test_parallel_losses.py (default parallelism)
        from loss_jobs import LOSS_JOBS, loss_job

        for name in LOSS_JOBS:
            run_job(*loss_job(name, data, out_root, world_size=2))
        return
    if what in ("victim", "resume"):
        if what == "victim":  # SIGKILL the whole launch while step 4's shards are being written
            import signal

            import torch.distributed.checkpoint as dcp

            save = dcp.save

            def save_then_die(state, checkpoint_id, **kw):
                save(state, checkpoint_id=checkpoint_id, **kw)
                if "step-00000004" in str(checkpoint_id):  # both ranks get here (dcp.save is collective)
                    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)  # torchrun's group (the test gave it one)
                    os.killpg(os.getpgid(0), signal.SIGKILL)

            dcp.save = save_then_die
        recipe, keys = job("sft5", data, out_root, world_size=2, parallelism="fsdp2")
        run_job(recipe, keys, resume="latest" if what == "resume" else None)
        return
    for name in ("sft", "sft_lora", "dpo", "reward", "grpo", "dapo", "cispo", "scalerl", "ppo", "sft5", "grpo5"):
        recipe, keys = job(name, data, out_root, world_size=2, parallelism="fsdp2")
        run_job(recipe, keys)
    for name in ("grpo", "ppo"):  # the default parallelism (torch DDP) on the RL recipes
        recipe, keys = job(name, data, out_root, world_size=2, output_dir=str(out_root / f"{name}_ddp"))
        run_job(recipe, keys)
    # 1 -> 2: continue a 1-process fsdp2 run from its step-3 checkpoint on 2 ranks
    recipe, keys = job("sft5", data, out_root, world_size=2, parallelism="fsdp2", output_dir=sys.argv[5])
    run_job(recipe, keys, resume="latest")
    sizes = {p: state_bytes(p) for p in ("ddp", "fsdp2")}
    (out_root / f"memory-rank{rank}.json").write_text(json.dumps(sizes))
    # bad input that needs 2 ranks: exit 2 and nothing written
    from posttrain.cli import main as cli

    bad = out_root / "bad-split"
    rc = cli(["grpo", f"train_file={data['rl']}", "model=tiny", "rewards=letters", "prompts_per_step=3",
              "parallelism=fsdp2", f"output_dir={bad}", "progress=false"])
    newest = sys.argv[4]  # an hf-layout checkpoint (written by a 1-process run)
    rc2 = cli(["sft", f"train_file={data['sft']}", "model=tiny", "parallelism=fsdp2", "max_steps=2",
               f"output_dir={out_root / 'bad-layout'}", "progress=false", "--resume", newest])
    if rank == 0:
        (out_root / "bad.json").write_text(json.dumps({"split": rc, "split_written": bad.exists(), "layout": rc2,
                                                       "layout_written": (out_root / "bad-layout").exists()}))


if __name__ == "__main__":
    try:
        main()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
