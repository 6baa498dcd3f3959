"""Particle filtering (Puri et al. 2025) against exact enumeration on a toy model with an exact reward: the weighted
particles converge to π ∝ p(x)·Π_t g_t(x_{1:t}), and Ẑ is an unbiased estimate of Z for any number of particles."""

import math

import pytest
import torch

from posttrain.generation.toy import completion_distribution, random_table_lm, total_variation
from posttrain.ttc.particles import ParticleFilter, ParticleParams

T, EOS, PROMPT = 3, 2, [0]


def reward(seq):
    """An exact reward on partial completions (token-id tuples)."""
    return 0.8 * sum(1 for t in seq if t == 1) - 0.5 * len(seq)


def score(prompts, completions):
    assert all(p == PROMPT for p in prompts)
    return [reward(c) for c in completions]


@pytest.fixture(scope="module")
def toy():
    lm = random_table_lm(3, scale=1.5, seed=3)
    return lm, completion_distribution(lm, PROMPT, T, [EOS])


def exact_target(p, potential, tau=1.0):
    """π(x) ∝ p(x)·Π_{t ≤ |x|} exp(r(x_{1:t})/τ) ("product") or p(x)·exp(r(x)/τ) ("last"); one step per token."""
    def log_g(x):
        return (sum(reward(x[:t]) for t in range(1, len(x) + 1)) if potential == "product" else reward(x)) / tau
    unnorm = {x: q * math.exp(log_g(x)) for x, q in p.items()}
    Z = sum(unnorm.values())
    return {x: v / Z for x, v in unnorm.items()}, Z


def weighted_law(result):
    law = {}
    for ids, w in zip(result.token_ids, result.weights):
        law[tuple(ids)] = law.get(tuple(ids), 0.0) + w
    return law


@pytest.mark.parametrize("potential,resample", [("product", "every_step"), ("last", "every_step"),
                                                ("product", "ess")])
def test_weighted_particles_converge_to_the_exact_target(toy, potential, resample):
    """3000 particles: the weighted particle law is within 0.06 TV of π (15 completions; the sampling error of
    3000 draws is ≤ ½√(15/3000) = 0.035 in expectation), while π is far from p itself."""
    lm, p = toy
    pi, Z = exact_target(p, potential, tau=0.5)
    assert total_variation(p, pi) > 0.3
    out = ParticleFilter(lm, eos_token_ids=[EOS]).generate(
        [PROMPT], score, ParticleParams(num_particles=3000, max_new_tokens=T, step_tokens=1, potential=potential,
                                        resample=resample, reward_temperature=0.5, seed=1))
    res = out.results[0]
    assert sum(res.weights) == pytest.approx(1.0)
    assert total_variation(weighted_law(res), pi) < 0.06
    assert abs(res.log_z - math.log(Z)) < 0.12  # one run of Ẑ: relative error O(1/√N), unbiasedness is tested below


@pytest.mark.parametrize("potential", ["product", "last"])
def test_normalizing_constant_estimate_is_unbiased_with_four_particles(toy, potential):
    """E[Ẑ] = Z for any N: the mean of 1500 independent Ẑ (N = 4 each) is within 4 standard errors of the exact Z."""
    lm, p = toy
    _, Z = exact_target(p, potential)
    out = ParticleFilter(lm, eos_token_ids=[EOS]).generate(
        [PROMPT] * 1500, score, ParticleParams(num_particles=4, max_new_tokens=T, step_tokens=1,
                                               potential=potential, seed=2))
    z_hat = torch.tensor([math.exp(r.log_z) for r in out.results], dtype=torch.float64)
    stderr = float(z_hat.std() / math.sqrt(len(z_hat)))
    assert abs(float(z_hat.mean()) - Z) < 4 * stderr
    assert stderr < 0.05 * Z  # the check has power: a 20% bias would fail it


def test_constant_reward_is_plain_sampling_and_steps_end_at_delimiters(toy):
    """A constant score leaves the weights uniform, so with ESS resampling nothing is ever resampled: the particles
    are plain draws from p, every step ends at a delimiter (token 1) or EOS, and the cost is exactly the prompt
    once per particle plus every generated token."""
    lm, p = toy
    out = ParticleFilter(lm, eos_token_ids=[EOS]).generate(
        [PROMPT], lambda prompts, comps: [0.0] * len(comps),
        ParticleParams(num_particles=3000, max_new_tokens=T, step_tokens=5, step_stop_ids=(1,), resample="ess",
                       seed=3))
    res = out.results[0]
    assert res.resamples == 0 and res.log_z == pytest.approx(0.0, abs=1e-9)
    assert total_variation(weighted_law(res), p) < 0.06
    assert res.steps == max(sum(1 for t in ids[:-1] if t == 1) + 1 for ids in res.token_ids)
    assert out.forward_tokens == 3000 * len(PROMPT) + sum(len(ids) for ids in res.token_ids)
    assert out.computed_tokens >= out.forward_tokens and out.wall_s > 0


def test_max_reward_selects_the_highest_final_score(toy):
    lm, _ = toy
    out = ParticleFilter(lm, eos_token_ids=[EOS]).generate(
        [PROMPT] * 20, score, ParticleParams(num_particles=6, max_new_tokens=T, step_tokens=1, select="max_reward",
                                             seed=5))
    for res in out.results:
        assert res.rewards == [reward(tuple(ids)) for ids in res.token_ids]
        assert res.chosen == max(range(6), key=lambda i: (res.rewards[i], -i))


def test_validation():
    with pytest.raises(ValueError, match="potential"):
        ParticleParams(potential="sum")
    with pytest.raises(ValueError):
        ParticleParams(num_particles=0)
