"""Step time a policy loss adds: every preset of POLICY_LOSSES against GRPO's, on the same per-token tensors.

    python bench/bench_policy_losses.py [--rows 32] [--tokens 256] [--reps 200] [--threads 1]

The loss is the only part of a GRPO step that changes with `loss=`; sampling, the forward and the backward through
the model are the same. So this times loss + backward to the log-probs (a leaf [rows, tokens] tensor, ragged
mask, sample-level advantages, KL term on) per preset, interleaved with GRPO's in the same process (median of
`reps`), and compares the difference with a whole step of the GRPO experiment on this machine
(experiments/policy_losses: tens of seconds). Writes bench/results/policy_losses.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    from posttrain.losses.policy import POLICY_LOSSES, GlobalCounts

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    B, T, G = a.rows, a.tokens, 8
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    base = -torch.rand(B, T, generator=g) * 3
    old = base + 0.05 * torch.randn(B, T, generator=g)
    ref = base + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    counts = GlobalCounts.from_mask(mask, G)
    names = [n for n in POLICY_LOSSES if n != "ppo"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.reps):
        for name in names:
            logps = base.clone().requires_grad_()
            t0 = time.perf_counter()
            out = POLICY_LOSSES[name](logps, old, adv, mask, counts=counts, group_size=G, max_length=T,
                                      ref_logps=ref, kl_coef=0.04)
            out.loss.backward()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1e6 for n, v in times.items()}
    step_s = None
    results_file = HERE.parent / "experiments" / "policy_losses" / "results.json"
    if results_file.exists():
        runs = json.loads(results_file.read_text())["runs"].values()
        grpo_updates = [r["seconds_per_update"] for r in runs if r["loss"] == "grpo"]
        step_s = statistics.median(grpo_updates) if grpo_updates else None
    rows = [{"loss": n, "microseconds": med[n], "vs_grpo_us": med[n] - med["grpo"],
             "vs_grpo_ratio": med[n] / med["grpo"],
             "share_of_grpo_update": (med[n] - med["grpo"]) * 1e-6 / step_s if step_s else None} for n in names]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"rows": B, "tokens": T, "reps": a.reps, "threads": a.threads, "torch": torch.__version__,
            "grpo_update_seconds": step_s, "date": time.strftime("%Y-%m-%d")}
    (out / "policy_losses.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Step time added by each policy loss over GRPO's\n",
             f"Command: `python bench/bench_policy_losses.py --rows {B} --tokens {T} --reps {a.reps} --threads "
             f"{a.threads}`. Loss + backward to the log-probs on [{B}, {T}] tensors (ragged mask, KL term on), median "
             f"of {a.reps} interleaved repetitions, torch {torch.__version__} (CPU), {meta['date']}. "
             + (f"A GRPO update (forward + backward of the 135M model, μ = 2) took {step_s:.1f} s in "
                "experiments/policy_losses on this machine." if step_s else "") + "\n",
             "| loss | µs per loss + backward | difference to grpo (µs) | ratio to grpo | share of a GRPO update |",
             "|---|---|---|---|---|"]
    for r in rows:
        share = f"{r['share_of_grpo_update']:.1e}" if r["share_of_grpo_update"] is not None else "n/a"
        lines.append(f"| {r['loss']} | {r['microseconds']:.0f} | {r['vs_grpo_us']:+.0f} | {r['vs_grpo_ratio']:.2f} | "
                     f"{share} |")
    (out / "policy_losses.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
