"""Fused chunked LM-head log-probs (posttrain.ops.logps.logps_from_hidden) vs the plain path, side by side.

    python bench/bench_logps.py [--batch 1 4] [--seq 2048] [--vocab 49152] [--dim 576] [--rounds 3] [--threads 2]

Plain path: logits = h Wᵀ (one GEMM, float32), log_softmax over V, gather the labels; autograd does the rest.
Fused path: logps_from_hidden(h, W, labels) with the default chunk. Both compute the forward and the backward of
Σ_t g_t log p(y_t) with a random upstream g, for the hidden states and, in the "trained head" mode, for W too (full
fine-tuning of a tied or untied head; "frozen head" is LoRA or a frozen output layer).

Each measurement runs in a fresh subprocess (sides alternate, `rounds` times): time = the median of `passes` timed
forward+backward passes after one warm-up, as wall-clock and as the process's CPU time (on a shared machine the
wall time includes waiting for a core); extra memory = peak RSS during them minus the RSS before the first pass
(h, W and labels already allocated). Ratios are fused / plain of the medians over rounds, and of the fastest
passes. Writes bench/results/logps.json and logps.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def measure(side: str, batch: int, seq: int, vocab: int, dim: int, head_grad: bool, threads: int,
            passes: int = 2) -> dict:
    """One side in this process: median seconds of forward+backward and the extra peak memory (MB)."""
    import resource

    import torch

    from posttrain.ops.logps import logps_from_hidden

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(batch, seq, dim, generator=g) / 8).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / 8).requires_grad_(head_grad)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    upstream = torch.randn(batch, seq, generator=g)

    def step() -> None:
        if side == "plain":
            logps = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
        else:
            logps = logps_from_hidden(hidden, weight, labels)
        (logps * upstream).sum().backward()
        hidden.grad = None
        weight.grad = None

    base = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()  # warm-up (allocator, first-touch pages)
    times, cpu_times = [], []
    for _ in range(passes):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times), "times": times,
            "cpu_times": cpu_times, "extra_mb": max(peak, peak_before) - base}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=2, help="timed passes per subprocess (after one warm-up)")
    p.add_argument("--modes", nargs="*", default=["frozen", "trained"])
    p.add_argument("--child", nargs="*", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    if a.child:
        side, batch, head_grad = a.child[0], int(a.child[1]), a.child[2] == "trained"
        print(json.dumps(measure(side, batch, a.seq, a.vocab, a.dim, head_grad, a.threads, a.passes)))
        return
    rows = []
    for mode in a.modes:
        for batch in a.batch:
            runs: dict[str, list[dict]] = {"plain": [], "fused": []}
            for _ in range(a.rounds):
                for side in ("plain", "fused"):
                    cmd = [sys.executable, __file__, "--child", side, str(batch), mode, "--seq", str(a.seq),
                           "--vocab", str(a.vocab), "--dim", str(a.dim), "--threads", str(a.threads),
                           "--passes", str(a.passes)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {side: {k: statistics.median(r[k] for r in runs[side]) for k in ("seconds", "cpu_seconds", "extra_mb")}
                   for side in runs}
            for side, side_runs in runs.items():  # the fastest pass: the least disturbed by other processes
                med[side]["min_seconds"] = min(t for r in side_runs for t in r["times"])
                med[side]["min_cpu_seconds"] = min(t for r in side_runs for t in r["cpu_times"])
            row = {"mode": mode, "batch": batch, "plain": med["plain"], "fused": med["fused"],
                   "time_ratio": med["fused"]["seconds"] / med["plain"]["seconds"],
                   "cpu_time_ratio": med["fused"]["cpu_seconds"] / med["plain"]["cpu_seconds"],
                   "min_time_ratio": med["fused"]["min_seconds"] / med["plain"]["min_seconds"],
                   "min_cpu_time_ratio": med["fused"]["min_cpu_seconds"] / med["plain"]["min_cpu_seconds"],
                   "memory_ratio": med["fused"]["extra_mb"] / med["plain"]["extra_mb"], "raw": runs}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "raw"}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"seq": a.seq, "vocab": a.vocab, "dim": a.dim, "rounds": a.rounds, "threads": a.threads,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "logps.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Fused chunked log-probs vs plain log_softmax + gather (forward + backward)\n",
             (f"Command: `python bench/bench_logps.py --rounds {a.rounds} --passes {a.passes} --threads {a.threads}` "
              f"(raw numbers in `logps.json`). T = {a.seq}, V = {a.vocab}, D = {a.dim}, float32, {a.threads} torch "
              f"thread(s), torch {torch.__version__} (CPU), {meta['date']}. Per side and row: {a.rounds} fresh "
              f"subprocesses (sides alternating), each timing {a.passes} forward + backward pass(es) after a warm-up. "
              "Wall = elapsed seconds, CPU = the process's CPU seconds (on a machine shared with other jobs the wall "
              "time also counts the time this process waited for a core, CPU time does not); med = median over "
              "subprocesses of each one's median pass, min = the fastest pass of all. Extra memory = peak RSS minus "
              "RSS with the inputs allocated (median). Ratios are fused / plain.\n"),
             ("| head | B | plain wall s (med / min) | fused wall s (med / min) | wall ratio med / min | "
              "plain CPU s (med / min) | fused CPU s (med / min) | CPU ratio med / min | plain extra MB | "
              "fused extra MB | memory ratio |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pl, fu = r["plain"], r["fused"]
        lines.append(f"| {r['mode']} | {r['batch']} | {pl['seconds']:.2f} / {pl['min_seconds']:.2f} | "
                     f"{fu['seconds']:.2f} / {fu['min_seconds']:.2f} | **{r['time_ratio']:.2f}x** / "
                     f"{r['min_time_ratio']:.2f}x | {pl['cpu_seconds']:.2f} / {pl['min_cpu_seconds']:.2f} | "
                     f"{fu['cpu_seconds']:.2f} / {fu['min_cpu_seconds']:.2f} | **{r['cpu_time_ratio']:.2f}x** / "
                     f"{r['min_cpu_time_ratio']:.2f}x | {pl['extra_mb']:.0f} | {fu['extra_mb']:.0f} | "
                     f"**{r['memory_ratio']:.3f}** |")
    (out / "logps.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
