"""SFT throughput and peak memory: posttrain vs TRL's SFTTrainer, same model, data and settings, in one run.

    python bench/bench_sft.py [--model smollm2-135m-instruct] [--examples 96] [--rounds 2]

Data: variable-length prompt/completion conversations (reasoning-gym chain_sum and leg_counting questions with
answers padded by a variable amount of working), tokenized by both sides with the model's chat template and loss on
the completion only. Both sides train one epoch over the same examples, batch 8, max_length 256, AdamW lr 1e-5, fp32
on CPU, in separate subprocesses run alternately (posttrain, TRL, posttrain, TRL, ...) so background load hits both.
Throughput = examples / seconds of the training loop (model loading excluded); both sides see the same examples, so
this is the like-for-like figure (the sides' token counts differ slightly with their templates; both are reported). Memory = peak RSS of
the process (ru_maxrss), which includes the model, optimizer state and activations.
Modes (each side alternately, same data):
- `unpacked`: one example per batch slot. posttrain lays a micro-batch's 8 examples padding-free (as few rows as hold
  the longest one, positions restarting per example), TRL pads each to the batch's longest. Same examples per step,
  same loss. No gradient checkpointing on either side.
- `unpacked_padded`: as `unpacked` but posttrain pads too (padding_free=false): the layouts are identical.
- `unpacked_gc`: as `unpacked` with gradient checkpointing on both sides (TRL's SFTConfig default).
- `packed`: posttrain's packing vs TRL's packing=True (bfd), no gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from common import model_folder


def make_rows(n: int, seed: int = 0) -> list[dict]:
    import reasoning_gym as rg

    rng = random.Random(seed)
    sums = rg.create_dataset("chain_sum", size=n, seed=seed, min_terms=2, max_terms=5, min_digits=1, max_digits=3)
    legs = rg.create_dataset("leg_counting", size=n, seed=seed)
    rows = []
    for i in range(n):
        entry = sums[i] if i % 2 == 0 else legs[i]
        work = " ".join(f"Step {k + 1}: keep the running total." for k in range(rng.randint(0, 12)))
        rows.append({"prompt": [{"role": "user", "content": entry["question"]}],
                     "completion": [{"role": "assistant", "content": f"{work}\nAnswer: {entry['answer']}".strip()}]})
    return rows


MODES = {  # name: (packing, gradient checkpointing, posttrain padding_free)
    "unpacked": (False, False, True),
    "unpacked_padded": (False, False, False),
    "unpacked_gc": (False, True, True),
    "packed": (True, False, True),
}


def run_posttrain(data: Path, model: str, mode: str, out: Path) -> dict:
    from posttrain.recipes.sft import SFTConfig, run

    packing, gc, padding_free = MODES[mode]
    config = SFTConfig(train_file=str(data), model=model, output_dir=str(out / "pt"), max_length=256, packing=packing,
                       micro_batch_size=8, epochs=1.0, lr=1e-5, progress=False, tensorboard=False, logging_steps=1000,
                       max_grad_norm=1.0, gradient_checkpointing=gc, padding_free=padding_free)
    summary = run(config)
    return {"tokens": summary["train/tokens"], "seconds": summary["train/loop_seconds"]}


def run_trl(data: Path, model: str, mode: str, out: Path) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.models.loading import resolve

    packing, gc, _ = MODES[mode]
    path = str(resolve(model))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    args = SFTConfig(output_dir=str(out / "trl"), per_device_train_batch_size=8, max_length=256, packing=packing,
                     num_train_epochs=1, learning_rate=1e-5, use_cpu=True, bf16=False, report_to="none",
                     save_strategy="no", logging_steps=1000, max_grad_norm=1.0, lr_scheduler_type="cosine",
                     warmup_steps=0, dataloader_num_workers=0, disable_tqdm=True,
                     gradient_checkpointing=gc)
    trainer = SFTTrainer(model=path, args=args, train_dataset=ds, callbacks=[clock])
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    trainer.train()
    return {"tokens": tokens, "seconds": clock.seconds}


def child(side: str, data: str, model: str, mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_posttrain if side == "posttrain" else run_trl
        result = fn(Path(data), model, mode, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--examples", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sft.json"))
    p.add_argument("--child", nargs=4, metavar=("SIDE", "DATA", "MODEL", "MODE"))
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(a.examples)))
    a.model = model_folder(a.model, tmp)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    results: dict = {"model": a.model, "examples": a.examples, "batch": 8, "max_length": 256, "runs": []}
    for mode in a.modes.split(","):
        for r in range(a.rounds):
            for side in ("posttrain", "trl"):
                proc = subprocess.run([sys.executable, __file__, "--child", side, str(data), a.model, mode],
                                      capture_output=True, text=True, env=env)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    raise SystemExit(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                res = json.loads(line[-1][7:])
                res.update(side=side, mode=mode, round=r, tokens_per_s=res["tokens"] / res["seconds"],
                           examples_per_s=a.examples / res["seconds"])
                results["runs"].append(res)
                print(json.dumps(res), flush=True)
    summary = {}
    for mode in a.modes.split(","):
        rows = [x for x in results["runs"] if x["mode"] == mode]
        best = {s: max(x["examples_per_s"] for x in rows if x["side"] == s) for s in ("posttrain", "trl")}
        mem = {s: max(x["peak_rss_mb"] for x in rows if x["side"] == s) for s in ("posttrain", "trl")}
        tok = {s: max(x["tokens_per_s"] for x in rows if x["side"] == s) for s in ("posttrain", "trl")}
        summary[mode] = {"posttrain_examples_per_s": best["posttrain"], "trl_examples_per_s": best["trl"],
                         "posttrain_tokens_per_s": tok["posttrain"], "trl_tokens_per_s": tok["trl"],
                         "throughput_ratio": best["posttrain"] / best["trl"], "posttrain_peak_rss_mb": mem["posttrain"],
                         "trl_peak_rss_mb": mem["trl"], "memory_ratio": mem["posttrain"] / mem["trl"]}
    results["summary"] = summary
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
