"""Checkpoints of every parallelism, and the sharded (DCP) layout that fsdp2 writes.

Two layouts share `<output_dir>/checkpoints/step-<N>/` and its atomic rename (posttrain.files.atomic_dir: a kill at
any instant leaves the previous checkpoint loadable, the new one appears only when complete):
- `hf` (parallelism none / ddp): rank 0 writes the model as a Hugging Face folder and the whole optimizer state in
  trainer_state.pt (train.state.save_training_checkpoint).
- `dcp` (fsdp2): every rank writes its own shards of the model(s) and optimizer with torch.distributed.checkpoint into
  `dcp/`; rank 0 writes trainer_state.pt (scheduler, step, data position) and `layout.json`; each rank its RNG state.
  DCP reshards on load, so a dcp checkpoint resumes on any world size (2 → 1, 1 → 2) and under any parallelism;
  with the same world size the resumed run is bit-identical to an uninterrupted one.
An `hf` checkpoint holds the optimizer state keyed by parameter position, which cannot be sharded onto an fsdp2
model: resuming it with fsdp2 is refused (exit 2) before anything is written.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.errors import PosttrainError
from posttrain.files import atomic_dir
from posttrain.train.checkpoint import (
    STATE_FILE,
    _fault_point,
    checkpoint_dir,
    list_checkpoints,
    load_state,
    remove_tree_atomic,
    rng_state,
    set_rng_state,
    write_manifest,
)
from posttrain.train.distributed import Dist, barrier
from posttrain.train.parallel import all_gather_objects, full_state_dict
from posttrain.train.state import (
    restore_training_state,
    save_final,
    save_training_checkpoint,
)

LAYOUT_FILE = "layout.json"


def checkpoint_layout(checkpoint: Path) -> str:
    """"dcp" (sharded, written under fsdp2) or "hf" (whole model + optimizer, written under none / ddp)."""
    return "dcp" if (checkpoint / LAYOUT_FILE).exists() else "hf"


def check_resume_layout(checkpoint: Path | None, d: Dist) -> None:
    """Refuse, before anything is loaded or written, a checkpoint this launch cannot continue."""
    if checkpoint is None:
        return
    if d.parallelism == "fsdp2" and checkpoint_layout(checkpoint) == "hf":
        raise PosttrainError(
            f"--resume {checkpoint}: this checkpoint was written without sharding (parallelism none/ddp: one Hugging "
            "Face folder and an optimizer state keyed by parameter position), which cannot be laid onto an fsdp2 "
            "model. Resume it with parallelism=ddp (or none), or start a new fsdp2 run from its weights with "
            f"model={checkpoint / 'model'}.")
    if checkpoint_layout(checkpoint) == "dcp":
        layout = json.loads((checkpoint / LAYOUT_FILE).read_text())
        if layout.get("format") != "dcp" or "world_size" not in layout:
            raise PosttrainError(f"--resume {checkpoint}: {LAYOUT_FILE} is not a posttrain sharded-checkpoint layout.")


def _holder(modules: dict[str, nn.Module]) -> nn.Module:
    return nn.ModuleDict(modules)


def save_sharded_checkpoint(
    output_dir: str | Path, step: int, *, d: Dist, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
    scheduler, extra: dict[str, Any] | None = None, keep_last: int = 2,
) -> Path:
    """Every rank writes its shards of `modules` and `optimizer` to `step-<N>/dcp/`; the folder becomes visible in one
    rename by rank 0 after all ranks are done. modules: name -> network (the trained model, a critic, ...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(output_dir, step)
    model_sd, optim_sd = get_state_dict(_holder(modules), optimizer)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(final)) if d.is_main else None
        tmp = Path(all_gather_objects(str(tmp) if tmp else None, d)[0])
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        _fault_point("checkpoint")
        torch.save(rng_state(), tmp / f"rng-rank{d.rank}.pt")
        if d.is_main:
            torch.save({"scheduler": scheduler.state_dict(), "extra": extra or {}, "step": step, "rng": rng_state()},
                       tmp / STATE_FILE)
            (tmp / LAYOUT_FILE).write_text(json.dumps(
                {"format": "dcp", "parallelism": d.parallelism, "world_size": d.world_size,
                 "modules": sorted(modules)}) + "\n")
        barrier(d)  # every rank's shards are on disk before rank 0 renames the folder into place
        if d.is_main:  # the size of every file, for the resume-time check (train.checkpoint.checkpoint_problem)
            write_manifest(tmp, step)
    if d.is_main and keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            remove_tree_atomic(old)
    barrier(d)
    return final


def load_sharded_checkpoint(
    checkpoint: Path, *, d: Dist, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, scheduler,
) -> tuple[int, dict[str, Any]]:
    """Load a dcp checkpoint onto `modules` and `optimizer` in whatever layout they have now (sharded on any world
    size, or whole); returns (step, extra). RNG: this rank's own state when the world size is unchanged."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    layout = json.loads((checkpoint / LAYOUT_FILE).read_text())
    holder = _holder(modules)
    missing = sorted(set(layout.get("modules", [])) ^ set(modules))
    if missing:
        raise PosttrainError(f"--resume {checkpoint}: it holds {layout.get('modules')}, this run trains "
                             f"{sorted(modules)}.")
    model_sd, optim_sd = get_state_dict(holder, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(checkpoint / "dcp"))  # in place
    set_state_dict(holder, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    trainer = load_state(checkpoint)
    scheduler.load_state_dict(trainer["scheduler"])
    own = checkpoint / f"rng-rank{d.rank}.pt"
    if layout["world_size"] == d.world_size and own.exists():
        set_rng_state(torch.load(own, weights_only=False))
    else:
        set_rng_state(trainer["rng"])
    return int(trainer["step"]), trainer.get("extra", {})


def save_step(
    output_dir: str | Path, step: int, *, d: Dist, model: nn.Module, tokenizer, optimizer: torch.optim.Optimizer,
    scheduler, extra: dict[str, Any] | None = None, keep_last: int = 2, modules: dict[str, nn.Module] | None = None,
) -> Path:
    """A checkpoint in the layout of `d.parallelism` (call on every rank). model: the trained network itself (the
    Hugging Face model, LoRA-wrapped or not); modules: other trained networks (a critic)."""
    if d.parallelism == "fsdp2":
        return save_sharded_checkpoint(output_dir, step, d=d, modules={"model": model, **(modules or {})},
                                       optimizer=optimizer, scheduler=scheduler, extra=extra, keep_last=keep_last)
    path = checkpoint_dir(output_dir, step)
    if d.is_main:
        path = save_training_checkpoint(output_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                        scheduler=scheduler, extra=extra, keep_last=keep_last, modules=modules)
    barrier(d)
    return path


def resume_step(
    checkpoint: Path, *, d: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
    modules: dict[str, nn.Module] | None = None,
) -> tuple[int, dict[str, Any]]:
    """(step, extra) of `checkpoint`, with model/optimizer/scheduler/RNG restored. An hf checkpoint's weights were
    already loaded by prepare_model; a dcp checkpoint's weights are loaded here."""
    if checkpoint_layout(checkpoint) == "dcp":
        return load_sharded_checkpoint(checkpoint, d=d, modules={"model": model, **(modules or {})},
                                       optimizer=optimizer, scheduler=scheduler)
    return restore_training_state(checkpoint, optimizer, scheduler)


def weights_checkpoint(checkpoint: Path | None) -> Path | None:
    """The checkpoint to read weights from at model load (hf layout), or None (start from the base; dcp loads later)."""
    return checkpoint if checkpoint is not None and checkpoint_layout(checkpoint) == "hf" else None


def export_final(model: nn.Module, tokenizer, path: str | Path, *, d: Dist, rebuild: Callable[[], nn.Module]) -> Path:
    """`final/`: one ordinary Hugging Face folder written by rank 0 (call on every rank). Under fsdp2 the shards are
    gathered and laid into `rebuild()`, a whole copy of the model built on rank 0's CPU."""
    path = Path(path)
    if d.parallelism == "fsdp2":
        full = full_state_dict(model)
        if d.is_main:
            whole = rebuild()
            whole.load_state_dict(full)
            save_final(whole, tokenizer, path)
    elif d.is_main:
        save_final(model, tokenizer, path)
    barrier(d)
    return path
