"""Power sampling (Karan & Du 2025, Alg. 1): the chain's law against an exact kernel on an enumerable toy model,
convergence to p^α/Z where low-temperature sampling does not, and KV-cached MH == the re-encoding reference."""

import math

import pytest
import torch

from posttrain.generation.sampler import HFGenerator
from posttrain.generation.toy import (
    completion_distribution,
    empirical,
    power_distribution,
    random_table_lm,
    total_variation,
)
from posttrain.models import tiny_model
from posttrain.models.forward import TokenLogps
from posttrain.ops.logps import IGNORE_INDEX
from posttrain.ttc.power import PowerParams, PowerSampler, low_temperature_params

ALPHA, T, EOS, PROMPT = 2.0, 3, 2, [0]


@pytest.fixture(scope="module")
def toy():
    """Vocabulary {0, 1, EOS=2}, completions of at most 3 tokens: 15 completions, all enumerable."""
    lm = random_table_lm(3, scale=1.0, seed=0)
    p = completion_distribution(lm, PROMPT, T, [EOS])
    low = completion_distribution(lm, PROMPT, T, [EOS], temperature=1 / ALPHA)  # the law of τ = 1/α sampling
    return lm, p, power_distribution(p, ALPHA), low


def exact_kernel(p, low, alpha, position):
    """One MH step of Alg. 1 (single block) as a transition matrix, written from the formulas, not from power.py.

    From x: m ~ U{0..T−1} ("block"; m ≥ |x| keeps x) or U{0..|x|−1} ("sequence"); y ~ q_m(y|x) =
    low(y) / low(x[:m]·) (the proposal suffix law, low = low-temperature completion law); accept with
    min(1, (p(y)/p(x))^α · low(x)/low(y) [· |x|/|y| for "sequence"]).
    """
    states = sorted(p)
    index = {x: i for i, x in enumerate(states)}
    K = torch.zeros(len(states), len(states), dtype=torch.float64)
    for x in states:
        positions = range(T) if position == "block" else range(len(x))
        for m in positions:
            if m >= len(x):
                K[index[x], index[x]] += 1 / len(positions)
                continue
            prefix_mass = sum(low[y] for y in states if y[:m] == x[:m])
            for y in (y for y in states if y[:m] == x[:m]):
                log_r = alpha * (math.log(p[y]) - math.log(p[x])) + math.log(low[x]) - math.log(low[y])
                if position == "sequence":
                    log_r += math.log(len(x)) - math.log(len(y))
                a = math.exp(min(0.0, log_r))
                q = low[y] / prefix_mass / len(positions)
                K[index[x], index[y]] += q * a
                K[index[x], index[x]] += q * (1 - a)
    return states, K


def law_after(states, K, start, steps):
    v = torch.tensor([start[x] for x in states], dtype=torch.float64) @ torch.linalg.matrix_power(K, steps)
    return {x: float(v[i]) for i, x in enumerate(states)}


def sample_tv_bound(num_outcomes, n):
    """E[TV(empirical, truth)] ≤ ½ Σ_x sqrt(p_x/n) ≤ ½ sqrt(K/n) (Jensen, then Cauchy–Schwarz)."""
    return 0.5 * math.sqrt(num_outcomes / n)


@pytest.mark.parametrize("position", ["block", "sequence"])
def test_reference_kernel_leaves_p_alpha_invariant(toy, position):
    _, p, pi, low = toy
    states, K = exact_kernel(p, low, ALPHA, position)
    v_pi = torch.tensor([pi[x] for x in states], dtype=torch.float64)
    torch.testing.assert_close(K.sum(1), torch.ones(len(states), dtype=torch.float64))
    torch.testing.assert_close(v_pi @ K, v_pi, atol=1e-12, rtol=0)
    assert total_variation(law_after(states, K, low, 200), pi) < 1e-9


@pytest.mark.parametrize("position", ["block", "sequence"])
def test_chain_law_after_three_steps_matches_the_exact_kernel(toy, position):
    """n = 4000 chains × 3 MH steps: their draws follow low·K³ (TV ≤ 0.05; the expected sampling TV is ≤ 0.031),
    which is still far from p^α (TV ≈ 0.15), so this checks the step itself, not just the fixed point."""
    lm, p, pi, low = toy
    states, K = exact_kernel(p, low, ALPHA, position)
    law3 = law_after(states, K, low, 3)
    n = 4000
    out = PowerSampler(lm, eos_token_ids=[EOS], batch_size=n).generate(
        [PROMPT], PowerParams(alpha=ALPHA, max_new_tokens=T, block_size=T, mcmc_steps=3, seed=1, position=position),
        n=n)
    draws = empirical([s.token_ids for s in out.samples[0]])
    assert sample_tv_bound(len(states), n) < 0.032
    assert total_variation(draws, law3) < 0.05
    assert total_variation(law3, pi) > 0.14


def test_power_draws_converge_to_p_alpha_while_low_temperature_does_not(toy):
    """Bound: TV(draws, p^α/Z) ≤ TV(low·K^30, p^α/Z) [exact, 0.004] + 0.06 [≈ 1.5 × the expected sampling TV of
    2500 draws over 15 completions, ½√(15/2500) = 0.039]. Low temperature (τ = 1/α) is exactly 0.246 away from
    p^α/Z, and its 2500 draws are measured > 0.18 away."""
    lm, p, pi, low = toy
    states, K = exact_kernel(p, low, ALPHA, "block")
    bias = total_variation(law_after(states, K, low, 30), pi)
    assert bias < 0.005
    n = 2500
    power = PowerSampler(lm, eos_token_ids=[EOS], batch_size=n).generate(
        [PROMPT], PowerParams(alpha=ALPHA, max_new_tokens=T, block_size=T, mcmc_steps=30, seed=2), n=n)
    power_draws = empirical([s.token_ids for s in power.samples[0]])
    assert total_variation(power_draws, pi) < bias + 0.06

    low_rollouts = HFGenerator(lm, eos_token_ids=[EOS]).generate(
        [PROMPT], low_temperature_params(ALPHA, T, seed=3), n=n)
    low_draws = empirical(low_rollouts.token_lists())
    assert total_variation(low, pi) > 0.24
    assert total_variation(low_draws, low) < 0.06
    assert total_variation(low_draws, pi) > 0.18
    assert total_variation(power_draws, low) > 0.18


def test_zero_mcmc_steps_is_low_temperature_sampling(toy):
    lm, _, _, low = toy
    out = PowerSampler(lm, eos_token_ids=[EOS], batch_size=3000).generate(
        [PROMPT], PowerParams(alpha=ALPHA, max_new_tokens=T, block_size=1, mcmc_steps=0, seed=4), n=3000)
    assert total_variation(empirical([s.token_ids for s in out.samples[0]]), low) < 0.05
    assert all(s.proposed == 0 for s in out.samples[0])


@pytest.fixture(scope="module")
def llama_runs():
    """The same chains on the tiny Llama: batched KV reuse, one chain at a time with KV reuse, and re-encoding."""
    model = tiny_model(init_std=0.25).eval()
    prompts = [[5, 17, 99, 3], [42], [7, 7, 250, 11, 64, 2, 9]]  # different lengths, one of a single token
    params = PowerParams(alpha=4.0, max_new_tokens=20, block_size=8, mcmc_steps=3, seed=7)
    # token 0 as the stop token: one chain ends early, so steps with m past its end are skipped
    runs = {name: PowerSampler(model, eos_token_ids=[0], reuse_cache=reuse, batch_size=bs).generate(
        prompts, params, n=2) for name, reuse, bs in [("batched", True, 6), ("single", True, 1), ("naive", False, 1)]}
    return model, prompts, params, runs


def test_kv_cached_chains_equal_the_reencoding_reference(llama_runs):
    _, _prompts, _, runs = llama_runs
    flat = {name: [s for row in r.samples for s in row] for name, r in runs.items()}
    for a, b, c in zip(flat["batched"], flat["single"], flat["naive"]):
        assert a.token_ids == b.token_ids == c.token_ids
        assert (a.proposed, a.accepted, a.skipped) == (b.proposed, b.accepted, b.skipped) == (
            c.proposed, c.accepted, c.skipped)
        torch.testing.assert_close(torch.tensor(a.target_logps), torch.tensor(c.target_logps), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(a.proposal_logps), torch.tensor(c.proposal_logps), atol=1e-4, rtol=0)
    proposed = sum(s.proposed for s in flat["naive"])
    accepted = sum(s.accepted for s in flat["naive"])
    assert 0 < accepted < proposed  # both the accept and the restore-on-reject paths ran
    assert any(s.finish_reason == "eos" for s in flat["naive"]) and any(s.skipped for s in flat["naive"])


def test_kv_reuse_never_reencodes_before_m(llama_runs):
    """With reuse, a chain feeds its prompt once (all but the last token) and then exactly one token per sampled
    token: forward = |prompt| − 1 + sampled. Re-encoding feeds prompt + x[:m] again for every draw."""
    _, prompts, _, runs = llama_runs
    for b, prompt in enumerate(prompts):
        for s_cached, s_naive in zip(runs["batched"].samples[b], runs["naive"].samples[b]):
            assert s_cached.forward_tokens == len(prompt) - 1 + s_cached.sampled_tokens
            assert s_naive.forward_tokens > s_cached.forward_tokens
    assert runs["single"].forward_tokens == runs["batched"].forward_tokens < runs["naive"].forward_tokens


def test_returned_logps_are_the_final_sequence_target_and_proposal_logps(llama_runs):
    model, prompts, params, runs = llama_runs
    scorer = TokenLogps(model)
    for b, prompt in enumerate(prompts):
        for s in runs["batched"].samples[b]:
            ids = torch.tensor([prompt + s.token_ids])
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[0, len(prompt) - 1:-1] = torch.tensor(s.token_ids)
            with torch.no_grad():
                target = scorer(ids, labels).logps[0, len(prompt) - 1:-1]
                proposal = scorer(ids, labels, temperature=1 / params.alpha).logps[0, len(prompt) - 1:-1]
            torch.testing.assert_close(torch.tensor(s.target_logps), target, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(s.proposal_logps), proposal, atol=1e-4, rtol=0)


def test_seeded_and_validated(toy):
    lm = toy[0]
    params = PowerParams(alpha=ALPHA, max_new_tokens=T, block_size=2, mcmc_steps=2, seed=9)
    a = PowerSampler(lm, eos_token_ids=[EOS]).generate([PROMPT], params, n=20)
    b = PowerSampler(lm, eos_token_ids=[EOS], batch_size=3).generate([PROMPT], params, n=20)
    assert [s.token_ids for s in a.samples[0]] == [s.token_ids for s in b.samples[0]]
    with pytest.raises(ValueError, match="alpha"):
        PowerParams(alpha=0.0)
    assert low_temperature_params(4.0, 10).temperature == 0.25 and low_temperature_params(4.0, 10).top_k == 0


def test_batched_chains_with_compaction_equal_one_at_a_time(toy, monkeypatch):
    """Hundreds of chains at their own pace in one masked cache, compacted while proposals are pending, give the
    same chains as the re-encoding reference."""
    from posttrain.ttc import power

    lm = toy[0]
    compactions = []
    original = power._MaskedCache._compact

    def counting(self):
        before = self.columns
        original(self)
        compactions.append(before > self.columns and bool(self._saved))

    monkeypatch.setattr(power._MaskedCache, "_compact", counting)
    params = PowerParams(alpha=ALPHA, max_new_tokens=3, block_size=1, mcmc_steps=10, seed=5)
    prompts = [[0], [1, 0], [0, 1, 1]]
    batched = PowerSampler(lm, eos_token_ids=[EOS], batch_size=300).generate(prompts, params, n=100)
    naive = PowerSampler(lm, eos_token_ids=[EOS], reuse_cache=False).generate(prompts, params, n=100)
    assert any(compactions)  # some compaction happened while a chain had a proposal pending
    for row_b, row_n in zip(batched.samples, naive.samples):
        assert [s.token_ids for s in row_b] == [s.token_ids for s in row_n]
        assert [s.accepted for s in row_b] == [s.accepted for s in row_n]
