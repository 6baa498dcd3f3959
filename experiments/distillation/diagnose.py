"""Is the rise of the held-out reverse KL under on-policy distillation (results.md, first run) a bug or the step size?

    python experiments/distillation/diagnose.py   # needs the experiment's teacher and data (run.py / teacher.py)

1. Sign / scored tokens: on 8 fixed student samples, the full-distribution reverse KL Σ_t KL(q‖p) summed over the
   completion tokens, before and after one small plain gradient step along −∇ (must go down for a small step).
2. Step size: on-policy runs of the recipe (8 prompts × 1 sample per step) at lr 5e-5 (the first run's) and 1e-5,
   held-out reverse KL on 16 prompts every 3 steps. Writes diagnose.json beside this file as it goes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent


def main() -> int:
    c = yaml.safe_load((HERE / "config.yaml").read_text())
    torch.set_num_threads(1)
    root = Path(c["run_root"])
    out_path = HERE / "diagnose.json"
    out: dict = json.loads(out_path.read_text()) if out_path.exists() else {}

    def save() -> None:
        out_path.write_text(json.dumps(out, indent=2) + "\n")

    from posttrain.generation.rollout import rollout_sequences
    from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
    from posttrain.losses.distill import reverse_kl
    from posttrain.models.loading import load_model
    from posttrain.models.teacher import FrozenTeacher, token_divergences

    rows = [json.loads(x) for x in (root / "data" / "train.jsonl").read_text().splitlines()][:8]
    held = root / "data" / "heldout16.jsonl"
    held.write_text("".join((root / "data" / "heldout.jsonl").read_text().splitlines(keepends=True)[:16]))
    if "first_order" not in out:
        teacher_model, tok = load_model(root / "teacher" / "final")
        teacher = FrozenTeacher(teacher_model)
        student, _ = load_model(c["student"])
        gen = HFGenerator(student, tok)
        ro = gen.generate(encode_prompts(tok, [r["prompt"] for r in rows]),
                          SamplingParams(max_new_tokens=c["max_new_tokens"], temperature=1.0, seed=1))
        b = rollout_sequences(ro, tok.pad_token_id)

        def kl_sum():
            return token_divergences(student, teacher, b.input_ids, b.position_ids, b.labels, reverse_kl).sum()

        res = {}
        for eta in (1e-7, 1e-6, 1e-5):
            student.zero_grad()
            before = kl_sum()
            before.backward()
            saved = [p.detach().clone() for p in student.parameters()]
            with torch.no_grad():
                gnorm2 = sum(float((p.grad ** 2).sum()) for p in student.parameters() if p.grad is not None)
                for p in student.parameters():
                    if p.grad is not None:
                        p -= eta * p.grad
                after = float(kl_sum())
                for p, s in zip(student.parameters(), saved):
                    p.copy_(s)
            res[str(eta)] = {"before": float(before.detach()), "after": after, "predicted_drop": eta * gnorm2, "grad_norm": gnorm2 ** 0.5,
                             "tokens": int(b.mask.sum())}
            print("first order", eta, res[str(eta)], flush=True)
        out["first_order"] = res
        save()
        del student, teacher, teacher_model

    from posttrain.recipes.distill import DistillConfig, run
    from posttrain.train.logging import read_metrics

    for lr in (5e-5, 1e-5):
        key = f"on_policy_lr{lr:g}"
        if key in out:
            continue
        d = root / "diagnose" / key
        run(DistillConfig(model=c["student"], teacher=str(root / "teacher" / "final"),
                          train_file=str(root / "data" / "train.jsonl"), eval_file=str(held), rewards=[],
                          mode="on_policy", divergence="reverse_kl", estimator="full", prompts_per_step=8,
                          num_generations=1, micro_batch_size=8, max_steps=6, eval_steps=3, lr=lr, warmup_steps=2,
                          max_new_tokens=c["max_new_tokens"], seed=0, output_dir=str(d), tensorboard=False,
                          progress=False, keep_last=1, overwrite=True))
        out[key] = [{k: r[k] for k in r if k in ("step", "divergence", "grad_norm", "eval/reverse_kl_seq",
                                                  "eval/reverse_kl_seq_se", "eval/reverse_kl_token")}
                    for r in read_metrics(d / "metrics.jsonl")]
        print(key, out[key], flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
