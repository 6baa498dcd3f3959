"""Run every side-by-side benchmark in turn (`make bench`); each writes its own file under bench/results/.

Benchmarks compare posttrain with its peer in one run on this machine and report ratios; they are not tests, and
their absolute numbers move with the machine's load (run them on a quiet machine).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_sft.py", "bench_dpo.py", "bench_grpo.py", "bench_power.py", "bench_diffusion.py"]


def main() -> int:
    only = set(sys.argv[1:])
    failed = []
    for name in BENCHES:
        if only and name.removeprefix("bench_").removesuffix(".py") not in only:
            continue
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
