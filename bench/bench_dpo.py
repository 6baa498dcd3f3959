"""DPO throughput and peak memory: posttrain vs TRL's DPOTrainer, same model, data and settings, in one run.

    python bench/bench_dpo.py [--model smollm2-135m-instruct] [--steps 4] [--batch 4] [--rounds 1] [--threads 1]

Data: the shipped identity pairs (data/preference/identity_train.jsonl: 36 conversational pairs, chosen answers of
~20 tokens, rejected answers = SmolLM2's own replies of up to 96 tokens, so chosen/rejected lengths differ a lot).
Both sides: full fine-tuning in fp32 on CPU, sigmoid DPO with β = 0.1, `--batch` pairs per optimizer step, no
accumulation, max_length 256, AdamW lr 1e-6 (constant), max_grad_norm 1.0, one chat template, `--steps` optimizer
steps of which the first is a warm-up and is not counted. TRL: `use_cpu=True, bf16=False, report_to="none",
save_strategy="no"`, the model passed as a local folder (so TRL builds its own reference, or none when it
precomputes). Both sides run the same number of torch threads (`--threads`, default 1: on a CPU shared with other
jobs, two OpenMP threads per process spin against each other and slow down ~10x), each run in a fresh subprocess,
alternating TRL / posttrain so background load hits both.

Runs (pairs of like-for-like settings):
- `trl-live` (TRL's default: a reference forward every step, padded [chosen; rejected] batch)
  vs `pt-live` (posttrain with precompute_ref_logps=false: a frozen reference copy, forward every step, packed).
- `trl-pre` (TRL precompute_ref_log_probs=True) vs `pt-cached` (posttrain's default: cached reference, packed)
  and `pt-cached-pad` (cached, padded like TRL: isolates the gain of packing).
Both sides compute log-probs without materializing [B, T, V] logits (TRL 1.16: `fused_lm_head=True`; posttrain:
chunked fused head), and both run chosen and rejected in one forward.

Throughput = pairs per second over the timed steps (median step: data, forward, backward, optimizer), on two
clocks: wall time, and the process's CPU time (time.process_time), which other jobs on a shared CPU do not inflate
— with one thread per side the CPU clock is the like-for-like compute figure, the wall clock what a user waits. The
reference pass of the cached/precomputed runs happens before training on both sides and is reported separately
(`ref_seconds`: posttrain's logged cache time; TRL's constructor time minus that of the live run, which also
covers tokenization). Memory = peak RSS of the child process (ru_maxrss: model, reference, optimizer state,
activations, libraries) — not tracemalloc, which does not see torch's allocator.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT / "data" / "preference" / "identity_train.jsonl"

RUNS = {  # name -> (side, settings)
    "trl-live": ("trl", {"precompute": False}),
    "pt-live": ("posttrain", {"precompute": False, "packing": True}),
    "trl-pre": ("trl", {"precompute": True}),
    "pt-cached": ("posttrain", {"precompute": True, "packing": True}),
    "pt-cached-pad": ("posttrain", {"precompute": True, "packing": False}),
}
MAX_LENGTH, BETA, LR = 256, 0.1, 1e-6


class _Clock:
    """Stands in for the `time` module inside posttrain.recipes.dpo: perf_counter() returns wall time as usual and
    also records the process CPU time of each call, so the bench reads both clocks at the recipe's own step marks
    (the loop start and each logged step) without the recipe knowing."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def perf_counter(self) -> float:
        wall = time.perf_counter()
        self.marks.append((wall, time.process_time()))
        return wall


def run_posttrain(model: str, steps: int, batch: int, settings: dict, out: Path) -> dict:
    import posttrain.recipes.dpo as recipe
    from posttrain.recipes.dpo import DPOConfig, run

    clock = _Clock()
    recipe.time = clock

    config = DPOConfig(train_file=str(DATA), model=model, output_dir=str(out / "pt"), loss="sigmoid", beta=BETA,
                       precompute_ref_logps=settings["precompute"], ref_batch_size=batch,
                       packing=settings["packing"], max_length=MAX_LENGTH, micro_batch_size=batch, max_steps=steps,
                       lr=LR, lr_schedule="constant", max_grad_norm=1.0, progress=False, tensorboard=False,
                       logging_steps=1, keep_last=1)
    t0 = time.perf_counter()
    run(config)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "pt" / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "train/loss" in r]
    marks = clock.marks[-(steps + 1):]  # the loop start, then one mark per logged step (logging_steps=1)
    step_seconds = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    step_cpu = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
    assert all(abs(batch / r["train/pairs_per_s"] - s) < 1e-3 for r, s in zip(steps_rows, step_seconds))
    tokens = [r["train/tokens_per_s"] * s for r, s in zip(steps_rows, step_seconds)]
    return {"step_seconds": step_seconds, "step_cpu_seconds": step_cpu, "first_loss": steps_rows[0]["train/loss"],
            "ref_seconds": rows[0]["ref/cache_seconds"], "tokens_per_step": statistics.mean(tokens), "wall": wall}


def run_trl(model: str, steps: int, batch: int, settings: dict, out: Path) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.models.loading import resolve

    path = str(resolve(model))
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.losses = [], [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     max_length=MAX_LENGTH, beta=BETA, learning_rate=LR, lr_scheduler_type="constant", max_steps=steps,
                     precompute_ref_log_probs=settings["precompute"], precompute_ref_batch_size=batch,
                     max_grad_norm=1.0, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=path, args=args, train_dataset=ds, callbacks=[clock])
    init_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train()
    wall = init_seconds + time.perf_counter() - t0
    return {"step_seconds": clock.times, "step_cpu_seconds": clock.cpu,
            "first_loss": clock.losses[0] if clock.losses else None,
            "init_seconds": init_seconds, "wall": wall}


def child(name: str, model: str, steps: int, batch: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    side, settings = RUNS[name]
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_posttrain if side == "posttrain" else run_trl
        result = fn(model, steps, batch, settings, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def summarize(results: dict, batch: int) -> dict:
    by_name: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by_name.setdefault(r["name"], []).append(r)
    out = {}
    for name, runs in by_name.items():
        timed = [s for r in runs for s in r["step_seconds"][1:]]  # the first step of each run is a warm-up
        cpu = [s for r in runs for s in r["step_cpu_seconds"][1:]]
        out[name] = {"pairs_per_s": batch / statistics.median(timed), "median_step_s": statistics.median(timed),
                     "pairs_per_cpu_s": batch / statistics.median(cpu), "median_step_cpu_s": statistics.median(cpu),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "first_loss": runs[0]["first_loss"],
                     "timed_steps": len(timed)}
        if "ref_seconds" in runs[0]:
            out[name]["ref_seconds"] = statistics.median(r["ref_seconds"] for r in runs)
        if "init_seconds" in runs[0]:
            out[name]["init_seconds"] = statistics.median(r["init_seconds"] for r in runs)
    if "trl-pre" in out and "trl-live" in out:
        out["trl-pre"]["ref_seconds"] = out["trl-pre"]["init_seconds"] - out["trl-live"]["init_seconds"]
    ratios = {}
    for ours, theirs in (("pt-live", "trl-live"), ("pt-cached", "trl-live"), ("pt-cached", "trl-pre"),
                         ("pt-cached-pad", "trl-pre")):
        if ours in out and theirs in out:
            ratios[f"{ours} / {theirs}"] = {
                "throughput_wall": out[ours]["pairs_per_s"] / out[theirs]["pairs_per_s"],
                "throughput_cpu": out[ours]["pairs_per_cpu_s"] / out[theirs]["pairs_per_cpu_s"],
                "peak_rss": out[ours]["peak_rss_mb"] / out[theirs]["peak_rss_mb"]}
    return {"runs": out, "ratios": ratios}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="trl-live,pt-live,trl-pre,pt-cached,pt-cached-pad")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo.json"))
    p.add_argument("--child", nargs=5, metavar=("RUN", "MODEL", "STEPS", "BATCH", "THREADS"))
    a = p.parse_args()
    if a.child:
        name, model, steps, batch, threads = a.child
        child(name, model, int(steps), int(batch), int(threads))
        return
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results: dict = {"model": a.model, "data": str(DATA.relative_to(ROOT)), "steps": a.steps, "batch": a.batch,
                     "max_length": MAX_LENGTH, "threads": a.threads, "runs": []}
    t0 = time.perf_counter()
    for r in range(a.rounds):
        for name in a.runs.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", name, a.model, str(a.steps), str(a.batch),
                                   str(a.threads)], capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            res = json.loads(line[-1][7:])
            res.update(name=name, round=r)
            results["runs"].append(res)
            print(json.dumps(res), flush=True)
    results["summary"] = summarize(results, a.batch)
    results["bench_seconds"] = time.perf_counter() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
