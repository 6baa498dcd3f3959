"""Qwen3's order, tested: off-policy distillation first, then four ways to continue at equal student FLOPs.

    python experiments/distillation/continue.py            # every stage not done yet, then the report
    python experiments/distillation/continue.py --time     # one step of each method (wall time), for sizing
    python experiments/distillation/continue.py --report   # only the report from continue_results.json
    python experiments/distillation/continue.py --config continue_long.yaml --runs on_policy/seed0   # one run only

Several processes may run different `--runs` of one config at once: each evaluation is merged into the results file
under a lock (a run's points belong to the process that trains it).

Stages (config: continue.yaml): the teacher (teacher.py), the shared data (run.py's write_data: the warm-start and
held-out prompts; fresh continuation prompts), the common warm start (the layer-dropped student after off-policy
sequence distillation, run.py's recipe (b)), the teacher's and the warm start's held-out evaluation, then for every
seed and method a run from the warm start that checkpoints every `save_steps` steps; each checkpoint is evaluated
(greedy accuracy with per-problem results for McNemar, reverse KL to the teacher on the student's own samples) and
deleted. Results go to continue_results.json after every evaluation, so a run cut short still leaves numbers;
continue_results.md and continue_curves.png are written from it. FLOPs as in run.py: 2·N per forwarded token, 6·N per
trained token (N = student parameters), counted from the continuation's start; teacher FLOPs separately.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import common, grpo_flops, student_params, wilson, write_data, write_rows
from teacher import main as teacher_main
from teacher import rows as task_rows

from posttrain.files import atomic_write_text
from posttrain.train.logging import read_metrics

LABELS = {"sequence": "(b') more off-policy sequence distillation", "on_policy": "(c') on-policy reverse KL",
          "grpo": "(d') GRPO with the verifier", "gold": "(a') SFT on gold",
          "on_policy_lr5e-5": "(c') on-policy reverse KL, lr 5e-5"}


def results_path(c: dict) -> Path:
    return HERE / c.get("results", "continue_results.json")


def continue_file(c: dict, root: Path) -> Path:
    """The continuation's prompts (fresh problems, seed continue_seed)."""
    return root / "data" / c.get("continue_file", "continue.jsonl")


def train(name: str, c: dict, root: Path, seed: int, out: Path, **overrides) -> None:
    """One continuation run of method `name` from the warm start (a method's own keys win over the shared ones)."""
    base = {**common(c, root, continue_file(c, root), root / "data" / "heldout.jsonl"),
            "model": str(root / "warm" / "final"), "eval_file": None, "seed": seed, "keep_last": 0,
            "overwrite": True, **c["methods"][name], **overrides}  # no eval_file: checkpoints are evaluated here
    if name == "grpo":
        from posttrain.recipes.grpo import GRPOConfig, run

        run(GRPOConfig(**base, output_dir=str(out), loss="grpo"))
        return
    from posttrain.recipes.distill import DistillConfig, run

    run(DistillConfig(**base, teacher=str(root / "teacher" / "final"), output_dir=str(out)))


def step_flops(name: str, c: dict, root: Path, out: Path, n_params: int) -> dict[int, tuple[float, float]]:
    """(student, teacher) FLOPs of a run after each step, counted from its start."""
    if name == "grpo":
        m = c["methods"]["grpo"]
        f = grpo_flops(out / "metrics.jsonl", continue_file(c, root), c["student"], m["prompts_per_step"],
                       m["num_generations"], n_params)
        return {s: (v, 0.0) for s, v in f.items()}
    return {r["step"]: (r["flops/student"], r["flops/teacher"]) for r in read_metrics(out / "metrics.jsonl")
            if "flops/student" in r and "divergence" in r}


class Evaluator:
    """Held-out greedy accuracy (per problem) and the reverse KL to the teacher of a saved student."""

    def __init__(self, c: dict, root: Path):
        from posttrain.models.loading import load_model
        from posttrain.models.teacher import FrozenTeacher
        from posttrain.rewards import build_reward

        self.c = c
        self.held = [json.loads(line) for line in (root / "data" / "heldout.jsonl").read_text().splitlines()]
        model, self.tok = load_model(root / "teacher" / "final")
        self.teacher = FrozenTeacher(model)
        self.reward = build_reward("gym", extract="final_line")

    def __call__(self, path: Path) -> dict:
        from posttrain.eval.distill import evaluate_student
        from posttrain.models.loading import load_model

        t0, cpu0 = time.time(), time.process_time()
        student = self.teacher.model if path == "teacher" else load_model(path)[0]
        rows: dict[str, list[float]] = {}
        m = evaluate_student(student, self.teacher, self.tok, self.held, self.reward,
                             max_new_tokens=self.c["max_new_tokens"], seed=10_000, rows_out=rows)  # same samples' seeds
        n, k = len(self.held), int(sum(rows["correct"]))
        return {"n": n, "correct_count": k, "accuracy": k / n, "wilson95": list(wilson(k, n)),
                "reverse_kl_seq": m["eval/reverse_kl_seq"], "reverse_kl_seq_se": m["eval/reverse_kl_seq_se"],
                "reverse_kl_token": m["eval/reverse_kl_token"], "correct": [int(v) for v in rows["correct"]],
                "reverse_kl_rows": rows["reverse_kl_seq"],
                "eval_seconds": time.time() - t0, "eval_cpu_seconds": time.process_time() - cpu0,
                "load": os.getloadavg()[0]}


def load_results(c: dict) -> dict:
    path = results_path(c)
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "timing": {}}


def save(c: dict, results: dict, own: frozenset[str] = frozenset()) -> None:
    """Write results, merged under a lock with what other processes wrote meanwhile: their runs and timings are
    kept; the runs in `own` (those this process trains) are taken from `results`, every other run from the file.
    `results` is updated in place to the merged whole."""
    import fcntl

    path = results_path(c)
    lock_path = Path(c["run_root"]) / (path.stem + ".lock")  # beside the runs (git-ignored), not in the repository
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load_results(c)
        theirs = {key: run for key, run in disk["runs"].items() if key not in own}  # other processes' runs win
        merged = {**disk, **results, "runs": {**results["runs"], **theirs},
                  "timing": {**disk["timing"], **results["timing"]}}
        atomic_write_text(path, json.dumps(merged, indent=1) + "\n")
    results.update(merged)


def prepare(c: dict, root: Path, results: dict) -> None:
    """Teacher, data, the warm start and the two reference evaluations (each skipped when done)."""
    teacher_main(["--config", str(c["_path"])])
    write_data(c, root)
    fresh = continue_file(c, root)
    if not fresh.exists():
        write_rows(fresh, task_rows(c, c["continue_problems"], c["continue_seed"]))
    if not (root / "warm" / "final" / "config.json").exists():
        from posttrain.recipes.distill import DistillConfig, run

        t0, cpu0 = time.time(), time.process_time()
        run(DistillConfig(**{**common(c, root, *write_data(c, root)), "eval_file": None, **c["warm"]},
                          teacher=str(root / "teacher" / "final"), output_dir=str(root / "warm")))
        results["timing"]["warm"] = {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0}
    last = [r for r in read_metrics(root / "warm" / "metrics.jsonl") if "flops/student" in r][-1]
    results["warm_flops"] = {"student": last["flops/student"], "teacher": last["flops/teacher"]}
    # the task has few distinct problems: mark the held-out questions that any model trained on (teacher included)
    held = [json.loads(x)["prompt"][-1]["content"] for x in (root / "data" / "heldout.jsonl").read_text().splitlines()]
    seen = {json.loads(x)["prompt"][-1]["content"] for f in ("teacher_sft.jsonl", "train.jsonl", fresh.name)
            for x in (root / "data" / f).read_text().splitlines()}
    results["heldout_seen"] = [int(q in seen) for q in held]
    ev = None
    for key, path in (("teacher", "teacher"), ("warm", root / "warm" / "final")):
        if key not in results:
            ev = ev or Evaluator(c, root)
            results[key] = ev(path)
            save(c, results)
            print(key, {k: v for k, v in results[key].items() if "correct" not in k and "rows" not in k}, flush=True)


def continue_runs(c: dict, root: Path, results: dict, only: list[str] | None = None) -> None:
    """Every (seed, method) run from the warm start (or those in `only`); its checkpoints evaluated as they come,
    then deleted."""
    n_params = student_params(c["student"])
    ev = Evaluator(c, root)
    plan = [(name, seed) for seed in c["seeds"] for name in c["order"]]
    plan += [(name, int(seed)) for name, seed in (spec.split("/seed") for spec in c.get("extra_runs", []))]
    if only is not None:
        unknown = set(only) - {f"{name}/seed{seed}" for name, seed in plan}
        if unknown:
            raise SystemExit(f"--runs: {sorted(unknown)} not in the config's plan (seeds × order, extra_runs)")
        plan = [(name, seed) for name, seed in plan if f"{name}/seed{seed}" in only]
    own = frozenset(f"{name}/seed{seed}" for name, seed in plan)
    for name, seed in plan:
        key = f"{name}/seed{seed}"
        out = root / c.get("continue_dir", "continue") / key
        run = results["runs"].setdefault(key, {"method": name, "seed": seed, "points": []})
        if not run.get("trained"):
            t0, cpu0 = time.time(), time.process_time()
            train(name, c, root, seed, out)
            run.update(trained=True, train_seconds=time.time() - t0, train_cpu_seconds=time.process_time() - cpu0)
            save(c, results, own)
            run = results["runs"][key]
        flops = step_flops(name, c, root, out, n_params)
        for ckpt in sorted((out / "checkpoints").glob("step-*")):
            step = int(ckpt.name.split("-")[1])
            if all(p["step"] != step for p in run["points"]):
                point = {"step": step, "flops": flops[step][0], "teacher_flops": flops[step][1], **ev(ckpt / "model")}
                run["points"].append(point)
                save(c, results, own)
                run = results["runs"][key]
                print(key, step, {k: v for k, v in point.items() if "correct" not in k and "rows" not in k}, flush=True)
            shutil.rmtree(ckpt)  # 1.4 GB with the optimizer state; final/ stays
        report(c, results)


def time_steps(c: dict, root: Path, results: dict) -> None:
    """One step of every method from the warm start (wall and CPU seconds), to size the run."""
    for name in c["order"]:
        t0, cpu0 = time.time(), time.process_time()
        train(name, c, root, 0, root / "time" / name, max_steps=1, save_steps=0)
        step = [r for r in read_metrics(root / "time" / name / "metrics.jsonl") if "loss" in r or "train/loss" in r]
        results["timing"][f"one_step/{name}"] = {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0,
                                                 "load": os.getloadavg()[0],
                                                 "step": {k: v for k, v in step[-1].items() if "time" in k or "flops" in k
                                                          or "length" in k or "sequences" in k}}
        print(name, results["timing"][f"one_step/{name}"], flush=True)
        save(c, results)


# --------------------------------------------------------------------------------------------------------- report


def spread(values: list[float], fmt: str) -> str:
    """'mean (min–max)' of the values (one per seed)."""
    return f"{sum(values) / len(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def first_reaching(points: list[dict], ok) -> float | None:
    """Continuation FLOPs of the first evaluation that satisfies `ok`, or None."""
    return next((p["flops"] for p in sorted(points, key=lambda p: p["step"]) if ok(p)), None)


def report(c: dict, results: dict) -> None:
    """continue_results.md (tables; the findings below the marker are kept) and continue_curves.png."""
    from posttrain.eval.metrics import mcnemar_p

    if "warm" not in results:
        return
    teacher, warm = results["teacher"], results["warm"]
    n = warm["n"]

    unseen = [i for i, seen in enumerate(results["heldout_seen"]) if not seen]

    def acc(p: dict) -> str:
        lo, hi = p["wilson95"]
        return f"{p['correct_count']}/{p['n']} = {p['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"

    def acc_unseen(p: dict) -> str:
        """Accuracy on the held-out questions no model trained on (Wilson 95%)."""
        k = sum(p["correct"][i] for i in unseen)
        lo, hi = wilson(k, len(unseen))
        return f"{k}/{len(unseen)} = {k / len(unseen):.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["# Continuation: off-policy first, then off-policy / on-policy / GRPO at equal student FLOPs", "",
             f"Rerun: `python experiments/distillation/continue.py --config {Path(c['_path']).name}`. Numbers from "
             f"`{results_path(c).name}`; the findings below the tables are written by hand.", "",
             f"- Held-out: n = {n} problems (seed {c['eval_seed']}), greedy, strict `Answer:` line; Wilson 95% "
             f"intervals. Reverse KL: one temperature-1 student sample per problem (sampling seeds fixed across "
             f"models), Σ_t KL(q‖p) in nats per answer, mean ± SE over problems. "
             f"{n - len(unseen)} of the {n} held-out questions also occur among some model's training prompts (the task "
             f"has few distinct problems); the column 'unseen' scores the other {len(unseen)}.",
             f"- Warm start: `{c['student']}` after {c['warm']['max_steps']} steps × {c['warm']['prompts_per_step']} "
             f"prompts of off-policy sequence distillation ({results['warm_flops']['student'] / 1e12:.2f} student "
             f"TFLOPs, {results['warm_flops']['teacher'] / 1e12:.2f} teacher TFLOPs).",
             "- FLOPs below: student training FLOPs of the continuation (from the warm start), teacher FLOPs apart.",
             "", "| model | step | student TFLOPs | teacher TFLOPs | held-out accuracy | unseen | reverse KL / answer | "
             "KL / token |", "|---|---|---|---|---|---|---|---|",
             f"| teacher | – | – | – | {acc(teacher)} | {acc_unseen(teacher)} | 0 | 0 |",
             f"| warm start | 0 | 0 | 0 | {acc(warm)} | {acc_unseen(warm)} | "
             f"{warm['reverse_kl_seq']:.2f} ± {warm['reverse_kl_seq_se']:.2f} | "
             f"{warm['reverse_kl_token']:.3f} |"]
    for key, run in results["runs"].items():
        for p in sorted(run["points"], key=lambda p: p["step"]):
            lines.append(f"| {LABELS[run['method']]}, seed {run['seed']} | {p['step']} | {p['flops'] / 1e12:.2f} | "
                         f"{p['teacher_flops'] / 1e12:.2f} | {acc(p)} | {acc_unseen(p)} | {p['reverse_kl_seq']:.2f} ± "
                         f"{p['reverse_kl_seq_se']:.2f} | {p['reverse_kl_token']:.3f} |")
    lines += ["", "Across seeds (mean, and min–max over seeds):", "",
              "| method | step | seeds | student TFLOPs | accuracy | reverse KL / answer |", "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(run["method"] for run in results["runs"].values()):
        by_step: dict[int, list[dict]] = {}
        for run in results["runs"].values():
            for p in run["points"] if run["method"] == method else []:
                by_step.setdefault(p["step"], []).append(p)
        for step, ps in sorted(by_step.items()):
            tf = sum(p["flops"] for p in ps) / len(ps) / 1e12
            lines.append(f"| {LABELS[method]} | {step} | {len(ps)} | {tf:.2f} | "
                         f"{spread([p['accuracy'] for p in ps], '.3f')} | "
                         f"{spread([p['reverse_kl_seq'] for p in ps], '.2f')} |")
    targets = [(f"accuracy ≥ {name} teacher's", lambda p, f=f: p["accuracy"] >= f * teacher["accuracy"])
               for name, f in (("⅓ of the", 1 / 3), ("½ of the", 1 / 2), ("the", 1.0))]
    targets += [(f"KL ≤ {name} warm start's", lambda p, f=f: p["reverse_kl_seq"] <= f * warm["reverse_kl_seq"])
                for name, f in (("0.9 ×", 0.9), ("¾ of the", 0.75), ("½ of the", 0.5))]
    lines += ["", "Continuation TFLOPs at the first evaluation that reaches a target (– : not within the run):", "",
              "| run | last TFLOPs | " + " | ".join(t for t, _ in targets) + " |", "|---" * (len(targets) + 2) + "|"]
    for key, run in results["runs"].items():
        pts = run["points"]
        if pts:
            cells = [first_reaching(pts, ok) for _, ok in targets]
            lines.append(f"| {key} | {max(p['flops'] for p in pts) / 1e12:.2f} | " +
                         " | ".join("–" if v is None else f"{v / 1e12:.2f}" for v in cells) + " |")
    lines += ["", "Paired on the same held-out problems (exact McNemar): last evaluation of each run against the warm "
              "start, against (b') of the same seed, and (c') against (d') of the same seed:", "",
              "| run | vs | gained | lost | McNemar p | unseen only: gained / lost, p | reverse KL difference / answer "
              "(paired, mean ± SE) |", "|---|---|---|---|---|---|---|"]
    finals = {key: max(run["points"], key=lambda p: p["step"]) for key, run in results["runs"].items() if run["points"]}
    for key, p in finals.items():
        seed = results["runs"][key]["seed"]
        others = [f"sequence/seed{seed}"] + ([f"grpo/seed{seed}"] if results["runs"][key]["method"] == "on_policy" else [])
        for other, q in [("warm start", warm)] + [(o, finals[o]) for o in others if o in finals and o != key]:
            gained = sum(a and not b for a, b in zip(p["correct"], q["correct"]))
            lost = sum(b and not a for a, b in zip(p["correct"], q["correct"]))
            gained_u = sum(p["correct"][i] and not q["correct"][i] for i in unseen)
            lost_u = sum(q["correct"][i] and not p["correct"][i] for i in unseen)
            diff = [a - b for a, b in zip(p["reverse_kl_rows"], q["reverse_kl_rows"])]
            m = sum(diff) / len(diff)
            se = math.sqrt(sum((v - m) ** 2 for v in diff) / (len(diff) - 1) / len(diff))
            lines.append(f"| {key} (step {p['step']}) | {other} | {gained} | {lost} | {mcnemar_p(gained, lost):.3g} | "
                         f"{gained_u} / {lost_u}, {mcnemar_p(gained_u, lost_u):.3g} | {m:+.2f} ± {se:.2f} |")
    lines += ["", f"![curves]({c.get('curves', 'continue_curves.png')})", "", "<!-- findings -->"]
    path = HERE / c.get("report", "continue_results.md")
    text = path.read_text() if path.exists() else ""
    findings = text.split("<!-- findings -->", 1)[1] if "<!-- findings -->" in text else "\n"
    atomic_write_text(path, "\n".join(lines) + findings)
    plot(results, HERE / c.get("curves", "continue_curves.png"))


def plot(results: dict, path: Path) -> None:
    """Accuracy (Wilson 95%) and reverse KL (± SE) vs continuation TFLOPs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm = results["warm"]
    colours = {"sequence": "C0", "on_policy": "C1", "grpo": "C2", "gold": "C3", "on_policy_lr5e-5": "C4"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in results["runs"].values():
        pts = [{"flops": 0.0, **warm}] + sorted(run["points"], key=lambda p: p["step"])
        x = [p["flops"] / 1e12 for p in pts]
        y = [p["accuracy"] for p in pts]
        style = dict(marker="o", capsize=3, color=colours[run["method"]], alpha=1.0 if run["seed"] == 0 else 0.5,
                     label=f"{LABELS[run['method']]}, seed {run['seed']}")
        a.errorbar(x, y, yerr=[[v - p["wilson95"][0] for v, p in zip(y, pts)],
                               [p["wilson95"][1] - v for v, p in zip(y, pts)]], **style)
        b.errorbar(x, [p["reverse_kl_seq"] for p in pts], yerr=[p["reverse_kl_seq_se"] for p in pts], **style)
    a.axhline(results["teacher"]["accuracy"], color="k", ls="--", label="teacher")
    a.set(xlabel="continuation student TFLOPs", ylabel=f"held-out accuracy (n={warm['n']}, greedy, Wilson 95%)")
    b.set(xlabel="continuation student TFLOPs", ylabel="reverse KL(student ‖ teacher) / answer (± SE)")
    a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(HERE / "continue.yaml"))
    parser.add_argument("--time", action="store_true", help="only time one step of each method (after the warm start)")
    parser.add_argument("--report", action="store_true", help="only write the report from the results file")
    parser.add_argument("--runs", nargs="+", metavar="METHOD/seedN", help="train and evaluate only these runs")
    args = parser.parse_args(argv)
    c = {**yaml.safe_load(Path(args.config).read_text()), "_path": args.config}
    torch.set_num_threads(c.get("threads", 1))
    root = Path(c["run_root"])
    results = load_results(c)
    results["config"] = {k: v for k, v in c.items() if k != "_path"}
    if args.report:
        report(c, results)
        return 0
    t0, cpu0 = time.time(), time.process_time()
    prepare(c, root, results)
    save(c, results)
    if args.time:
        time_steps(c, root, results)
    else:
        continue_runs(c, root, results, args.runs)
    results["timing"]["last_invocation"] = {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0}
    save(c, results)
    report(c, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
