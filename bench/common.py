"""Shared by the benchmarks: a model name every side can load from a folder (TRL needs a path)."""

from __future__ import annotations

from pathlib import Path


def model_folder(name: str, tmp: Path) -> str:
    """The embedded default resolves to its cached folder; a tiny spec is saved once to `tmp` so peers can load it."""
    if not name.startswith("tiny"):
        return name
    from posttrain.models import load_model

    model, tokenizer = load_model(name)
    model.save_pretrained(tmp / "tiny")
    tokenizer.save_pretrained(tmp / "tiny")
    return str(tmp / "tiny")
