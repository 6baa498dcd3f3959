"""The new policy losses through the GRPO recipe: micro-batching does not change the update (μ = 2, so the second
pass has ratios ≠ 1 and the clips / gates / masks are live), and each preset's keys reach its loss."""

import json
from pathlib import Path

import pytest
import torch

from posttrain.recipes.grpo import GRPOConfig, loss_options, run
from posttrain.rewards import REWARDS
from posttrain.train.logging import read_metrics

LETTERS = set("abcdefghijklmnopqrstuvwxyz")


@pytest.fixture
def letters(monkeypatch):
    monkeypatch.setitem(REWARDS, "letters", lambda: (
        lambda prompts, completions, **kw: [sum(c in LETTERS for c in x) / max(len(x), 1) for x in completions]))


def _config(tmp_path, name, **kw):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something #{i}"}) + "\n" for i in range(8)))
    base = {"train_file": str(prompts), "model": "tiny", "rewards": ["letters"], "output_dir": str(tmp_path / name),
                "num_generations": 8, "prompts_per_step": 4, "max_new_tokens": 8, "lr": 2e-3, "max_steps": 1, "updates_per_batch": 2,
                "max_grad_norm": 0.0, "progress": False, "tensorboard": False, "seed": 0, "eval_size": 0}
    base.update(kw)
    return GRPOConfig(**base)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.mark.parametrize("loss", ["gspo", "sapo", "dppo_tv", "dppo_kl", "rloo"])
def test_micro_batching_does_not_change_the_update(tmp_path, letters, loss):
    extra = {"epsilon_low": 0.05, "epsilon_high": 0.05} if loss == "gspo" else {}  # a band the 2nd pass can leave
    a = run(_config(tmp_path, "full", loss=loss, micro_batch_size=32, **extra))
    b = run(_config(tmp_path, "micro", loss=loss, micro_batch_size=8, **extra))
    wa, wb = _weights(a["final_dir"]), _weights(b["final_dir"])
    # Adam divides by √v: an element whose gradient nearly cancels (~1e-8) turns float-level differences of the
    # split into steps of ~1e-5 (lr 2e-3); the per-step loss below is the sharp check
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-3)
    ra = next(r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "train/loss" in r)
    rb = next(r for r in read_metrics(tmp_path / "micro" / "metrics.jsonl") if "train/loss" in r)
    assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5, abs=1e-6)
    assert ra["ratio/max"] != 1.0 or ra["ratio/min"] != 1.0  # the second pass was off-policy


def test_loss_options_pass_each_presets_keys(tmp_path):
    opts = loss_options(_config(tmp_path, "x", loss="sapo", tau_pos=0.5, tau_neg=2.0, epsilon_low=0.1))
    assert opts["tau_pos"] == 0.5 and opts["tau_neg"] == 2.0 and "epsilon_low" not in opts
    opts = loss_options(_config(tmp_path, "x", loss="dppo_tv", delta_low=0.1, delta_high=0.2))
    assert opts["delta_low"] == 0.1 and opts["delta_high"] == 0.2
    opts = loss_options(_config(tmp_path, "x", loss="gspo", epsilon_high=1e-3))
    assert opts["epsilon_high"] == 1e-3 and "tau_pos" not in opts
