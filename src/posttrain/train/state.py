"""Shared plumbing for recipes: model preparation (LoRA, resume), checkpoint save/restore, final export.

Plain arguments only (STYLE.md §8): recipes pass the values they need, never their whole config.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain.files import atomic_dir
from posttrain.models.loading import apply_lora, load_model
from posttrain.train.checkpoint import load_state, save_checkpoint, set_rng_state
from posttrain.train.guards import check_finite_weights


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: str = "float32",
    lora_r: int = 0,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target: str = "all-linear",
    gradient_checkpointing: bool = False,
    checkpoint: Path | None = None,
):
    """(model, tokenizer) ready to train: from `checkpoint` if resuming, with LoRA adapters if lora_r > 0."""
    with phase(f"loading {checkpoint or name_or_path}", enabled=int(os.environ.get("RANK", "0")) == 0):
        return _prepare_model(name_or_path, device=device, dtype=dtype, lora_r=lora_r, lora_alpha=lora_alpha,
                              lora_dropout=lora_dropout, lora_target=lora_target,
                              gradient_checkpointing=gradient_checkpointing, checkpoint=checkpoint)


def _prepare_model(name_or_path: str, *, device: torch.device, dtype: str, lora_r: int, lora_alpha: int,
                   lora_dropout: float, lora_target: str, gradient_checkpointing: bool, checkpoint: Path | None):
    if checkpoint is not None and lora_r == 0 and (checkpoint / "model" / "adapter_config.json").is_file():
        import json

        from posttrain.errors import ConfigError

        rank = json.loads((checkpoint / "model" / "adapter_config.json").read_text()).get("r")
        raise ConfigError(f"{checkpoint} holds LoRA adapters (rank {rank}): resume with the run's own settings, "
                          f"e.g. lora_r={rank} (they are in run_config.json next to checkpoints/).")
    if checkpoint is not None and lora_r > 0:
        from peft import PeftModel

        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(model, checkpoint / "model", is_trainable=True)
    elif checkpoint is not None:
        model, tokenizer = load_model(checkpoint / "model", dtype=dtype, device=device)
    else:
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        if lora_r > 0:
            target = lora_target if lora_target == "all-linear" else [t.strip() for t in lora_target.split(",")]
            model = apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=target)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_r > 0:
            model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    return model.to(device), tokenizer


def save_training_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
    modules: dict[str, nn.Module] | None = None,
) -> Path:
    """Model (HF folder, or the LoRA adapter) + optimizer, scheduler, RNG and `extra` (e.g. data position).

    modules: other trained networks (a critic, a reward head) saved as `<name>.safetensors` via their `save`.
    Refuses (NonFiniteError, nothing written) if any weight is NaN or inf."""
    check_finite_weights([model, *(modules or {}).values()], f"the checkpoint of step {step}")

    def save_model(folder: Path) -> None:
        model.save_pretrained(folder / "model", safe_serialization=True)
        tokenizer.save_pretrained(folder / "model")
        for name, module in (modules or {}).items():
            module.save(folder / f"{name}.safetensors")

    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "extra": extra or {}}
    return save_checkpoint(output_dir, step, save_model=save_model, state=state, keep_last=keep_last)


def restore_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    """Load optimizer, scheduler and RNG states; returns (step, extra)."""
    state = load_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"]), state.get("extra", {})


def save_final(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """An ordinary HF checkpoint loadable by `transformers` alone (LoRA adapters merged into a copy); refused
    (NonFiniteError, nothing written) if any weight is NaN or inf."""
    path = Path(path)
    check_finite_weights([model], str(path))
    with atomic_dir(path) as tmp:
        if hasattr(model, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return path


class Progress:
    """A progress bar with loss and tokens/s on the main process; a plain line every few seconds when not a tty."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.bar = None
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)

    def update(self, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else v)
                                  for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def phase(what: str, *, enabled: bool = True) -> Iterator[None]:
    """Announce a long phase on stderr when it starts and say how long it took when it ends, so a run never sits
    silent (model loading, reference log-probs, held-out evaluation)."""
    if not enabled:
        yield
        return
    print(f"[posttrain] {what} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"[posttrain] {what}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def announced(what: str):
    """Decorator: the function runs inside `phase(what)` on the main process (rank 0)."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(what, enabled=int(os.environ.get("RANK", "0")) == 0):
                return fn(*args, **kwargs)
        return inner
    return wrap


def remove_tree(path: str | Path) -> None:
    """Delete a folder and everything in it (missing is fine)."""
    shutil.rmtree(path, ignore_errors=True)
