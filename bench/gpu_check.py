"""GPU paths, checked on a CUDA machine (CI has none, so this is a script, not a test).

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--device cpu]

`--device cpu` runs the same checks on the CPU (without the memory and throughput figures), so the script itself
is exercised where no GPU is lent.

Each check prints one line `PASS|FAIL name: figures` and the JSON file keeps the figures:
- fused LM-head log-probs on CUDA in float32 and bfloat16 against a float64 log_softmax (values and gradients), and
  the peak memory of the fused path against full logits at SmolLM2's vocabulary;
- a bf16 head gives float32 logits (error vs float64 on the same bf16 values), and the fused path's time and peak
  memory against plain log_softmax + gather at V = 49152, T = 2048, B = 1 and 4;
- every policy-loss preset and the SimPO / ORPO / IPO-avg / KTO losses on the device against float64 on the CPU;
- the KV-cache sampler's log-probs against a teacher-forced forward on CUDA;
- shared-prefix rollout scoring against per-sample scoring on CUDA (float32 and bfloat16);
- multi-turn episodes (generation/episodes.py, KV cache continued across observations) against a teacher-forced
  forward on CUDA;
- the SFT, DPO, GRPO and PPO recipes end to end on CUDA in bfloat16 (tiny model), reloading SFT's final/ with plain
  transformers;
- chunked two-head distillation divergences (reverse KL, JSD) on CUDA in float32 and bfloat16 against float64 full
  logits, and on-policy distillation in bfloat16 with the teacher on another device (the CPU);
- the test-time samplers on the device (tiny model, float32): MCMC power sampling with batched KV reuse against the
  re-encoding reference (same chains), scalable power sampling and particle filtering with exact token counts;
- throughput of one SFT and one GRPO step on a SmolLM2-shaped model (random weights: the real ones do not travel to
  the GPU machine) in bfloat16;
- the vLLM backend, when `vllm` is importable (otherwise one SKIP line says how to install it): greedy output equal
  to the own sampler's before and after a weight sync, a 3-step colocated GRPO run with its mismatch and sync-time
  metrics, multi-turn episodes through vLLM (greedy = own sampler, sampled log-probs = teacher-forced forward of the
  whole episode, a 2-step GRPO run with an environment), and on CUDA the generation tokens/s of vLLM vs the own sampler (8/32/128 × 64 tokens) and the weight-sync
  time of a SmolLM2-shaped model;
- SFT and GRPO with parallelism=fsdp2 end to end, and FSDP2 bf16 (fp32 master weights, bf16 compute, fp32 reduction)
  SFT and GRPO steps on the SmolLM2 shape: tokens/s and MFU. World size 1 (nccl on CUDA, gloo on the CPU); the
  2-process paths are tested on the CPU in tests/parallel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SMOL = "tiny:hidden=576,layers=30,heads=9,kv_heads=3,intermediate_size=1536,vocab_size=49152"
RESULTS: dict = {}
DEV = "cuda"


def check(name):
    def wrap(fn):
        def run():
            t = time.perf_counter()
            try:
                ok, figures = fn()
            except Exception as exc:  # noqa: BLE001 - a failed check is reported, the others still run
                ok, figures = False, {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            figures["seconds"] = round(time.perf_counter() - t, 2)
            RESULTS[name] = {"pass": ok, **figures}
            print(f"{'PASS' if ok else 'FAIL'} {name}: " + json.dumps({k: v for k, v in figures.items() if k != "trace"}),
                  flush=True)
            if not ok and "trace" in figures:
                print(figures["trace"], flush=True)
        return run
    return wrap


@check("fused_logps")
def fused_logps():
    from posttrain.ops.logps import logps_from_hidden

    g = torch.Generator(device=DEV).manual_seed(0)
    figures, ok = {}, True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        hidden = (torch.randn(4, 300, 576, device=DEV, generator=g) / 8).to(dtype).requires_grad_()
        weight = (torch.randn(49152, 576, device=DEV, generator=g) / 8).to(dtype).requires_grad_()
        labels = torch.randint(0, 49152, (4, 300), device=DEV, generator=g)
        labels[:, :100] = -100
        got = logps_from_hidden(hidden, weight, labels)
        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref = torch.log_softmax(h64 @ w64.t(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
        err = float((got.detach().double() - ref.detach()).abs().max())
        got.sum().backward()
        ref.sum().backward()
        gerr = max(float((hidden.grad.double() - h64.grad).abs().max() / h64.grad.abs().max()),
                   float((weight.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()))
        name = str(dtype).split(".")[-1]
        figures[f"{name}_max_abs_err"], figures[f"{name}_grad_rel_err"] = err, gerr
        ok &= err < tol and gerr < tol * 10
    if DEV != "cuda":
        return ok, figures
    # memory at B=8, T=1024, V=49152 in bf16: fused vs materialized logits + log_softmax
    hidden = torch.randn(8, 1024, 576, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(49152, 576, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 49152, (8, 1024), device=DEV)
    peaks = {}
    for name in ("fused", "full_logits"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if name == "fused":
            loss = logps_from_hidden(hidden, weight, labels).sum()
        else:
            logits = (hidden @ weight.t()).float()
            loss = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum()
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        hidden.grad = weight.grad = None
        del loss
    figures["peak_extra_mb"] = {k: round(v, 1) for k, v in peaks.items()}
    return ok and peaks["fused"] < peaks["full_logits"] / 4, figures


@check("fused_logps_fp32_head")
def fused_logps_fp32_head():
    """A bf16 head returns float32 logits (no bf16 rounding before the log-softmax); on CUDA also the time and peak
    memory of the fused path against plain log_softmax + gather at V = 49152, T = 2048, B = 1 and 4 (bf16)."""
    from posttrain.ops.logps import logps_at_rows, logps_from_hidden

    g = torch.Generator(device=DEV).manual_seed(3)
    n = 512 if DEV == "cuda" else 64
    hidden = torch.randn(n, 576, device=DEV, generator=g).to(torch.bfloat16)
    weight = (torch.randn(49152, 576, device=DEV, generator=g) / 8).to(torch.bfloat16)
    labels = torch.randint(0, 49152, (n,), device=DEV, generator=g)
    exact = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, labels[:, None]).squeeze(-1)
    err = float((logps_at_rows(hidden, weight, labels).double() - exact).abs().max())
    rounded = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    figures = {"bf16_head_max_abs_err": err, "bf16_rounded_logits_max_abs_err": float((rounded.double() - exact).abs().max())}
    ok = err < 1e-4
    if DEV != "cuda":
        return ok, figures
    for B in (1, 4):
        h = torch.randn(B, 2048, 576, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(49152, 576, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, 49152, (B, 2048), device=DEV)
        for name in ("plain", "fused"):
            def step(name=name, h=h, w=w, y=y):
                if name == "fused":
                    out = logps_from_hidden(h, w, y)
                else:
                    out = torch.log_softmax((h @ w.t()).float(), -1).gather(-1, y[..., None]).squeeze(-1)
                out.sum().backward()
                h.grad = w.grad = None
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            figures[f"B{B}_{name}_ms"] = round((time.perf_counter() - t0) / 5 * 1000, 2)
            figures[f"B{B}_{name}_peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        figures[f"B{B}_time_ratio"] = round(figures[f"B{B}_fused_ms"] / figures[f"B{B}_plain_ms"], 3)
        figures[f"B{B}_memory_ratio"] = round(figures[f"B{B}_fused_peak_extra_mb"] / figures[f"B{B}_plain_peak_extra_mb"], 3)
    return ok, figures


@check("policy_losses")
def policy_losses():
    """Every POLICY_LOSSES preset and the new preference losses give the same value on DEV as in float64 on CPU."""
    from posttrain.losses.dpo import DPO_LOSSES
    from posttrain.losses.kto import kto_loss
    from posttrain.losses.policy import POLICY_LOSSES

    g = torch.Generator().manual_seed(0)
    mask = torch.arange(12)[None] < torch.randint(1, 13, (16,), generator=g)[:, None]
    old = -torch.rand(16, 12, generator=g) * 3
    logps = old + 0.1 * torch.randn(16, 12, generator=g)
    adv = torch.randn(16, generator=g)
    figures, ok = {}, True
    for name, preset in POLICY_LOSSES.items():
        if name == "ppo":
            continue
        cpu = preset(logps.double(), old.double(), adv.double(), mask, group_size=4, max_length=12).loss.item()
        dev = preset(logps.to(DEV), old.to(DEV), adv.to(DEV), mask.to(DEV), group_size=4, max_length=12).loss.item()
        figures[name] = abs(cpu - dev)
        ok &= abs(cpu - dev) < 1e-4
    pc, pr = -torch.rand(8, generator=g) * 20, -torch.rand(8, generator=g) * 20
    nc, nr = torch.randint(1, 20, (8,), generator=g), torch.randint(1, 20, (8,), generator=g)
    for name in ("simpo", "orpo", "ipo_avg"):
        kw = {"beta": 0.1, "chosen_token_counts": nc, "rejected_token_counts": nr}
        cpu = DPO_LOSSES[name](pc.double(), pr.double(), pc.double(), pr.double(), **kw).loss.item()
        kw = {"beta": 0.1, "chosen_token_counts": nc.to(DEV), "rejected_token_counts": nr.to(DEV)}
        dev = DPO_LOSSES[name](pc.to(DEV), pr.to(DEV), pc.to(DEV), pr.to(DEV), **kw).loss.item()
        figures[name] = abs(cpu - dev)
        ok &= abs(cpu - dev) < 1e-4
    desirable = torch.arange(8) % 2 == 0
    cpu = kto_loss(pc.double(), pr.double(), desirable, 0.1).loss.item()
    dev = kto_loss(pc.to(DEV), pr.to(DEV), desirable.to(DEV), 0.1).loss.item()
    figures["kto"] = abs(cpu - dev)
    return ok and abs(cpu - dev) < 1e-5, figures


@check("sampler_logps")
def sampler_logps():
    from posttrain.generation.rollout import rollout_sequences
    from posttrain.generation.sampler import HFGenerator, SamplingParams
    from posttrain.models import tiny_model, tiny_tokenizer
    from posttrain.models.forward import TokenLogps

    model, tok = tiny_model(seed=4).to(DEV), tiny_tokenizer()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello", "a longer prompt", "x")]
    rollouts = HFGenerator(model, tok).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.7, seed=1), n=4)
    batch = rollout_sequences(rollouts, tok.pad_token_id).to(DEV)
    out = TokenLogps(model)(batch.input_ids, batch.labels, batch.position_ids, temperature=0.7)
    err = float((out.logps - batch.gen_logps)[batch.mask].abs().max())
    return err < 1e-4, {"max_abs_err": err, "tokens": int(batch.mask.sum())}


@check("shared_prefix")
def shared_prefix():
    from posttrain.generation.rollout import rollout_sequences
    from posttrain.generation.sampler import HFGenerator, SamplingParams
    from posttrain.models import tiny_model, tiny_tokenizer
    from posttrain.models.forward import TokenLogps

    figures, ok = {}, True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        model, tok = tiny_model(seed=5, dtype=dtype).to(DEV), tiny_tokenizer()
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hi", "a much longer prompt here", "mid")]
        rollouts = HFGenerator(model, tok).generate(prompts, SamplingParams(max_new_tokens=10, seed=3), n=4)
        batch = rollout_sequences(rollouts, tok.pad_token_id)
        fn = TokenLogps(model)
        rows = slice(0, 12)
        packed = batch.shared_prefix(rows, pad_id=0).to(DEV)
        batch = batch.to(DEV)
        ref = fn(batch.input_ids, batch.labels, batch.position_ids).logps
        got = fn.shared_prefix(packed).logps
        err = float((got - ref)[batch.mask].abs().max())
        figures[str(dtype).split(".")[-1]] = err
        ok &= err < tol
    return ok, figures


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sft_rows(n):
    return [{"messages": [{"role": "user", "content": f"What is {i}+{i + 1}?"},
                          {"role": "assistant", "content": f"Answer: {2 * i + 1}"}]} for i in range(n)]


@check("sft_recipe_bf16")
def sft_recipe():
    from transformers import AutoModelForCausalLM

    from posttrain.recipes.sft import SFTConfig, run
    from posttrain.train.logging import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        data = _write(Path(tmp) / "d.jsonl", _sft_rows(64))
        config = SFTConfig(train_file=data, model="tiny", output_dir=f"{tmp}/run", device=DEV, dtype="bfloat16",
                           max_steps=30, lr=3e-3, micro_batch_size=8, packing=False, progress=False, tensorboard=False)
        run(config)
        losses = [m["train/loss"] for m in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "train/loss" in m]
        reloaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/run/final", dtype=torch.bfloat16).to(DEV)
        dtype = str(next(reloaded.parameters()).dtype)
    return losses[-1] < 0.75 * losses[0], {"first_loss": losses[0], "last_loss": losses[-1], "reloaded_dtype": dtype}


@check("dpo_recipe_bf16")
def dpo_recipe():
    from posttrain.recipes.dpo import DPOConfig, run

    rows = [{"prompt": f"Name {i}?", "chosen": "Pico", "rejected": f"Bob{i}"} for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        data = _write(Path(tmp) / "p.jsonl", rows)
        summary = run(DPOConfig(train_file=data, model="tiny", output_dir=f"{tmp}/run", device=DEV,
                                dtype="bfloat16", max_steps=10, lr=3e-3, progress=False, tensorboard=False))
    acc = summary.get("train/rewards/accuracies")
    return acc is not None and acc > 0.5, {k: v for k, v in summary.items() if isinstance(v, float)}


class _CountEnv:
    """Three turns; observations of a length that varies by turn (ragged chunks in the cache)."""

    name = "count"

    def reset(self, row):
        self.t = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        from posttrain.envs import StepResult

        self.t += 1
        return StepResult("Observation: " + "x" * (3 * self.t) + "\n", len(text) / 100, self.t >= 3)


@check("episodes_multi_turn")
def episodes_multi_turn():
    from posttrain.envs.rl import episode_sequences
    from posttrain.generation.episodes import EpisodeBudget, EpisodeSampler
    from posttrain.generation.sampler import SamplingParams
    from posttrain.models import tiny_model, tiny_tokenizer
    from posttrain.models.forward import TokenLogps

    model, tok = tiny_model(init_std=0.25, seed=4).to(DEV), tiny_tokenizer()
    out = EpisodeSampler(model, tok).run(_CountEnv, [{"prompt": "hi"}, {"prompt": "a longer prompt"}],
                                         SamplingParams(max_new_tokens=8, seed=1), n=3,
                                         budget=EpisodeBudget(max_turns=3, max_turn_tokens=8))
    batch = episode_sequences(out, tok.pad_token_id).to(DEV)
    with torch.no_grad():
        logps = TokenLogps(model)(batch.input_ids, batch.labels, batch.position_ids).logps
    err = float((logps - batch.gen_logps)[batch.mask].abs().max())
    obs = sum(len(e.token_ids) - e.model_tokens for e in out.episodes)
    return err < 1e-4 and obs > 0, {"max_abs_err": err, "model_tokens": int(batch.mask.sum()), "obs_tokens": obs}


def _vowels(prompts, completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


@check("grpo_recipe_bf16")
def grpo_recipe():
    from posttrain.recipes.grpo import GRPOConfig, run
    from posttrain.rewards import REWARDS

    REWARDS["vowels"] = lambda: _vowels
    with tempfile.TemporaryDirectory() as tmp:
        data = _write(Path(tmp) / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(32)])
        summary = run(GRPOConfig(train_file=data, model="tiny", rewards=["vowels"], output_dir=f"{tmp}/run",
                                 device=DEV, dtype="bfloat16", num_generations=8, prompts_per_step=4,
                                 max_new_tokens=16, lr=1e-2, max_steps=20, kl_coef=0.05, progress=False,
                                 tensorboard=False, seed=0))
    figures = {k: summary[k] for k in ("reward/mean", "kl", "time/generate", "time/update") if k in summary}
    return summary["reward/mean"] == summary["reward/mean"], figures


@check("ppo_recipe_bf16")
def ppo_recipe():
    from posttrain.recipes.ppo import PPOConfig, run
    from posttrain.rewards import REWARDS

    REWARDS["vowels"] = lambda: _vowels
    with tempfile.TemporaryDirectory() as tmp:
        data = _write(Path(tmp) / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(16)])
        summary = run(PPOConfig(train_file=data, model="tiny", rewards=["vowels"], output_dir=f"{tmp}/run",
                                device=DEV, dtype="bfloat16", prompts_per_step=8, num_generations=2,
                                max_new_tokens=12, lr=1e-3, max_steps=3, progress=False, tensorboard=False))
    figures = {k: summary[k] for k in ("reward/score_mean", "kl/sequence_mean", "value/loss") if k in summary}
    return all(math.isfinite(v) for v in figures.values()) and len(figures) == 3, figures


@check("distill_divergences")
def distill_divergences():
    """Chunked two-head reverse KL / JSD on the device in float32 and bfloat16 against float64 full logits."""
    from posttrain.losses.distill import row_divergence
    from posttrain.ops.distill import divergence_at_rows

    g = torch.Generator().manual_seed(0)
    N, D, V = 300, 64, 4096
    figures, ok = {}, True
    for name, beta in (("reverse_kl", 0.0), ("jsd", 0.5)):
        fn = row_divergence(name, beta)
        h64, w64 = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64) * 0.1
        t64, u64 = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64) * 0.1
        h_ref = h64.clone().requires_grad_(True)
        ref = fn((h_ref @ w64.t()).log_softmax(-1), (t64 @ u64.t()).log_softmax(-1))
        (g_ref,) = torch.autograd.grad(ref.sum(), h_ref)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            h = h64.to(DEV, dtype).requires_grad_(True)
            out = divergence_at_rows(h, w64.to(DEV, dtype), t64.to(DEV, dtype), u64.to(DEV, dtype), fn, chunk_size=64)
            (grad,) = torch.autograd.grad(out.sum(), h)
            err = max(float((out.double().cpu() - ref.detach()).abs().max() / ref.abs().max()),
                      float((grad.double().cpu() - g_ref).abs().max() / g_ref.abs().max()))
            figures[f"{name}_{str(dtype).split('.')[-1]}_rel_err"] = err
            ok &= err < tol
    return ok, figures


@check("distill_recipe_bf16_teacher_on_cpu")
def distill_recipe():
    """On-policy reverse-KL distillation in bfloat16 with the teacher on another device (the CPU)."""
    from posttrain.models import tiny_model, tiny_tokenizer
    from posttrain.recipes.distill import DistillConfig, run
    from posttrain.train.logging import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        teacher = tiny_model(seed=1, init_std=0.3)
        teacher.save_pretrained(f"{tmp}/teacher")
        tiny_tokenizer().save_pretrained(f"{tmp}/teacher")
        data = _write(Path(tmp) / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(16)])
        run(DistillConfig(train_file=data, eval_file=data, eval_size=8, model="tiny", teacher=f"{tmp}/teacher",
                          teacher_device="cpu", rewards=[], output_dir=f"{tmp}/run", device=DEV, dtype="bfloat16",
                          prompts_per_step=8, max_new_tokens=12, lr=1e-2, max_steps=12, progress=False,
                          tensorboard=False, seed=3))
        evals = [m for m in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "eval/reverse_kl_token" in m]
    first, last = evals[0]["eval/reverse_kl_token"], evals[-1]["eval/reverse_kl_token"]
    return last < first, {"reverse_kl_token_start": first, "reverse_kl_token_end": last}


@check("smollm2_shape_throughput_bf16")
def throughput():
    from posttrain.generation.rollout import rollout_sequences
    from posttrain.generation.sampler import HFGenerator, SamplingParams
    from posttrain.models.forward import TokenLogps
    from posttrain.models.loading import load_model
    from posttrain.train.optim import build_optimizer

    model, tok = load_model(SMOL, dtype="bfloat16", device=DEV)
    model.train()
    opt = build_optimizer(model.parameters(), lr=1e-5)
    fn = TokenLogps(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (8, 512), generator=g).to(DEV)
    labels = ids.clone()
    labels[:, :128] = -100

    def sft_step():
        (-fn(ids, labels).logps.sum() / 3072).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        sft_step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        sft_step()
    torch.cuda.synchronize()
    sft_s = (time.perf_counter() - t) / 5
    # one GRPO-shaped step: 8 prompts x 8 samples x 128 new tokens, then a shared-prefix update
    prompts = [torch.randint(0, 259, (100,), generator=g).tolist() for _ in range(8)]
    gen = HFGenerator(model, tok)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.eval()
    rollouts = gen.generate(prompts, SamplingParams(max_new_tokens=128, seed=0, stop_token_ids=()), n=8)
    torch.cuda.synchronize()
    gen_s = time.perf_counter() - t
    model.train()
    batch = rollout_sequences(rollouts, 0)
    t = time.perf_counter()
    for i in range(0, 64, 16):
        packed = batch.shared_prefix(slice(i, i + 16), pad_id=0).to(DEV)
        (-fn.shared_prefix(packed).logps.sum() / 8192).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    upd_s = time.perf_counter() - t
    return True, {"sft_tokens_per_s_8x512": round(8 * 512 / sft_s), "grpo_generate_s_64x128": round(gen_s, 2),
                  "grpo_update_s_64": round(upd_s, 2), "generated_tokens": int(rollouts.completion_mask.sum()),
                  "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


VLLM_TINY = dict(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128, init_std=0.25)


def vllm_checks() -> None:
    """The vLLM engine (generation/vllm_engine.py): skipped with a message when `vllm` is not importable."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        msg = ("vllm is not importable here; install it (pip install -e '.[vllm-cuda]' on CUDA, '.[vllm]' on a CPU) "
               "to check the vLLM backend")
        RESULTS["vllm"] = {"pass": None, "skipped": msg}
        print(f"SKIP vllm: {msg}", flush=True)
        return
    vllm_exactness()
    vllm_grpo()
    vllm_episodes()
    if DEV == "cuda":
        vllm_throughput()


@check("vllm_exactness_and_sync")
def vllm_exactness():
    """Greedy vLLM = own sampler token for token (fp32), before and after a weight sync; max |Δ log p|."""
    from posttrain.generation.backends import save_policy
    from posttrain.generation.sampler import HFGenerator, SamplingParams
    from posttrain.generation.vllm_engine import VLLMEngine
    from posttrain.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(**VLLM_TINY).to(DEV)
    prompts = [tok(t)["input_ids"] for t in ("hello world", "abc", "The quick brown fox")]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    figures, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        save_policy(model, tok, tmp)
        engine = VLLMEngine(tmp, tokenizer=tok, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
                            kv_cache_gib=0.125)
        for phase in ("before", "after"):
            if phase == "after":
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.05)
                figures["sync_s"] = round(engine.sync(model), 4)
            a = engine.generate(prompts, params)
            b = HFGenerator(model, tok).generate(prompts, params)
            same = a.token_lists() == b.token_lists()
            gap = float((a.logps - b.logps.to(a.logps.device)).abs().max()) if same else float("nan")
            figures[f"greedy_equal_{phase}"], figures[f"max_abs_dlogp_{phase}"] = same, gap
            ok = ok and same and gap < 1e-3
        engine.close()
    return ok, figures


@check("vllm_grpo_colocate")
def vllm_grpo():
    from posttrain.recipes.grpo import GRPOConfig, run
    from posttrain.rewards import REWARDS
    from posttrain.train.logging import read_metrics

    REWARDS["vowels"] = lambda: _vowels
    with tempfile.TemporaryDirectory() as tmp:
        data = _write(Path(tmp) / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(8)])
        run(GRPOConfig(train_file=data, model="tiny:hidden=64,heads=2,kv_heads=1,intermediate_size=128",
                       rewards=["vowels"], output_dir=f"{tmp}/run", device=DEV, num_generations=4,
                       prompts_per_step=2, max_new_tokens=8, max_steps=3, lr=1e-2, progress=False,
                       zero_variance_filter=False,
                       tensorboard=False, generation_backend="vllm", vllm_gpu_memory_utilization=0.3,
                       vllm_kv_cache_gib=0.125))
        rows = read_metrics(f"{tmp}/run/metrics.jsonl")
    last = rows[-1]
    figures = {k: last[k] for k in ("mismatch/logp_abs_mean", "mismatch/logp_abs_max", "mismatch/seq_ratio_mean",
                                    "time/weight_sync", "time/generate", "time/step") if k in last}
    return len(rows) == 3 and last.get("mismatch/logp_abs_max", 1.0) < 1e-2, figures


@check("vllm_episodes_multi_turn")
def vllm_episodes():
    """Multi-turn episodes through vLLM (token ids in, prefix cache): greedy = own sampler token for token and mask for
    mask; sampled episodes' log-probs = a teacher-forced forward of the whole episode; GRPO env=... on vLLM runs."""
    from posttrain.envs.rl import episode_sequences
    from posttrain.generation.backends import save_policy
    from posttrain.generation.engine_episodes import EngineEpisodeSampler
    from posttrain.generation.episodes import EpisodeBudget, EpisodeSampler
    from posttrain.generation.sampler import SamplingParams
    from posttrain.generation.vllm_engine import VLLMEngine
    from posttrain.models import tiny_model, tiny_tokenizer
    from posttrain.models.forward import TokenLogps
    from posttrain.recipes.grpo import GRPOConfig, run
    from posttrain.train.logging import read_metrics

    tok = tiny_tokenizer()
    model = tiny_model(**VLLM_TINY).to(DEV)
    rows = [{"prompt": "hi"}, {"prompt": "a longer prompt"}]
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=8)
    figures, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        save_policy(model, tok, tmp)
        engine = VLLMEngine(tmp, tokenizer=tok, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
                            kv_cache_gib=0.125)
        greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
        a = EngineEpisodeSampler(engine, tok).run(_CountEnv, rows, greedy, n=2, budget=budget)
        b = EpisodeSampler(model, tok).run(_CountEnv, rows, greedy, n=2, budget=budget)
        same = all(x.token_ids == y.token_ids and x.model_mask == y.model_mask for x, y in zip(a.episodes, b.episodes))
        out = EngineEpisodeSampler(engine, tok).run(_CountEnv, rows, SamplingParams(max_new_tokens=8, seed=1), n=3,
                                                    budget=budget)
        batch = episode_sequences(out, tok.pad_token_id).to(DEV)
        with torch.no_grad():
            logps = TokenLogps(model)(batch.input_ids, batch.labels, batch.position_ids).logps
        err = float((logps - batch.gen_logps)[batch.mask].abs().max())
        engine.close()
        figures.update(greedy_equal=same, max_abs_dlogp_sampled=err)
        ok = same and err < 1e-3
        env_file = Path(tmp) / "count_env.py"
        env_file.write_text("from posttrain.envs import StepResult\n"
                            "class Env:\n    def reset(self, row):\n        self.t = 0\n"
                            "        return [{'role': 'user', 'content': row['prompt']}]\n"
                            "    def step(self, text):\n        self.t += 1\n"
                            "        return StepResult('Observation: more\\n', sum(c in 'aeiou' for c in text) / "
                            "max(len(text), 1), self.t >= 2)\n")
        data = _write(Path(tmp) / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(8)])
        run(GRPOConfig(train_file=data, model="tiny:hidden=64,heads=2,kv_heads=1,intermediate_size=128",
                       output_dir=f"{tmp}/run", device=DEV, num_generations=4, prompts_per_step=2, max_new_tokens=8,
                       max_steps=2, lr=1e-2, progress=False, tensorboard=False, env=f"{env_file}:Env", max_turns=2,
                       max_episode_tokens=64, generation_backend="vllm", vllm_gpu_memory_utilization=0.3,
                       vllm_kv_cache_gib=0.125, zero_variance_filter=False))
        last = [r for r in read_metrics(f"{tmp}/run/metrics.jsonl") if "reward/mean" in r][-1]
    figures.update({k: last[k] for k in ("mismatch/logp_abs_max", "env/turns", "time/generate") if k in last})
    return ok and last.get("mismatch/logp_abs_max", 1.0) < 1e-2 and last.get("env/turns") == 2.0, figures


@check("vllm_throughput_and_sync_smollm2_shape")
def vllm_throughput():
    """Tokens/s of vLLM vs the own sampler at 8/32/128 sequences × 64 tokens (bf16), and the weight-sync time of
    a SmolLM2-shaped model (random weights: the real ones do not travel to the GPU machine)."""
    from posttrain.generation.backends import save_policy
    from posttrain.generation.sampler import HFGenerator, SamplingParams
    from posttrain.generation.vllm_engine import VLLMEngine
    from posttrain.models import load_model

    model, tok = load_model(SMOL, dtype="bfloat16", device=DEV)
    model.eval()
    prompts = [tok(f"question {i}: what is {i} + {i}?")["input_ids"] for i in range(16)]
    params = SamplingParams(max_new_tokens=64, temperature=1.0, stop_token_ids=(), seed=0)
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_policy(model, tok, tmp)
        engine = VLLMEngine(tmp, tokenizer=tok, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3)
    ours = HFGenerator(model, tok)
    for n_seq in (8, 32, 128):
        for name, gen in (("own", ours), ("vllm", engine)):
            gen.generate(prompts[:1], params, n=2)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = gen.generate(prompts[:n_seq // 8], params, n=8)
            torch.cuda.synchronize()
            figures[f"{name}_tok_s_{n_seq}"] = round(out.generated_tokens / (time.perf_counter() - t), 1)
        figures[f"vllm_over_own_{n_seq}"] = round(figures[f"vllm_tok_s_{n_seq}"] / figures[f"own_tok_s_{n_seq}"], 2)
    figures["weight_sync_s"] = round(min(engine.sync(model) for _ in range(3)), 4)
    engine.close()
    return True, figures
def _process_group() -> None:
    """A one-process group as torchrun would set it up (nccl on CUDA, gloo on the CPU), so fsdp2 runs here."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
    if DEV == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if DEV == "cuda" else "gloo")


@check("fsdp2_recipes")
def fsdp2_recipes():
    """SFT and GRPO end to end with parallelism=fsdp2 (bf16 compute, fp32 master weights and reduction on CUDA)."""
    from posttrain.recipes.grpo import GRPOConfig
    from posttrain.recipes.grpo import run as grpo_run
    from posttrain.recipes.sft import SFTConfig
    from posttrain.recipes.sft import run as sft_run
    from posttrain.rewards import REWARDS
    from posttrain.train.logging import read_metrics

    _process_group()
    REWARDS["vowels"] = lambda: _vowels
    with tempfile.TemporaryDirectory() as tmp:
        data = _write(Path(tmp) / "d.jsonl", _sft_rows(64))
        sft_run(SFTConfig(train_file=data, model="tiny", output_dir=f"{tmp}/sft", device=DEV, parallelism="fsdp2",
                          max_steps=30, lr=3e-3, micro_batch_size=8, packing=False, progress=False, tensorboard=False))
        losses = [m["train/loss"] for m in read_metrics(Path(tmp) / "sft" / "metrics.jsonl") if "train/loss" in m]
        prompts = _write(Path(tmp) / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(32)])
        summary = grpo_run(GRPOConfig(train_file=prompts, model="tiny", rewards=["vowels"], output_dir=f"{tmp}/grpo",
                                      device=DEV, parallelism="fsdp2", num_generations=8, prompts_per_step=4,
                                      max_new_tokens=16, lr=1e-2, max_steps=5, kl_coef=0.05, temperature=0.7,
                                      progress=False, tensorboard=False, seed=0))
        first_kl = next(m for m in read_metrics(Path(tmp) / "grpo" / "metrics.jsonl") if "kl" in m)["kl"]
        layout = json.loads(next((Path(tmp) / "grpo" / "checkpoints").iterdir()).joinpath("layout.json").read_text())
    ok = losses[-1] < 0.75 * losses[0] and summary["reward/mean"] == summary["reward/mean"] and layout["format"] == "dcp"
    return ok, {"sft_first_loss": losses[0], "sft_last_loss": losses[-1], "grpo_reward_mean": summary["reward/mean"],
                "grpo_kl_step1": first_kl}


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def _mfu(flops_per_s: float) -> float | None:
    if DEV != "cuda":
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return round(flops_per_s / peak, 4) if peak else None


@check("fsdp2_throughput_bf16")
def fsdp2_throughput():
    """One SFT step and one GRPO step (generate + shared-prefix update) on a SmolLM2-shaped model under FSDP2 with
    bf16 compute: tokens/s and MFU (6·N·tokens + attention FLOPs over the GPU's dense bf16 peak). On the CPU a small
    model and short sequences keep the check quick; its figures are not meant to be compared."""
    from posttrain.generation.sampler import HFGenerator, SamplingParams
    from posttrain.models.forward import TokenLogps
    from posttrain.models.loading import load_model
    from posttrain.train.distributed import Dist
    from posttrain.train.optim import build_optimizer
    from posttrain.train.parallel import gathered, parallelize

    _process_group()
    spec, T, P, new = (SMOL, 512, 100, 128) if DEV == "cuda" else ("tiny:hidden=64,layers=2", 64, 16, 16)
    model, tok = load_model(spec, dtype="float32", device=DEV)  # fp32 master weights; bf16 compute via the policy
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    d = Dist(device=torch.device(DEV if DEV == "cpu" else "cuda:0"), parallelism="fsdp2", mixed_precision=True)
    fn = parallelize(TokenLogps(model), d)
    opt = build_optimizer(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (8, T), generator=g).to(DEV)
    labels = ids.clone()
    labels[:, : T // 4] = -100

    def flops(tokens: int, seq: int) -> float:
        return 6 * n_params * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq * tokens

    def sync():
        if DEV == "cuda":
            torch.cuda.synchronize()

    def sft_step():
        (-fn(ids, labels).logps.sum() / ids.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        sft_step()
    sync()
    t = time.perf_counter()
    steps = 5 if DEV == "cuda" else 2
    for _ in range(steps):
        sft_step()
    sync()
    sft_s = (time.perf_counter() - t) / steps
    sft_tps = ids.numel() / sft_s
    prompts = [torch.randint(0, 259, (P,), generator=g).tolist() for _ in range(8)]
    gen = HFGenerator(model, tok)
    sync()
    t = time.perf_counter()
    with gathered(fn):
        rollouts = gen.generate(prompts, SamplingParams(max_new_tokens=new, seed=0, stop_token_ids=()), n=8)
    sync()
    gen_s = time.perf_counter() - t
    from posttrain.generation.rollout import rollout_sequences

    batch = rollout_sequences(rollouts, 0)
    t = time.perf_counter()
    for i in range(0, 64, 16):
        packed = batch.shared_prefix(slice(i, i + 16), pad_id=0).to(DEV)
        (-fn(packed=packed).logps.sum() / 8192).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    upd_s = time.perf_counter() - t
    trained = int(packed.input_ids.numel()) * 4  # packed rows of the 4 micro-batches (about equal)
    generated = int(rollouts.completion_mask.sum())
    figures = {"model_params_m": round(n_params / 1e6, 1), "sft_tokens_per_s": round(sft_tps),
               "sft_mfu": _mfu(flops(ids.numel(), T) / sft_s), "grpo_generated_tokens_per_s": round(generated / gen_s),
               "grpo_update_tokens_per_s": round(trained / upd_s), "grpo_update_mfu": _mfu(flops(trained, P + new) / upd_s)}
    if DEV == "cuda":
        figures["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return sft_tps > 0 and generated > 0, figures
@check("ttc_samplers")
def ttc_samplers():
    from posttrain.models import tiny_model
    from posttrain.ttc.particles import ParticleFilter, ParticleParams
    from posttrain.ttc.power import PowerParams, PowerSampler
    from posttrain.ttc.scalable_power import ScalablePowerParams, ScalablePowerSampler

    model = tiny_model(seed=0, init_std=0.25).to(DEV).eval()
    prompts = [[5, 9, 13], [7, 2], [11, 4, 6, 8]]
    params = PowerParams(alpha=4.0, max_new_tokens=12, block_size=4, mcmc_steps=2, seed=1)
    cached = PowerSampler(model, eos_token_ids=[3], batch_size=6).generate(prompts, params, n=2)
    naive = PowerSampler(model, eos_token_ids=[3], reuse_cache=False).generate(prompts, params, n=2)
    a = [s.token_ids for row in cached.samples for s in row]
    b = [s.token_ids for row in naive.samples for s in row]
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    sps = ScalablePowerSampler(model, eos_token_ids=[3]).generate(
        prompts, ScalablePowerParams(alpha=4.0, max_new_tokens=8, top_k=3, rollouts=2, horizon=0, seed=2), n=2)
    sps_exact = sps.forward_tokens == sum(len(p) * 2 for p in prompts) + sum(
        len(t) for row in sps.token_ids for t in row)
    sps2 = ScalablePowerSampler(model, eos_token_ids=[3]).generate(
        prompts, ScalablePowerParams(alpha=4.0, max_new_tokens=8, top_k=3, rollouts=2, horizon=3, seed=2), n=2)
    pf = ParticleFilter(model, eos_token_ids=[3]).generate(
        prompts, lambda p, c: [0.0] * len(c),
        ParticleParams(num_particles=4, max_new_tokens=8, step_tokens=3, resample="ess", seed=3))
    pf_exact = pf.forward_tokens == sum(len(p) * 4 for p in prompts) + sum(
        len(t) for r in pf.results for t in r.token_ids)
    ok = same >= 0.9 and sps_exact and pf_exact and sps2.rollout_tokens > 0
    return ok, {"power_identical_chains": same, "power_forward_tokens": cached.forward_tokens,
                "reencode_forward_tokens": naive.forward_tokens, "scalable_counts_exact": sps_exact,
                "scalable_rollout_tokens": sps2.rollout_tokens, "particles_counts_exact": pf_exact}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args()
    global DEV
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths (use --device cpu to run it on the CPU)")
    RESULTS["device"] = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    RESULTS["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    print(RESULTS["device"], RESULTS["versions"], flush=True)
    checks = [fused_logps, fused_logps_fp32_head, policy_losses, sampler_logps, shared_prefix, episodes_multi_turn,
              sft_recipe, dpo_recipe, grpo_recipe, ppo_recipe, fsdp2_recipes, fsdp2_throughput, ttc_samplers,
              distill_divergences, distill_recipe]
    for fn in checks + ([throughput] if DEV == "cuda" else []):
        fn()
    vllm_checks()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(RESULTS, indent=2) + "\n")
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and v.get("pass") is False]
    print("failed:", failed or "none")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
