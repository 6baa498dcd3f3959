"""Step time a policy loss adds: every preset of POLICY_LOSSES against GRPO's, alone and inside a training step.

    python bench/bench_policy_losses.py [--rows 32] [--tokens 256] [--reps 200] [--step-reps 7] [--threads 1]

The loss is the only part of a GRPO step that changes with `loss=`; sampling, the forward and the backward through
the model are the same. Two measurements, every preset interleaved with GRPO's in the same process:

1. loss alone: loss + backward to the log-probs (a leaf [rows, tokens] tensor, ragged mask, sample-level
   advantages, KL term on), `reps` repetitions;
2. in a step: the policy update of one micro-batch of the same shape through a random model with SmolLM2-135M's
   vocabulary and head width (V = 49152, D = 576, 2 layers): forward through the fused log-prob path, the loss,
   backward into the model, `step-reps` repetitions, each in a fresh random order of the losses, timed as this
   process's CPU seconds (with 1 thread the least disturbed measure on a machine shared with other jobs).

Each repetition runs every preset once, so the difference to GRPO is paired per repetition; reported: the median
of the paired differences with a bootstrap 95% interval, and that difference as a share of the step. "No measurable
step time" = the step's interval contains 0, or the difference is < 1% of the step. Writes
bench/results/policy_losses.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def paired(times: dict[str, list[float]], base: str = "grpo", seed: int = 0) -> dict[str, dict]:
    """Per loss: median seconds, median of the paired differences to `base` and its bootstrap 95% interval."""
    rng = random.Random(seed)
    out = {}
    for name, ts in times.items():
        diffs = [a - b for a, b in zip(ts, times[base])]
        boots = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
        out[name] = {"median_s": statistics.median(ts), "diff_s": statistics.median(diffs),
                     "diff_low_s": boots[49], "diff_high_s": boots[1949]}
    return out


def loss_alone(names, B: int, T: int, reps: int) -> dict[str, list[float]]:
    """Seconds of loss + backward to a leaf log-prob tensor, per preset, interleaved."""
    from posttrain.losses.policy import POLICY_LOSSES, GlobalCounts

    g = torch.Generator().manual_seed(0)
    G = 8
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    base = -torch.rand(B, T, generator=g) * 3
    old = base + 0.05 * torch.randn(B, T, generator=g)
    ref = base + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    counts = GlobalCounts.from_mask(mask, G)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        for name in names:
            logps = base.clone().requires_grad_()
            t0 = time.perf_counter()
            out = POLICY_LOSSES[name](logps, old, adv, mask, counts=counts, group_size=G, max_length=T,
                                      ref_logps=ref, kl_coef=0.04)
            out.loss.backward()
            times[name].append(time.perf_counter() - t0)
    return times


def in_step(names, B: int, T: int, reps: int) -> dict[str, list[float]]:
    """Seconds of forward (fused log-probs) + loss + backward into a random model, per preset, interleaved."""
    from posttrain.losses.policy import POLICY_LOSSES, GlobalCounts
    from posttrain.models.forward import TokenLogps
    from posttrain.models.tiny import tiny_model

    model = tiny_model(seed=0, vocab_size=49152, hidden_size=576, num_layers=2)
    fn = TokenLogps(model)
    g = torch.Generator().manual_seed(1)
    G = 8
    ids = torch.randint(0, 49152, (B, T), generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    labels = torch.where(mask, torch.roll(ids, -1, 1), torch.full_like(ids, -100))
    with torch.no_grad():
        base = fn(ids, labels).logps
    old = base + 0.05 * torch.randn(B, T, generator=g)
    ref = base + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    counts = GlobalCounts.from_mask(mask, G)
    times: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    for _ in range(reps + 1):  # the first round warms up
        for name in order.sample(names, len(names)):  # a fresh order each round: no loss always runs first
            model.zero_grad(set_to_none=True)
            t0 = time.process_time()
            logps = fn(ids, labels).logps
            out = POLICY_LOSSES[name](logps, old, adv, mask, counts=counts, group_size=G, max_length=T,
                                      ref_logps=ref, kl_coef=0.04)
            out.loss.backward()
            times[name].append(time.process_time() - t0)
    return {n: ts[1:] for n, ts in times.items()}


def main() -> None:
    from posttrain.losses.policy import POLICY_LOSSES

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--step-rows", type=int, default=8)
    p.add_argument("--step-tokens", type=int, default=64)
    p.add_argument("--step-reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    names = [n for n in POLICY_LOSSES if n != "ppo"]
    alone = paired(loss_alone(names, a.rows, a.tokens, a.reps))
    step = paired(in_step(names, a.step_rows, a.step_tokens, a.step_reps))
    rows = []
    for n in names:
        s, st = alone[n], step[n]
        rows.append({"loss": n, "alone_us": s["median_s"] * 1e6, "alone_diff_us": s["diff_s"] * 1e6,
                     "alone_diff_ci_us": [s["diff_low_s"] * 1e6, s["diff_high_s"] * 1e6],
                     "step_s": st["median_s"], "step_diff_ms": st["diff_s"] * 1e3,
                     "step_diff_ci_ms": [st["diff_low_s"] * 1e3, st["diff_high_s"] * 1e3],
                     "step_share": st["diff_s"] / step["grpo"]["median_s"],
                     "alone_share_of_step": s["diff_s"] / step["grpo"]["median_s"]})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"rows": a.rows, "tokens": a.tokens, "reps": a.reps, "step_rows": a.step_rows,
            "step_tokens": a.step_tokens, "step_reps": a.step_reps, "threads": a.threads,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    (out / "policy_losses.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    grpo_step = step["grpo"]["median_s"]
    lines = ["# Step time added by each policy loss over GRPO's\n",
             (f"Command: `python bench/bench_policy_losses.py --rows {a.rows} --tokens {a.tokens} --reps {a.reps} "
              f"--step-rows {a.step_rows} --step-tokens {a.step_tokens} --step-reps {a.step_reps} --threads "
              f"{a.threads}`, torch {torch.__version__} (CPU), {meta['date']}. *Alone*: loss + backward to the "
              f"log-probs on [{a.rows}, {a.tokens}] tensors (ragged mask, KL term on), {a.reps} repetitions. *In a "
              f"step*: forward through a random 2-layer model with SmolLM2's vocabulary and width (V = 49152, "
              f"D = 576) on [{a.step_rows}, {a.step_tokens}] tokens, the loss, backward into the model, "
              f"{a.step_reps} repetitions in a fresh random order, CPU seconds (GRPO's: {grpo_step:.2f} s). Every "
              "repetition runs every loss once, so "
              "differences to GRPO are paired; shown: the median paired difference [bootstrap 95% interval].\n"),
             "| loss | alone µs | alone − grpo µs | in a step s | step − grpo ms | share of the step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["alone_diff_ci_us"]
        slo, shi = r["step_diff_ci_ms"]
        lines.append(f"| {r['loss']} | {r['alone_us']:.0f} | {r['alone_diff_us']:+.0f} [{lo:+.0f}, {hi:+.0f}] | "
                     f"{r['step_s']:.3f} | {r['step_diff_ms']:+.1f} [{slo:+.1f}, {shi:+.1f}] | "
                     f"{r['step_share']:+.2%} |")
    others = [r for r in rows if r["loss"] != "grpo"]
    slowest = max(others, key=lambda r: r["alone_diff_us"])
    inside = [r["loss"] for r in others if r["step_diff_ci_ms"][0] <= 0 <= r["step_diff_ci_ms"][1]]
    lines += ["", (f"Alone, the slowest loss relative to GRPO's is {slowest['loss']} at {slowest['alone_diff_us']:+.0f} µs "
                   f"= {slowest['alone_share_of_step']:+.3%} of this small step (a real step, 135M model and a whole "
                   "rollout batch, is 10-1000x longer). In a step, the paired difference's 95% interval contains 0 "
                   f"for {len(inside)} of {len(others)} losses ({', '.join(inside) or 'none'}).")]
    (out / "policy_losses.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
