"""tests/parallel's helpers (parallel_jobs) import by name, here and in the torchrun worker (pytest runs with
--import-mode=importlib, which leaves sys.path alone)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
