"""Test-time compute at matched cost: greedy, temperature 1, low temperature, maj@k, best-of-N with a trained reward
model, particle filtering, MCMC power sampling and scalable power sampling on the same problems.

    .venv/bin/python experiments/ttc_compute/run.py [--config ...] [--device cpu|cuda] [--out DIR]
        [--only name,name] [--num-problems N] [--report]

Every strategy runs chunk by chunk over the same problems (config `chunk`), and each problem's record (answer,
correctness, tokens forwarded through the policy, wall time) is appended to <out>/records.jsonl as soon as its
chunk is done: a stopped run keeps its records and a rerun skips what is there. `--report` (also run at the end)
turns the records into results.json / results.md next to this script (or in --out with --report-here false):
accuracy ± standard error over problems, tokens forwarded and wall time per problem, and paired discordant counts
against low temperature on the problems both finished, with an exact two-sided McNemar (binomial) p-value.
The reward model for best-of-N and particle filtering is trained with `posttrain reward` if <out>/reward_model
is missing (config `reward_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from posttrain.eval.metrics import majority_at_k, mcnemar_p, mean_stderr
from posttrain.eval.tasks import make_task

HERE = Path(__file__).resolve().parent


def train_reward_model(cfg: dict, out: Path) -> Path:
    folder = out / "reward_model"
    final = folder / "final"
    if final.exists():
        return final
    from posttrain.recipes.reward import RewardConfig, run

    keys = dict(cfg["reward_model"])
    config = RewardConfig(train_file=str(ROOT / keys.pop("train_file")), eval_file=str(ROOT / keys.pop("eval_file")),
                          output_dir=str(folder), progress=False, tensorboard=False, **keys)
    config.validate()
    run(config)
    return final


class Runner:
    """Runs one strategy on one chunk of problems; returns one record per problem."""

    def __init__(self, cfg: dict, device: str, out: Path):
        from posttrain.models import load_model

        self.cfg, self.device, self.out = cfg, device, out
        self.task = make_task(cfg["task"], cfg["task_kwargs"], extract=cfg["extract"], template=cfg["template"],
                              answer_format=cfg["answer_format"])
        self.model, self.tok = load_model(cfg["model"], device=device)
        self._rm = None
        self.newline_ids = tuple(i for i in range(len(self.tok)) if "\n" in self.tok.decode([i]))

    @property
    def rm(self):
        if self._rm is None:
            from posttrain.models.reward_model import reward_function

            self._rm = reward_function(train_reward_model(self.cfg, self.out), device=self.device)
        return self._rm

    def prompt_ids(self, problems):
        from posttrain.data.tokenize import prompt_text

        texts = [prompt_text(self.tok, p.prompt, chat=True) for p in problems]
        return [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def _records(self, problems, texts, fwd, wall, extra=None):
        correct = self.task.score(problems, texts)
        n = len(problems)
        return [{"problem": p.id, "text": t, "answer": self.task.extract(t), "correct": c, "forward_tokens": f,
                 "wall_s": wall / n, **((extra or [{}] * n)[i])}
                for i, (p, t, c, f) in enumerate(zip(problems, texts, correct, fwd))]

    def run(self, spec: dict, problems, seed: int) -> list[dict]:
        from posttrain.generation.sampler import HFGenerator, SamplingParams

        kind, T, alpha = spec["kind"], self.cfg["max_new_tokens"], self.cfg["alpha"]
        ids = self.prompt_ids(problems)
        start = time.perf_counter()
        if kind in ("greedy", "low_temperature", "samples"):
            n = spec.get("n", 1)
            temperature = {"greedy": 0.0, "low_temperature": 1 / alpha, "samples": 1.0}[kind]
            out = HFGenerator(self.model, self.tok).generate(
                ids, SamplingParams(max_new_tokens=T, temperature=temperature, seed=seed), n=n)
            texts, toks = out.grouped(out.texts), out.grouped(out.token_lists())
            wall = time.perf_counter() - start
            if kind != "samples":
                fwd = [len(p) + len(t[0]) - 1 for p, t in zip(ids, toks)]
                return self._records(problems, [t[0] for t in texts], fwd, wall)
            flat = [p for p in problems for _ in range(n)]
            correct = self.task.score(flat, [t for row in texts for t in row])
            scores = self.rm([p.prompt for p in flat], [t for row in texts for t in row])
            recs = []
            for b, p in enumerate(problems):
                recs.append({"problem": p.id, "texts": texts[b], "answers": [self.task.extract(t) for t in texts[b]],
                             "corrects": correct[b * n:(b + 1) * n], "rm_scores": scores[b * n:(b + 1) * n],
                             "prompt_tokens": len(ids[b]), "gen_tokens": [len(t) for t in toks[b]],
                             "wall_s": wall / len(problems)})
            return recs
        if kind == "power":
            from posttrain.ttc.power import PowerParams, PowerSampler

            out = PowerSampler(self.model, self.tok, batch_size=len(ids)).generate(
                ids, PowerParams(alpha=alpha, max_new_tokens=T, block_size=spec["block_size"],
                                 mcmc_steps=spec["mcmc_steps"], seed=seed))
            samples = [row[0] for row in out.samples]
            extra = [{"accepted": s.accepted, "proposed": s.proposed} for s in samples]
            return self._records(problems, [s.text or "" for s in samples], [s.forward_tokens for s in samples],
                                 out.wall_s, extra)
        if kind == "scalable":
            from posttrain.ttc.scalable_power import ScalablePowerParams, ScalablePowerSampler

            out = ScalablePowerSampler(self.model, self.tok).generate(
                ids, ScalablePowerParams(alpha=alpha, max_new_tokens=T, top_k=spec["top_k"], rollouts=spec["rollouts"],
                                         horizon=spec["horizon"], seed=seed))
            share = out.forward_tokens / len(ids)  # rollouts run batched over the chunk: an even share
            return self._records(problems, [row[0] or "" for row in out.texts], [share] * len(ids), out.wall_s)
        if kind == "particles":
            from posttrain.ttc.particles import ParticleFilter, ParticleParams

            rm = self.rm
            pf = ParticleFilter(self.model, self.tok)
            out = pf.generate(ids, lambda prompts, comps: rm(prompts, comps),
                              ParticleParams(num_particles=spec["num_particles"], max_new_tokens=T,
                                             step_tokens=spec["step_tokens"], step_stop_ids=self.newline_ids if spec.get("newline_steps", True) else (),
                                             select=spec.get("select", "max_weight"), seed=seed),
                              prompts=[p.prompt for p in problems])
            share = out.forward_tokens / len(ids)
            extra = [{"resamples": r.resamples, "steps": r.steps} for r in out.results]
            return self._records(problems, [r.text or "" for r in out.results], [share] * len(ids), out.wall_s, extra)
        raise ValueError(f"unknown strategy kind {kind!r}")


def load_records(folder: Path) -> dict[str, dict[str, dict]]:
    """strategy -> problem id -> record, from every records*.jsonl in `folder` (parallel runs write their own)."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(folder.glob("records*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out.setdefault(r["strategy"], {})[r["problem"]] = r
    return out


def derived_rows(cfg, pool: dict[str, dict], equivalent) -> dict[str, dict[str, dict]]:
    """T=1 (the mean over the pool), maj@k (the exact expectation over the pool's k-subsets) and best-of-k (reward
    model; the pool's first k samples, so each problem is solved or not) from the sample pool. out_tokens: the
    pool's mean sample length."""
    rows: dict[str, dict[str, dict]] = {"temperature1": {}}
    for pid, r in pool.items():
        n = len(r["corrects"])
        cost = lambda k, r=r: r["prompt_tokens"] - 1 + sum(r["gen_tokens"][:k])
        one = r["prompt_tokens"] - 1 + sum(r["gen_tokens"]) / n  # one sample: the prompt and its tokens
        mean_len = sum(r["gen_tokens"]) / n
        rows["temperature1"][pid] = {"correct": sum(r["corrects"]) / n, "forward_tokens": one,
                                     "wall_s": r["wall_s"] / n, "out_tokens": mean_len}
        for k in cfg["derived"]["maj"]:
            acc = majority_at_k(r["answers"], [c == 1.0 for c in r["corrects"]], k, equivalent)  # over k-subsets
            rows.setdefault(f"maj@{k}", {})[pid] = {"correct": acc, "forward_tokens": cost(k),
                                                    "wall_s": r["wall_s"] * k / n, "out_tokens": mean_len}
        for k in cfg["derived"]["best_of"]:
            scores = r["rm_scores"][:k]
            best = max(range(k), key=lambda g: (scores[g], -g))
            rows.setdefault(f"best_of_{k}_rm", {})[pid] = {"correct": r["corrects"][best], "forward_tokens": cost(k),
                                                           "wall_s": r["wall_s"] * k / n, "out_tokens": mean_len}
    return rows


def split_by_terms(task, cfg: dict, table: dict[str, dict[str, dict]]) -> dict[str, dict[int, dict]]:
    """strategy -> number of terms -> {n, accuracy, stderr}, for reasoning-gym problems whose metadata names
    num_terms (chain_sum); {} for other tasks."""
    terms = {}
    for p in task.problems(cfg["num_problems"], cfg["seed"]):
        entry = p.data.get("entry") if isinstance(p.data, dict) else None
        meta = (json.loads(entry) if isinstance(entry, str) else entry or {}).get("metadata", {})
        if "num_terms" not in meta:
            return {}
        terms[p.id] = int(meta["num_terms"])
    out: dict[str, dict[int, dict]] = {}
    for name, rows in table.items():
        for k in sorted(set(terms.values())):
            vals = [float(r["correct"]) for pid, r in rows.items() if terms.get(pid) == k]
            if vals:
                ms = mean_stderr(vals)
                out.setdefault(name, {})[k] = {"n": ms.n, "accuracy": ms.mean, "stderr": ms.stderr}
    return out


def report(cfg: dict, out: Path, dest: Path) -> str:
    records = load_records(out)
    task = make_task(cfg["task"], cfg["task_kwargs"], extract=cfg["extract"], template=cfg["template"],
                     answer_format=cfg["answer_format"])
    table: dict[str, dict[str, dict]] = {}
    for name in cfg["strategies"]:
        if name not in records:
            continue
        if cfg["strategies"][name]["kind"] == "samples":
            table.update(derived_rows(cfg, records[name], task.equivalent))
        else:
            table[name] = records[name]
    base = table.get("low_temperature", {})
    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(cfg["model"])
    for rows in table.values():
        for r in rows.values():
            if "out_tokens" not in r:
                r["out_tokens"] = len(tok(r.get("text") or "", add_special_tokens=False)["input_ids"])
    results, lines = {}, []
    header = (f"{'strategy':<16} {'n':>4} {'acc':>6} {'±se':>6} {'out tok':>7} {'fwd tok/prob':>12} {'s/prob':>7} "
              f"{'Δ vs low-T':>10} {'±se':>6} {'+':>3} {'-':>3} {'p':>6}")
    lines += [header, "-" * len(header)]
    for name, rows in table.items():
        vals = [float(r["correct"]) for r in rows.values()]
        ms = mean_stderr(vals)
        fwd = sum(r["forward_tokens"] for r in rows.values()) / len(rows)
        wall = sum(r["wall_s"] for r in rows.values()) / len(rows)
        common = [pid for pid in rows if pid in base]
        b = sum(1 for pid in common if float(rows[pid]["correct"]) == 1.0 and float(base[pid]["correct"]) == 0.0)
        c = sum(1 for pid in common if float(rows[pid]["correct"]) == 0.0 and float(base[pid]["correct"]) == 1.0)
        frac = any(0.0 < float(rows[pid]["correct"]) < 1.0 for pid in common)  # maj@k / T=1 are expectations
        out_tok = sum(r["out_tokens"] for r in rows.values()) / len(rows)
        diff = mean_stderr([float(rows[pid]["correct"]) - float(base[pid]["correct"]) for pid in common] or [0.0])
        results[name] = {"n": ms.n, "accuracy": ms.mean, "stderr": ms.stderr, "forward_tokens_per_problem": fwd,
                         "wall_s_per_problem": wall, "output_tokens_per_problem": out_tok, "paired_n": len(common),
                         "difference_vs_low_temperature": diff.mean, "difference_stderr": diff.stderr,
                         "better_than_low_temperature": b, "worse_than_low_temperature": c,
                         "mcnemar_p": None if frac else mcnemar_p(b, c)}
        p = "-" if frac or name == "low_temperature" else f"{mcnemar_p(b, c):.3f}"
        lines.append(f"{name:<16} {ms.n:>4} {ms.mean:>6.3f} {ms.stderr:>6.3f} {out_tok:>7.1f} {fwd:>12.0f} "
                     f"{wall:>7.2f} {diff.mean:>+10.3f} {diff.stderr:>6.3f} {(b if not frac else '-'):>3} "
                     f"{(c if not frac else '-'):>3} {p:>6}")
    text = "\n".join(lines)
    by_terms = split_by_terms(task, cfg, table)
    if by_terms:
        results_split = {name: {str(k): v for k, v in row.items()} for name, row in by_terms.items()}
        keys = sorted({k for row in by_terms.values() for k in row})
        split_lines = [f"{'strategy':<16} " + " ".join(f"{f'{k} terms: n':>12} {'acc':>6} {'±se':>6}" for k in keys)]
        for name, row in by_terms.items():
            split_lines.append(f"{name:<16} " + " ".join(
                f"{row[k]['n']:>12} {row[k]['accuracy']:>6.3f} {row[k]['stderr']:>6.3f}" if k in row else " " * 26
                for k in keys))
        for name, row in results.items():
            row["by_num_terms"] = results_split.get(name, {})
    full = {name: {"forward_tokens": r["forward_tokens_per_problem"] * cfg["num_problems"],
                   "cpu_hours_at_measured_rate": r["wall_s_per_problem"] * cfg["num_problems"] / 3600}
            for name, r in results.items()}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps({"config": cfg, "results": results, "full_run_estimate": full},
                                                  indent=2) + "\n")
    md = [f"# Test-time compute at matched cost: {cfg['model']} on {cfg['task']} {cfg['task_kwargs']}", "",
          f"Generated by `experiments/ttc_compute/run.py` from `config.yaml` (records in {out}). Planned: "
          f"{cfg['num_problems']} problems (seed {cfg['seed']}); n below is what each strategy finished. α = "
          f"{cfg['alpha']} (low temperature τ = {1 / cfg['alpha']:g}), max_new_tokens {cfg['max_new_tokens']}.", "",
          "```", text, "```", "",
          "acc: accuracy ± standard error over problems (T=1 and maj@k are exact expectations over the 8-sample "
          "pool: T=1 the mean of the 8, maj@k the exact expectation over the pool's k-subsets with answers grouped "
          "by math-verify; best-of-k takes the pool's first k). out tok: mean length of the returned completion "
          "(T=1/maj/best-of: of the pool's samples). fwd tok/prob: tokens forwarded through the policy per problem "
          "(prompt included; reward-model passes not counted). s/prob: wall seconds per problem on the machine that "
          "ran it. Δ vs low-T: mean paired difference in accuracy against low temperature on the same problems, "
          "± its standard error. + / -: problems solved by the strategy but not by low temperature and the reverse, "
          "with the exact two-sided McNemar (binomial) p-value (not shown for expectation rows).", "",
          *(["By number of terms in the chain sum:", "", "```", *split_lines, "```", ""] if by_terms else []),
          "Full run (all planned problems) at the measured per-problem cost:", "",
          "| strategy | forward tokens | hours at the measured wall time |", "|---|---|---|"]
    md += [f"| {k} | {v['forward_tokens']:.3g} | {v['cpu_hours_at_measured_rate']:.2f} |" for k, v in full.items()]
    keep = ""
    if (dest / "results.md").exists() and "## Reading" in (dest / "results.md").read_text():
        keep = (dest / "results.md").read_text().split("## Reading", 1)[1]
    md += ["", "## Reading" + (keep or "\n\n(hand-written; run.py keeps this section when it rewrites the tables)\n")]
    (dest / "results.md").write_text("\n".join(md))
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(HERE / "config.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "runs" / "ttc_compute"))
    ap.add_argument("--only", default=None, help="comma list of strategy names (default: all)")
    ap.add_argument("--num-problems", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None, help="problems per batch (e.g. 50 on a GPU)")
    ap.add_argument("--reverse", action="store_true", help="chunks from the last one back (a second process)")
    ap.add_argument("--records", default="records.jsonl", help="file (in --out) this run appends to; run "
                                                                  "several processes with different files")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from the records")
    ap.add_argument("--report-dir", default=None, help="where results.json goes (default: next to this script "
                                                       "for the default --out, else --out)")
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(a.config).read_text())
    if a.num_problems:
        cfg["num_problems"] = a.num_problems
    if a.chunk:
        cfg["chunk"] = a.chunk
    torch.set_num_threads(cfg["threads"] if a.device == "cpu" else torch.get_num_threads())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = Path(a.report_dir) if a.report_dir else (HERE if a.out == ap.get_default("out") else out)
    if not a.report:
        runner = Runner(cfg, a.device, out)
        problems = runner.task.problems(cfg["num_problems"], cfg["seed"])
        only = a.only.split(",") if a.only else list(cfg["strategies"])
        phases = [[n for n in phase if n in only] for phase in cfg.get("phases", [list(cfg["strategies"])])]
        path = out / a.records
        starts = list(range(0, len(problems), cfg["chunk"]))
        for phase, lo in ((ph, lo) for ph in phases for lo in (reversed(starts) if a.reverse else starts)):
            chunk = problems[lo:lo + cfg["chunk"]]
            for name in phase:
                done = load_records(out).get(name, {})
                if all(p.id in done for p in chunk):
                    continue
                recs = runner.run(cfg["strategies"][name], chunk, seed=cfg["seed"] * 1000 + lo)
                with path.open("a") as f:
                    for r in recs:
                        f.write(json.dumps({"strategy": name, **r}) + "\n")
                acc = [float(r["correct"]) if "correct" in r else sum(r["corrects"]) / len(r["corrects"]) for r in recs]
                print(f"[{time.strftime('%H:%M:%S')}] {name}: problems {lo}-{lo + len(chunk) - 1} "
                      f"acc {sum(acc) / len(acc):.2f}", flush=True)
    print(report(cfg, out, dest))


if __name__ == "__main__":
    main()
