"""Shared bits of the robustness tests (the `rb` fixture): a small SFT data file, in-process CLI runs, weights."""

from __future__ import annotations

import json
import types
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


@pytest.fixture
def rb():
    """The helpers above, as one namespace (the suite imports test modules without adding their folder to
    sys.path, so they cannot import a helper module)."""
    return types.SimpleNamespace(sft_data=sft_data, sft=sft, weights=weights, same_weights=same_weights,
                                 sft_common=SFT_COMMON)
