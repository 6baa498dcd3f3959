"""Strong-to-weak distillation on reasoning-gym chain_sum: SFT on gold vs off-policy sequence distillation vs on-policy
reverse-KL distillation vs GRPO, for a layer-dropped SmolLM2 student, at (about) equal student training FLOPs.

    python experiments/distillation/run.py                 # every stage not done yet, then the report
    python experiments/distillation/run.py --method gold   # one method (to run two at once); --report: report only

Stages: the teacher (teacher.py: the embedded SmolLM2 after a short SFT on the task), the shared data files, each
method's run (posttrain distill / posttrain grpo with eval at a few steps), the final reverse KL of the GRPO student,
and results.json / results.md / curves.png. FLOPs: 2·N per token forwarded, 6·N per token trained (N = the student's
parameters); the distill recipe logs them, GRPO's are computed here from its logged lengths (shared-prefix update).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from teacher import main as teacher_main
from teacher import rows as task_rows

from posttrain.demo import worked_answer
from posttrain.train.checkpoint import atomic_write_text
from posttrain.train.logging import read_metrics

METHODS = ("gold", "sequence", "on_policy", "grpo", "sequence_then_on_policy")
LABELS = {"gold": "(a) SFT on gold", "sequence": "(b) off-policy sequence distillation",
          "on_policy": "(c) on-policy reverse KL", "grpo": "(d) GRPO with the verifier",
          "sequence_then_on_policy": "(e) (b) then on-policy reverse KL"}


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Task rows with their gold worked answer as `completion` (a prompt file for every recipe)."""
    atomic_write_text(path, "".join(json.dumps({**r, "completion": [
        {"role": "assistant", "content": worked_answer(r)}]}) + "\n" for r in rows))
    return path


def write_data(c: dict, root: Path) -> tuple[Path, Path]:
    train, held = root / "data" / "train.jsonl", root / "data" / "heldout.jsonl"
    if not train.exists():
        write_rows(train, task_rows(c, c["train_problems"], c["teacher_seed"]))
        write_rows(held, task_rows(c, c["eval_problems"], c["eval_seed"]))
    return train, held


def common(c: dict, root: Path, train: Path, held: Path) -> dict:
    return dict(model=c["student"], train_file=str(train), eval_file=str(held), rewards=["gym"],
                reward_options={"gym": {"extract": "final_line"}}, max_new_tokens=c["max_new_tokens"], lr=c["lr"],
                warmup_steps=c["warmup_steps"], seed=c["seed"], tensorboard=False, progress=False, keep_last=1)


def run_method(name: str, c: dict, root: Path) -> None:
    out = root / name
    if (out / "final" / "config.json").exists():
        print(f"{name}: done already")
        return
    train, held = write_data(c, root)
    teacher = str(root / "teacher" / "final")
    base = {**common(c, root, train, held), **c["methods"][name]}  # a method's own keys (lr, ...) win
    init_from = base.pop("init_from", None)
    if init_from is not None:  # continue from another method's final student
        base["model"] = str(root / init_from / "final")
    if name == "grpo":
        from posttrain.recipes.grpo import GRPOConfig, run

        run(GRPOConfig(**base, output_dir=str(out), loss="grpo", eval_size=c["eval_problems"]))
        return
    from posttrain.recipes.distill import DistillConfig, run

    # every method starts from the same student: its step-0 evaluation is done once, in the report
    run(DistillConfig(**base, teacher=teacher, output_dir=str(out), eval_size=c["eval_problems"], eval_start=False))


def student_params(path: str) -> int:
    from posttrain.models.loading import load_model

    model, _ = load_model(path)
    return sum(p.numel() for p in model.parameters())


def grpo_flops(metrics: Path, prompts: Path, model: str, B: int, G: int, n_params: int) -> dict[int, float]:
    """Cumulative student FLOPs of a GRPO run after each logged step, from its logged lengths: sampling 2N·(B·P + B·G·L)
    (prompts encoded once per group), update 6N·(S/G·P + S·L) on the S sequences of the kept groups."""
    from posttrain.generation.sampler import encode_prompts
    from posttrain.models.loading import load_tokenizer

    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    P = sum(len(p) for p in encode_prompts(load_tokenizer(model), [r["prompt"] for r in rows])) / len(rows)
    flops, out = 0.0, {}
    for r in read_metrics(metrics):
        if "completion/mean_length" in r:
            L = r["completion/mean_length"]
            S = r.get("update/sequences", 0.0)
            flops += 2 * n_params * (B * P + B * G * L) + 6 * n_params * (S / G * P + S * L)
            out[r["step"]] = flops
    return out


def grpo_curve(c: dict, root: Path, n_params: int) -> list[dict]:
    """GRPO's eval points with cumulative student FLOPs from its logged lengths."""
    m = c["methods"]["grpo"]
    flops = grpo_flops(root / "grpo" / "metrics.jsonl", root / "data" / "train.jsonl", c["student"],
                       m["prompts_per_step"], m["num_generations"], n_params)
    return [{"step": r["step"], "flops": flops.get(r["step"], 0.0), "accuracy": r["eval/accuracy"]}
            for r in read_metrics(root / "grpo" / "metrics.jsonl") if "eval/accuracy" in r]


def report(c: dict, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.eval.distill import evaluate_student
    from posttrain.models.loading import load_model
    from posttrain.models.teacher import FrozenTeacher
    from posttrain.rewards import build_reward

    held = [json.loads(line) for line in (root / "data" / "heldout.jsonl").read_text().splitlines()]
    teacher_model, tok = load_model(root / "teacher" / "final")
    teacher = FrozenTeacher(teacher_model)
    reward = build_reward("gym", extract="final_line")
    cache = root / "extra_evals.json"
    extra = json.loads(cache.read_text()) if cache.exists() else {}
    if "teacher" not in extra:
        extra["teacher"] = evaluate_student(teacher.model, teacher, tok, held, reward, max_new_tokens=c["max_new_tokens"],
                                            seed=c["seed"] + 10_000)
    if "student_init" not in extra:
        student, _ = load_model(c["student"])
        extra["student_init"] = evaluate_student(student, teacher, tok, held, reward,
                                                 max_new_tokens=c["max_new_tokens"], seed=c["seed"] + 10_000)
    if (root / "grpo" / "final").exists() and "grpo_final" not in extra:
        student, _ = load_model(root / "grpo" / "final")
        extra["grpo_final"] = evaluate_student(student, teacher, tok, held, reward, max_new_tokens=c["max_new_tokens"],
                                               seed=c["seed"] + 10_000)
    atomic_write_text(cache, json.dumps(extra, indent=2))
    n_params = student_params(c["student"])
    curves: dict[str, list[dict]] = {}
    for name in METHODS:
        metrics = root / name / "metrics.jsonl"
        if not metrics.exists():
            continue
        if name == "grpo":
            pts = grpo_curve(c, root, n_params)
            n = len(held)
            for p in pts:
                p["accuracy_se"] = math.sqrt(p["accuracy"] * (1 - p["accuracy"]) / n)
            if pts and "grpo_final" in extra:
                pts[-1].update({k.split("/")[1]: v for k, v in extra["grpo_final"].items()})
            # GRPO's first eval is the same student as every other method's step 0
            curves[name] = pts
            continue
        init_from = c["methods"][name].get("init_from")
        if init_from is not None:  # starts where init_from's curve ends, its FLOPs included
            if init_from not in curves or not curves[init_from]:
                continue
            start = dict(curves[init_from][-1])
        else:
            start = {"step": 0, "flops": 0.0, "teacher_flops": 0.0,
                     **{k.split("/")[1]: v for k, v in extra["student_init"].items()}}
        curves[name] = [start] + [{"step": r["step"], "flops": start["flops"] + r["flops/student"],
                                   "teacher_flops": start.get("teacher_flops", 0.0) + r["flops/teacher"],
                                   **{k.split("/")[1]: v for k, v in r.items() if k.startswith("eval/")}}
                                  for r in read_metrics(metrics) if "eval/accuracy" in r]
    training = {name: [{"step": r["step"], "flops": r["flops/student"], "divergence": r["divergence"],
                        "on_policy": r["on_policy"], "seconds": r.get("time/step")}
                       for r in read_metrics(root / name / "metrics.jsonl") if "divergence" in r]
                for name in curves if name != "grpo"}
    results = {"config": c, "student_parameters": n_params, "teacher": extra["teacher"],
               "student_init": extra["student_init"], "grpo_final": extra.get("grpo_final"), "curves": curves,
               "training": training}
    atomic_write_text(HERE / "results.json", json.dumps(results, indent=2) + "\n")

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, pts in curves.items():
        x = [p["flops"] / 1e12 for p in pts]
        acc = [p["accuracy"] for p in pts]
        ci = [wilson(round(v * len(held)), len(held)) for v in acc]  # Wilson 95% intervals
        a.errorbar(x, acc, yerr=[[v - lo for v, (lo, _) in zip(acc, ci)], [hi - v for v, (_, hi) in zip(acc, ci)]],
                   marker="o", capsize=3, label=LABELS[name])
        kl = [(p["flops"] / 1e12, p["reverse_kl_seq"], p.get("reverse_kl_seq_se", 0)) for p in pts if "reverse_kl_seq" in p]
        if kl:
            b.errorbar([k[0] for k in kl], [k[1] for k in kl], yerr=[k[2] for k in kl], marker="o", capsize=3,
                       label=LABELS[name])
    a.axhline(extra["teacher"]["eval/accuracy"], color="k", ls="--", label="teacher")
    a.set(xlabel="student training TFLOPs", ylabel=f"held-out accuracy (n={len(held)}, greedy, Wilson 95%)")
    b.set(xlabel="student training TFLOPs", ylabel="reverse KL(student ‖ teacher) per answer (± SE)", yscale="log")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=110)
    plt.close(fig)
    write_markdown(results, len(held))
    print(json.dumps({k: v[-1] if v else None for k, v in curves.items()}, indent=1))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for z = 1.96)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def write_markdown(results: dict, n_held: int) -> None:
    """The tables of results.md (the findings paragraph below the marker is kept across reruns)."""
    def cell(p: dict, key: str, fmt: str) -> str:
        if p.get(key) is None or p[key] != p[key]:
            return "–"
        se = p.get(f"{key}_se")
        return f"{p[key]:{fmt}} ± {se:{fmt}}" if se is not None and not math.isnan(se) else f"{p[key]:{fmt}}"

    def acc_cell(p: dict) -> str:
        """k/n and the Wilson 95% interval of the greedy accuracy."""
        a = p.get("accuracy", p.get("eval/accuracy"))
        if a is None or math.isnan(a):
            return "–"
        k = round(a * n_held)
        lo, hi = wilson(k, n_held)
        return f"{k}/{n_held} = {a:.3f} [{lo:.3f}, {hi:.3f}]"

    c = results["config"]
    lines = [
        "# Strong-to-weak distillation on chain_sum: SFT vs off-policy vs on-policy distillation vs GRPO", "",
        "Rerun: `python experiments/distillation/run.py` (config: `config.yaml`; the teacher comes from "
        "`teacher.py`). Numbers below are from `results.json`.", "",
        f"- Teacher: `{c['model']}` after SFT on {c['teacher']['train_problems']} problems "
        f"({c['teacher']['epochs']} epoch, lr {c['teacher']['lr']}).",
        f"- Student: `{c['student']}` ({results['student_parameters'] / 1e6:.1f} M parameters), full fine-tuning, "
        f"AdamW lr {c['lr']} unless the method sets its own ({ {k: m['lr'] for k, m in c['methods'].items() if 'lr' in m} }), "
        f"{c['warmup_steps']} warmup steps, constant.",
        f"- Task: reasoning-gym `{c['task']}` {c['task_kwargs']}, {c['train_problems']} training prompts, "
        f"{n_held} held-out problems (seed {c['eval_seed']}), answers ≤ {c['max_new_tokens']} tokens.",
        "- Accuracy: greedy, the task's scorer on a strict last line `Answer: <n>`; k/n with the Wilson 95% interval.",
        "- Reverse KL: Σ_t KL(q(·|y<t) ‖ p(·|y<t)) over one temperature-1 student sample per held-out prompt (nats per "
        "answer), mean ± standard error over prompts; per token: the same summed over all answers / their tokens.",
        "- FLOPs: 2·N per token forwarded without gradient, 6·N per token trained (N = student parameters); teacher "
        "FLOPs separately (its SFT not counted). Evaluation not counted.", "",
        "| model | student TFLOPs | teacher TFLOPs | held-out accuracy | reverse KL / answer | reverse KL / token |",
        "|---|---|---|---|---|---|",
        f"| teacher | – | – | {acc_cell(results['teacher'])} | 0 | 0 |",
        f"| student before training | 0 | 0 | {acc_cell(results['student_init'])} | "
        f"{cell(results['student_init'], 'eval/reverse_kl_seq', '.2f')} | "
        f"{cell(results['student_init'], 'eval/reverse_kl_token', '.3f')} |",
    ]
    for name, pts in results["curves"].items():
        for p in pts[1:]:  # every evaluation after the start (the start is the row above, or init_from's end)
            lines.append(f"| {LABELS[name]} (step {p['step']}) | {p['flops'] / 1e12:.2f} | "
                         f"{p.get('teacher_flops', 0.0) / 1e12:.2f} | {acc_cell(p)} | "
                         f"{cell(p, 'reverse_kl_seq', '.2f')} | {cell(p, 'reverse_kl_token', '.3f')} |")
    lines += ["", "![curves](curves.png)", "", "<!-- findings -->"]
    path = HERE / "results.md"
    findings = path.read_text().split("<!-- findings -->", 1)[1] if path.exists() and "<!-- findings -->" in \
        path.read_text() else "\n"
    atomic_write_text(path, "\n".join(lines) + findings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(HERE / "config.yaml"))
    parser.add_argument("--method", choices=METHODS, action="append")
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    args = parser.parse_args(argv)
    c = yaml.safe_load(Path(args.config).read_text())
    torch.set_num_threads(c.get("threads", 1))
    root = Path(c["run_root"])
    if not args.report:
        for name in args.method or c.get("order", METHODS):
            if name != "grpo":  # GRPO trains without the teacher (the report measures its KL to the teacher)
                teacher_main(["--config", args.config])
            run_method(name, c, root)
            if not args.method:
                report(c, root)  # results written after every method: a run cut short still leaves numbers
    if args.report or not args.method:  # single-method runs leave the report to a final `--report`
        report(c, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
