"""PPO recipe on a tiny model: learns a learnable reward with the KL in the reward; critic and layout checks."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_grpo import letters_reward

from posttrain.generation.rollout import completion_view, rollout_sequences
from posttrain.generation.sampler import HFGenerator, SamplingParams
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.models.value import ValueModel
from posttrain.recipes.ppo import PPOConfig, run
from posttrain.rewards import REWARDS
from posttrain.train.logging import read_metrics


def test_completion_view_recovers_sampler_logps():
    model, tok = tiny_model(seed=5), tiny_tokenizer()
    prompts = [tok("hi", add_special_tokens=False)["input_ids"], tok("hello there", add_special_tokens=False)["input_ids"]]
    rollouts = HFGenerator(model, tok).generate(prompts, SamplingParams(max_new_tokens=5, seed=3), n=2)
    batch = rollout_sequences(rollouts, tok.pad_token_id)
    view = completion_view(batch.gen_logps, batch)
    T = view.shape[1]
    torch.testing.assert_close(view, rollouts.logps[:, :T].float() * rollouts.completion_mask[:, :T])


def test_value_model_starts_at_zero_and_is_trainable():
    critic = ValueModel.from_causal_lm(tiny_model(seed=6))
    ids = torch.randint(0, 259, (2, 7))
    values = critic(ids, torch.arange(7).expand(2, 7))
    assert values.shape == (2, 7) and torch.count_nonzero(values) == 0
    values.sum().backward()
    assert critic.head.weight.grad.abs().sum() > 0


def test_ppo_raises_a_learnable_reward(tmp_path, monkeypatch):
    monkeypatch.setitem(REWARDS, "letters", lambda: letters_reward)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something #{i}"}) + "\n" for i in range(16)))
    config = PPOConfig(train_file=str(prompts), model="tiny", rewards=["letters"], output_dir=str(tmp_path / "run"),
                       prompts_per_step=8, num_generations=2, max_new_tokens=8, minibatch_size=8, ppo_epochs=2,
                       lr=5e-3, critic_lr=5e-3, kl_coef=0.01, max_steps=20, progress=False, tensorboard=False)
    run(config)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/score_mean" in r]
    first = sum(r["reward/score_mean"] for r in rows[:4]) / 4
    last = sum(r["reward/score_mean"] for r in rows[-4:]) / 4
    assert first < 0.25 and last > first + 0.2, (first, last)
    for key in ("kl/sequence_mean", "value/loss", "value/explained_variance", "policy/clip_frac", "time/generate"):
        assert key in rows[-1]
    assert rows[0]["kl/sequence_mean"] == pytest.approx(0.0, abs=1e-6)  # first rollout: policy == reference
    assert (tmp_path / "run" / "checkpoints" / "step-00000020" / "critic.safetensors").exists()


def test_ppo_in_bfloat16_keeps_a_float32_value_head(tmp_path, monkeypatch):
    monkeypatch.setitem(REWARDS, "letters", lambda: letters_reward)
    critic = ValueModel.from_causal_lm(tiny_model(seed=6, dtype=torch.bfloat16))
    values = critic(torch.randint(0, 259, (2, 5)))
    assert values.dtype == torch.float32 and critic.head.weight.dtype == torch.float32
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something #{i}"}) + "\n" for i in range(4)))
    config = PPOConfig(train_file=str(prompts), model="tiny", rewards=["letters"], output_dir=str(tmp_path / "run"),
                       prompts_per_step=4, num_generations=2, max_new_tokens=6, dtype="bfloat16", max_steps=2,
                       lr=1e-3, progress=False, tensorboard=False)
    run(config)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "value/loss" in r]
    assert len(rows) == 2 and all(r["value/loss"] == r["value/loss"] for r in rows)  # finite, not NaN
