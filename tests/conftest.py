"""Shared test setup: deterministic, quiet, offline, one torch thread per test process.

`make test` runs two pytest workers on two cores; two torch threads per worker would oversubscribe the cores, and
on a loaded machine that makes small-tensor work 10-100x slower. Subprocesses started by tests inherit the same.

`tests/` goes on sys.path so the shared helper modules here (ports.py) import by name (pytest runs with
--import-mode=importlib, which leaves sys.path alone).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
