"""Episodes in the RL update: observation tokens get zero gradient and do not count in the normaliser; GRPO runs
multi-turn episodes with an environment named on the command line."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.envs import StepResult
from posttrain.envs.rl import episode_rewards, episode_sequences
from posttrain.generation.episodes import EpisodeBudget, EpisodeSampler
from posttrain.generation.sampler import SamplingParams
from posttrain.losses.policy import POLICY_LOSSES, GlobalCounts
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.models.forward import TokenLogps
from posttrain.train.logging import read_metrics


class TwoTurns:
    name = "two_turns"

    def reset(self, row):
        self.t = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.t += 1
        letters = sum(c.isalpha() and c.islower() for c in text) / max(len(text), 1)
        return StepResult("Observation: ok, go on\n", letters, self.t >= 2, {"verifier": float(letters > 0.5)})


def _episodes(G=3):
    model, tok = tiny_model(init_std=0.25, seed=2), tiny_tokenizer()
    out = EpisodeSampler(model, tok).run(TwoTurns, [{"prompt": "hello"}, {"prompt": "say more words"}],
                                         SamplingParams(max_new_tokens=5, seed=3), n=G,
                                         budget=EpisodeBudget(max_turns=2, max_turn_tokens=5))
    return model, tok, out


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_observation_tokens_get_zero_gradient_and_no_normaliser_count(loss):
    model, tok, out = _episodes()
    batch = episode_sequences(out, tok.pad_token_id)
    model_tokens = [e.model_tokens for e in out.episodes]
    obs_tokens = [len(e.token_ids) - e.model_tokens for e in out.episodes]
    assert all(o > 0 for o in obs_tokens)
    counts = GlobalCounts.from_mask(batch.mask, 3)
    assert counts.tokens == sum(model_tokens)  # observations are not counted
    logps = TokenLogps(model)(batch.input_ids, batch.labels, batch.position_ids).logps.detach().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    result = POLICY_LOSSES[loss](logps, logps.detach(), adv, batch.mask, counts=counts, group_size=3)
    result.loss.backward()
    grad = logps.grad
    # ratio = 1: dL/dlogp_t = -A_i · w_i with w_i = 1/(|y_i| · N) ("sample", GRPO) or 1/Σ|y| ("token", DAPO), where
    # |y_i| counts the model's tokens only
    for i, e in enumerate(out.episodes):
        P = len(e.prompt_ids)
        w = 1 / (model_tokens[i] * len(model_tokens)) if loss == "grpo" else 1 / sum(model_tokens)
        for t, m in enumerate(e.model_mask):
            expected = -float(adv[i]) * w if m else 0.0
            assert abs(float(grad[i, P - 1 + t]) - expected) < 1e-7, (i, t, m)
    # nothing outside the episode's model tokens gets gradient
    assert int((grad != 0).sum()) == sum(model_tokens)


def test_shared_prefix_scoring_of_episodes_equals_per_row_forward():
    model, tok, out = _episodes()
    batch = episode_sequences(out, tok.pad_token_id)
    fn = TokenLogps(model)
    rows = slice(0, len(batch))
    packed = fn.shared_prefix(batch.shared_prefix(rows, pad_id=0))
    plain = fn(batch.input_ids, batch.labels, batch.position_ids)
    torch.testing.assert_close(packed.logps[batch.mask], plain.logps[batch.mask], atol=1e-5, rtol=0)
    rewards, verifier = episode_rewards(out)
    assert rewards.tolist() == pytest.approx([e.reward for e in out.episodes])
    assert verifier.tolist() == [e.verifier for e in out.episodes]


ENV_FILE = '''
from posttrain.envs import StepResult

class LetterEnv:
    """Two turns; each turn's reward is the fraction of lowercase letters the model wrote."""
    def reset(self, row):
        self.t = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.t += 1
        score = sum(c.isalpha() and c.islower() for c in text) / max(len(text), 1)
        return StepResult("Observation: again\\n", score, self.t >= 2, {"verifier": float(score > 0.5)})
'''


def test_grpo_with_a_user_environment_from_the_command_line(tmp_path):
    (tmp_path / "myenv.py").write_text(ENV_FILE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something #{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    code = main(["grpo", f"train_file={prompts}", "model=tiny", f"output_dir={out}", "num_generations=4",
                 "prompts_per_step=2", "max_new_tokens=6", "max_steps=3", "micro_batch_size=8", "lr=1e-2",
                 "progress=false", "tensorboard=false", f"env={tmp_path / 'myenv.py'}:LetterEnv", "max_turns=2",
                 "max_episode_tokens=64", "eval_size=0"])
    assert code == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 3
    for r in rows:
        assert r["env/turns"] == 2.0 and r["env/finish_done"] == 1.0
        assert 0.0 <= r["reward/mean"] <= 2.0
        assert r["completion/max_length"] <= 12  # model tokens only: two turns of at most 6
    assert (out / "final" / "config.json").exists()


def test_grpo_env_errors_exit_2_naming_the_problem(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    base = ["grpo", f"train_file={prompts}", "model=tiny", f"output_dir={tmp_path / 'run'}", "progress=false",
            "tensorboard=false", "max_steps=1", "num_generations=2", "prompts_per_step=1", "max_new_tokens=4"]
    assert main(base + [f"env={tmp_path / 'missing.py'}:Env"]) == 2
    assert "missing.py' does not exist" in capsys.readouterr().err
    (tmp_path / "e.py").write_text("class Other:\n    pass\n")
    assert main(base + [f"env={tmp_path / 'e.py'}:Env"]) == 2
    assert "has no 'Env'" in capsys.readouterr().err
    assert main(base + [f"env={tmp_path / 'e.py'}:Other"]) == 2
    assert "no reset / step method" in capsys.readouterr().err
    # the built-in tool environment cannot use a row without an answer: the error names it and the row
    assert main(base + ["env=tools"]) == 2
    err = capsys.readouterr().err
    assert "environment 'tools' cannot use row 0" in err and "'answer'" in err
    assert not (tmp_path / "run" / "final").exists()


BROKEN_ENVS = '''
import time
from posttrain.envs import StepResult

class StepFails:
    name = "step_fails"
    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]
    def step(self, text):
        raise ZeroDivisionError("bad turn")

class Hangs(StepFails):
    name = "hangs"
    def step(self, text):
        time.sleep(120)

class NeedsTopic(StepFails):
    name = "needs_topic"
    def reset(self, row):
        return [{"role": "user", "content": row["topic"]}]
    def step(self, text):
        return StepResult(None, 1.0, True)
'''


def test_grpo_env_failures_during_the_run_exit_2_naming_environment_row_and_turn(tmp_path, capsys):
    import time

    (tmp_path / "broken.py").write_text(BROKEN_ENVS)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}", "topic": f"t{i}"}) + "\n" for i in range(4)))
    held_out = tmp_path / "held.jsonl"
    held_out.write_text(json.dumps({"prompt": "q", "topic": "t"}) + "\n" + json.dumps({"prompt": "no topic"}) + "\n")
    base = ["grpo", f"train_file={prompts}", "model=tiny", "progress=false", "tensorboard=false", "max_steps=1",
            "num_generations=2", "prompts_per_step=1", "max_new_tokens=3", "max_turns=2"]
    assert main(base + [f"output_dir={tmp_path / 'a'}", f"env={tmp_path / 'broken.py'}:StepFails"]) == 2
    err = capsys.readouterr().err
    assert "environment 'step_fails', row " in err and "turn 1: step raised ZeroDivisionError: bad turn" in err
    t0 = time.perf_counter()
    assert main(base + [f"output_dir={tmp_path / 'b'}", f"env={tmp_path / 'broken.py'}:Hangs",
                        "env_timeout_s=0.5"]) == 2
    assert time.perf_counter() - t0 < 60  # the hanging step did not hang the run
    assert "environment 'hangs', row " in capsys.readouterr().err
    # a held-out row the environment cannot use: named (with its split) before anything is written
    assert main(base + [f"output_dir={tmp_path / 'c'}", f"env={tmp_path / 'broken.py'}:NeedsTopic",
                        f"eval_file={held_out}"]) == 2
    err = capsys.readouterr().err
    assert "environment 'needs_topic' cannot use row 1 (held-out)" in err and "KeyError" in err
    assert not (tmp_path / "c").exists()
