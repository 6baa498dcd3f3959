"""Shared bits of the robustness tests (the `rb` fixture): a small SFT data file, in-process CLI runs, weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main

SFT_COMMON = ["model=tiny", "max_length=64", "progress=false", "tensorboard=false", "micro_batch_size=2",
              "lr=3e-3", "lr_schedule=constant"]


def sft_data(folder: Path, n: int = 16) -> Path:
    path = folder / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{a}?"},
                          {"role": "assistant", "content": f"Answer: {2 * a}"}]} for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(data: Path, out: Path, *extra: str) -> int:
    """`posttrain sft` in this process (imports already paid); returns the exit status."""
    return main(["sft", f"train_file={data}", *SFT_COMMON, f"output_dir={out}", *extra])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "model.safetensors" if (folder / "model.safetensors").exists() else folder / "model" / "model.safetensors"
    return load_file(str(path))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def start_runs(args: list[str], log: Path, pause_in_checkpoint: bool, world_size: int = 1,
               in_child: Callable[[int], None] | None = None) -> list[int]:
    """Fork `world_size` children that run `posttrain args` together (torchrun's environment, gloo) and exit with
    its status; returns their pids. in_child(rank) runs first in each child (e.g. to patch something). Forks start
    in milliseconds once this process has imported what a run needs (run one in-process first)."""
    env = {"POSTTRAIN_FAULT_PAUSE": "checkpoint:30"} if pause_in_checkpoint else {}
    if world_size > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size))
    import torch.distributed as dist

    if dist.is_initialized():  # a group left in this worker (e.g. by an in-process vLLM engine of an earlier test):
        dist.destroy_process_group()  # a forked child would inherit it without its threads and hang in collectives
    pids = []
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery, just the run
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 -- lives as long as the child
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (pytest capture stays behind)
                os.environ.pop("POSTTRAIN_FAULT_PAUSE", None)
                os.environ.update(env)
                if world_size > 1:
                    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
                if in_child is not None:
                    in_child(rank)
                from posttrain.cli import main

                code = main(args)
            except BaseException:  # noqa: BLE001
                code = 99
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    return pids


def wait_runs(pids: list[int]) -> int:
    """0 if every process succeeded, -SIGKILL if any was killed, else the first failure's status."""
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    if -signal.SIGKILL in codes:
        return -signal.SIGKILL
    return next((c for c in codes if c != 0), 0)


@pytest.fixture
def rb():
    """The helpers above, as one namespace (the suite imports test modules without adding their folder to
    sys.path, so they cannot import a helper module)."""
    return types.SimpleNamespace(sft_data=sft_data, sft=sft, weights=weights, same_weights=same_weights,
                                 sft_common=SFT_COMMON, start_runs=start_runs, wait_runs=wait_runs)
