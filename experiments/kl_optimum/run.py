"""Do the project's losses reach the KL-regularised optimum π* ∝ π_ref·exp(r/β)? (DPO Eq. 4, on a 6-armed bandit)

For each β and seed: policy gradient (clipped surrogate at ρ = 1, Dr. GRPO advantages) with the KL in the reward
(k1), as a k2 loss term, as a k3 loss term (GRPO's choice), and DPO on a finite set of Bradley–Terry preferences;
plus the two deterministic routes (exact expectation). Reports total variation to π* and to the forward-KL optimum
(mean ± std over seeds). Rerun: `python experiments/kl_optimum/run.py` (about a minute on one core).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from posttrain.eval.kl_optimum import (
    BanditProblem,
    forward_kl_optimum,
    total_variation,
    train_dpo,
    train_policy_gradient,
)

HERE = Path(__file__).parent


def main() -> None:
    cfg = yaml.safe_load((HERE / "config.yaml").read_text())
    common = {"steps": cfg["steps"], "lr": cfg["lr"], "average_last": cfg["average_last"]}
    methods = {
        "PG, KL in the reward (k1), exact expectation": lambda p, s: train_policy_gradient(
            p, kl="reward", samples=None, **common),
        "DPO, exact Bradley-Terry expectation": lambda p, s: train_dpo(p, **common),
        "PG, KL in the reward (k1), sampled": lambda p, s: train_policy_gradient(
            p, kl="reward", samples=cfg["samples_per_step"], seed=s, **common),
        "PG, k2 loss term, sampled": lambda p, s: train_policy_gradient(
            p, kl="k2", samples=cfg["samples_per_step"], seed=s, **common),
        "PG, k3 loss term (GRPO), sampled": lambda p, s: train_policy_gradient(
            p, kl="k3", samples=cfg["samples_per_step"], seed=s, **common),
        f"DPO, {cfg['dpo_pairs']} sampled BT pairs": lambda p, s: train_dpo(
            p, pairs=cfg["dpo_pairs"], seed=s, **common),
    }
    results = []
    for beta in cfg["betas"]:
        problem = BanditProblem(np.array(cfg["ref_probs"]), np.array(cfg["rewards"]), float(beta))
        star = problem.optimum()
        forward = forward_kl_optimum(problem.ref_probs, problem.rewards, problem.beta)
        for name, train in methods.items():
            seeds = cfg["seeds"] if "sampled" in name else cfg["seeds"][:1]
            tv_star, tv_fwd = [], []
            for seed in seeds:
                pi = train(problem, seed)
                tv_star.append(total_variation(pi, star))
                tv_fwd.append(total_variation(pi, forward))
            row = {"beta": beta, "method": name, "n_seeds": len(seeds),
                   "tv_to_pi_star_mean": float(np.mean(tv_star)), "tv_to_pi_star_std": float(np.std(tv_star)),
                   "tv_to_forward_kl_optimum_mean": float(np.mean(tv_fwd)),
                   "tv_pi_star_vs_forward": total_variation(star, forward)}
            results.append(row)
            print(f"β={beta:<5} {name:<48} TV(π, π*) = {row['tv_to_pi_star_mean']:.4f} ± "
                  f"{row['tv_to_pi_star_std']:.4f}   TV(π, fwd-KL opt) = {row['tv_to_forward_kl_optimum_mean']:.4f}")
    (HERE / "results.json").write_text(json.dumps({"config": cfg, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
