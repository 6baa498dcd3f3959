"""Multi-turn rollouts (generation/episodes.py): cached continuation equals re-encoding, log-probs equal a
teacher-forced forward, a scripted policy gets exactly the environment's rewards, budgets end episodes cleanly."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from envs_helpers import ForcedLM

from posttrain.envs import StepResult, ToolEnv
from posttrain.envs.rl import episode_sequences
from posttrain.generation.episodes import (
    EpisodeBudget,
    Episodes,
    EpisodeSampler,
    play_scripted,
)
from posttrain.generation.logits import filtered_logps
from posttrain.generation.sampler import SamplingParams
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.models.forward import TokenLogps


class Echo:
    """Observations of a length that depends on the row and the turn (ragged chunks); done after `turns` steps.
    Reward of turn t: t / 10 + (number of characters the model wrote) / 1000."""

    name = "echo"

    def __init__(self, turns: int = 3):
        self.turns = turns

    def reset(self, row):
        self.row, self.t = row, 0
        return [{"role": "user", "content": row["q"]}]

    def step(self, text):
        self.t += 1
        obs = f"<{self.row['q'][:self.t]}{'#' * (self.t * len(self.row['q']) % 5)}>"
        return StepResult(obs, self.t / 10 + len(text) / 1000, self.t >= self.turns)


ROWS = [{"q": "hi"}, {"q": "a longer question"}, {"q": "mid size"}]


def _greedy_reference(model, sampler, env, row, cap, stops, budget_turns):
    """No cache: re-encode prompt + everything so far at every step (the definition the engine must match)."""
    eos = set(sampler.eos_token_ids)
    ids = list(sampler.prompt_ids(env.reset(row), env))
    P = len(ids)
    mask, logps, rewards = [], [], []
    for turn in range(1, budget_turns + 1):
        turn_ids, closed = [], False
        for _ in range(cap):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            tok = int(logits.argmax())
            ids.append(tok)
            turn_ids.append(tok)
            mask.append(1)
            logps.append(float(torch.log_softmax(logits, -1)[tok]))
            if tok in eos:
                closed = True
                break
            if any(s in sampler.tokenizer.decode(turn_ids) for s in stops):
                break
        result = env.step(sampler.tokenizer.decode(turn_ids, skip_special_tokens=True))
        rewards.append(result.reward)
        if result.done or turn == budget_turns:
            break
        obs = sampler.observation_ids(result.observation, closed=closed, env=env)
        ids += obs
        mask += [0] * len(obs)
        logps += [0.0] * len(obs)
    return ids[P:], mask, logps, rewards


def test_cached_continuation_equals_reencoding_greedy():
    model, tok = tiny_model(init_std=0.25, seed=3), tiny_tokenizer()
    sampler = EpisodeSampler(model, tok)
    stops = ("e",)  # a common byte: turns end at different steps, so waiting rows leave holes in the cache

    class StopEcho(Echo):
        stop = stops

    budget = EpisodeBudget(max_turns=3, max_turn_tokens=7, max_episode_tokens=400)
    out = sampler.run(StopEcho, ROWS, SamplingParams(max_new_tokens=7, temperature=0.0), budget=budget)
    assert len({len(e.token_ids) for e in out.episodes}) > 1  # ragged episodes
    for e, row in zip(out.episodes, ROWS):
        ids, mask, logps, rewards = _greedy_reference(model, sampler, StopEcho(), row, 7, stops, 3)
        assert e.token_ids == ids
        assert e.model_mask == mask
        torch.testing.assert_close(torch.tensor(e.logps), torch.tensor(logps), atol=2e-5, rtol=0)
        assert e.turn_rewards == rewards


def test_episode_logps_equal_teacher_forced_forward_over_the_concatenation():
    model, tok = tiny_model(init_std=0.25, seed=1), tiny_tokenizer()
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=20, seed=5)
    out = EpisodeSampler(model, tok).run(Echo, ROWS[:2], params, n=3,
                                         budget=EpisodeBudget(max_turns=3, max_turn_tokens=6))
    batch = episode_sequences(out, tok.pad_token_id)
    assert int(batch.mask.sum()) == sum(e.model_tokens for e in out.episodes)
    # the sampler's log-probs are under the filtered distribution: recompute it from one full forward
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits.float()  # [N, L, V]
    dist = filtered_logps(logits.reshape(-1, logits.shape[-1]), temperature=0.8, top_k=20).view(*logits.shape)
    labels = batch.labels.clamp(min=0)
    teacher = dist.gather(-1, labels[..., None]).squeeze(-1)  # [N, L]
    torch.testing.assert_close(teacher[batch.mask], batch.gen_logps[batch.mask], atol=2e-5, rtol=0)
    # and at temperature 1 without filters, the training log-probs (TokenLogps) are the sampler's
    out1 = EpisodeSampler(model, tok).run(Echo, ROWS, SamplingParams(max_new_tokens=6, seed=2), n=2,
                                          budget=EpisodeBudget(max_turns=3, max_turn_tokens=6))
    b1 = episode_sequences(out1, tok.pad_token_id)
    trained = TokenLogps(model)(b1.input_ids, b1.labels, b1.position_ids).logps
    torch.testing.assert_close(trained[b1.mask], b1.gen_logps[b1.mask], atol=2e-5, rtol=0)
    # observation tokens sit in the sequence but not in the labels
    for i, e in enumerate(out1.episodes):
        P = len(e.prompt_ids)
        assert b1.input_ids[i, P:P + len(e.token_ids)].tolist() == e.token_ids
        obs_positions = [P - 1 + t for t, m in enumerate(e.model_mask) if not m]
        assert not b1.mask[i, obs_positions].any()


def test_scripted_policy_through_the_engine_gets_exactly_the_environments_rewards():
    tok = tiny_tokenizer()
    budget = EpisodeBudget(max_turns=4, max_turn_tokens=64, max_episode_tokens=300)
    rows = [{"question": "What is 12 * 34?", "answer": "408"}, {"question": "What is 7 + 5?", "answer": "12"}]
    scripts = [["Thought: multiply.\nAction: calculator[12 * 34]\nObservation:", "Final Answer: 408<|im_end|>"],
               ["Action: calculator[7 +]\nObservation:", "Action: calc[7+5]\nObservation:", "Final Answer: 13<|im_end|>"]]

    def env():
        return ToolEnv(["calculator"], valid_call_reward=0.25, failed_call_reward=-0.5)

    sampler = EpisodeSampler(tiny_model(), tok)
    scripted = [play_scripted(sampler, env(), r, s, budget=budget) for r, s in zip(rows, scripts)]
    # the rewards the environment defines: valid call +0.25, correct answer 1; failed/unknown calls -0.5, wrong 0
    assert [e.turn_rewards for e in scripted] == [[0.25, 1.0], [-0.5, -0.5, 0.0]]
    assert [e.reward for e in scripted] == [1.25, -1.0]
    assert scripted[0].observations[0] == " 408\n"
    assert scripted[1].observations[1].startswith(" Error: unknown tool 'calc'")
    assert [e.tool_calls() for e in scripted] == [{"valid": 1}, {"failed": 1, "unknown_tool": 1}]

    for e, row in zip(scripted, rows):
        engine = EpisodeSampler(ForcedLM(e.prompt_ids + e.token_ids, len(tok), tok.eos_token_id), tok)
        out = engine.run(env, [row], SamplingParams(max_new_tokens=64, temperature=0.0), n=2, budget=budget)
        assert out.episodes[0].token_ids == out.episodes[1].token_ids
        got = out.episodes[0]
        assert got.token_ids == e.token_ids and got.model_mask == e.model_mask
        assert got.turn_rewards == e.turn_rewards and got.finish == "done"


def test_budgets_end_episodes_cleanly():
    model, tok = tiny_model(init_std=0.25), tiny_tokenizer()
    sampler = EpisodeSampler(model, tok)

    class Never(Echo):
        def step(self, text):
            return StepResult("again", 0.1, False)

    out = sampler.run(Never, ROWS, SamplingParams(max_new_tokens=5, seed=0),
                      budget=EpisodeBudget(max_turns=3, max_turn_tokens=5, max_episode_tokens=1000))
    assert [e.finish for e in out.episodes] == ["max_turns"] * 3
    assert all(e.turns == 3 and abs(e.reward - 0.3) < 1e-9 for e in out.episodes)
    out = sampler.run(Never, ROWS, SamplingParams(max_new_tokens=5, seed=0),
                      budget=EpisodeBudget(max_turns=50, max_turn_tokens=5, max_episode_tokens=23))
    for e in out.episodes:
        assert e.finish == "max_tokens" and len(e.token_ids) <= 23
    # the scripted controller applies the same budgets
    env = Never()
    e = play_scripted(sampler, env, ROWS[0], ["x" * 40, "y"], budget=EpisodeBudget(max_turn_tokens=10,
                                                                                 max_episode_tokens=12))
    assert e.finish == "max_tokens" and len(e.token_ids) <= 12


def test_observation_messages_after_a_closed_turn_use_the_chat_template():
    tok = tiny_tokenizer()
    sampler = EpisodeSampler(tiny_model(), tok)
    ids = sampler.observation_ids([{"role": "tool", "content": "42"}], closed=True)
    assert tok.decode(ids) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    # an open turn first gets the end-of-turn token; text after a closed turn is a user message
    assert tok.decode(sampler.observation_ids([{"role": "tool", "content": "42"}], closed=False)).startswith("<|im_end|>\n")
    assert tok.decode(sampler.observation_ids("obs", closed=True)) == "\n<|im_start|>user\nobs<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(sampler.observation_ids(" 42\n", closed=False)) == " 42\n"


def test_episodes_share_the_prompt_prefill():
    model, tok = tiny_model(init_std=0.25), tiny_tokenizer()
    out = EpisodeSampler(model, tok).run(Echo, ROWS, SamplingParams(max_new_tokens=4, seed=0), n=4,
                                         budget=EpisodeBudget(max_turns=2, max_turn_tokens=4))
    assert isinstance(out, Episodes) and len(out) == 12 and out.n == 4
    assert out.prefill_tokens == sum(len(e.prompt_ids) for e in out.episodes[::4])
    assert [e.row_index for e in out.episodes] == [0] * 4 + [1] * 4 + [2] * 4
