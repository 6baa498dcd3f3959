"""Metropolis–Hastings acceptance for power sampling: hand-worked values and an exact check on a toy model.

The toy "model" is an explicit autoregressive table over vocab {a=0, b=1, EOS=2} with at most L=3 tokens, so its 15
complete sequences can be enumerated. It is the reference a KV-cache power sampler can be compared with: drive the
sampler with `toy_next_logps` and its draws must match `power_target(alpha)`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from posttrain.ttc.mh import accept, log_acceptance

EOS, L, V = 2, 3, 3
# p(next token | prefix); prefixes of length 2 use the row of their last token.
_TABLE = {
    (): [0.40, 0.35, 0.25],
    (0,): [0.35, 0.35, 0.30],  # after a: spread out, so no single a-sequence is very likely
    (1,): [0.10, 0.85, 0.05],  # after b: concentrated, so b-sequences win under p^alpha
}
_DEPTH2 = {0: [0.5, 0.3, 0.2], 1: [0.2, 0.6, 0.2]}


def toy_next_logps(prefix: tuple[int, ...], temperature: float = 1.0) -> np.ndarray:
    """log_softmax(log p(. | prefix) / temperature), a [V] vector: the toy model at a temperature."""
    probs = _TABLE[prefix] if prefix in _TABLE else _DEPTH2[prefix[-1]]
    logits = np.log(np.asarray(probs)) / temperature
    return logits - np.logaddexp.reduce(logits)


def _finished(seq: tuple[int, ...]) -> bool:
    return len(seq) > 0 and (seq[-1] == EOS or len(seq) == L)


def completions(prefix: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every complete sequence that starts with `prefix` (the prefix itself if it is complete)."""
    if _finished(prefix):
        return [prefix]
    return [seq for tok in range(V) for seq in completions(prefix + (tok,))]


SEQS = completions(())
INDEX = {s: i for i, s in enumerate(SEQS)}


def token_logps(seq: tuple[int, ...], temperature: float = 1.0) -> list[float]:
    return [float(toy_next_logps(seq[:t], temperature)[seq[t]]) for t in range(len(seq))]


def power_target(alpha: float) -> np.ndarray:
    """p^alpha / Z over SEQS, exactly."""
    logp = np.array([sum(token_logps(s)) for s in SEQS])
    w = np.exp(alpha * (logp - logp.max()))
    return w / w.sum()


def low_temperature(alpha: float) -> np.ndarray:
    """The sequence distribution of token-by-token sampling at temperature 1/alpha, exactly."""
    return np.array([math.exp(sum(token_logps(s, 1.0 / alpha))) for s in SEQS])


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def mh_log_accept(alpha, cur, prop, m, *, drop_current_tail=False, position_rule="fixed"):
    """The acceptance of the move cur -> prop (both complete, sharing cur[:m]) using the module under test."""
    cur_end = min(len(cur), len(prop)) if drop_current_tail else len(cur)  # the official code's slicing
    tau = 1.0 / alpha
    log_pos = math.log(len(cur) / len(prop)) if position_rule == "current_length_corrected" else 0.0
    return float(log_acceptance(
        alpha,
        token_logps(cur)[m:cur_end], token_logps(prop)[m:],
        token_logps(cur, tau)[m:cur_end], token_logps(prop, tau)[m:],
        log_position_ratio=log_pos,
    ))


def transition_matrix(alpha, *, drop_current_tail=False, position_rule="fixed") -> np.ndarray:
    """K[x, x'] of one MH step with suffix resampling from the toy model at temperature 1/alpha, exactly.

    position_rule "fixed": m ~ U{0..L-1} whatever the state, a no-op when m >= len(x) (the rule mh.py documents).
    "current_length": m ~ U{0..len(x)-1} with no correction; "current_length_corrected": same plus log(len(x)/len(x')).
    """
    K = np.zeros((len(SEQS), len(SEQS)))
    for x in SEQS:
        positions = range(L) if position_rule == "fixed" else range(len(x))
        for m in positions:
            p_m = 1.0 / len(positions)
            if m >= len(x):
                K[INDEX[x], INDEX[x]] += p_m
                continue
            for xp in completions(x[:m]):
                q_suffix = math.exp(sum(token_logps(xp, 1.0 / alpha)[m:]))
                a = math.exp(mh_log_accept(alpha, x, xp, m, drop_current_tail=drop_current_tail,
                                           position_rule=position_rule))
                K[INDEX[x], INDEX[xp]] += p_m * q_suffix * a
                K[INDEX[x], INDEX[x]] += p_m * q_suffix * (1.0 - a)
    return K


def stationary(K: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eig(K.T)
    st = np.real(v[:, np.argmin(np.abs(w - 1.0))])
    return st / st.sum()


# ---------------------------------------------------------------- the formula on hand-made log-probs


def test_log_acceptance_hand_worked_negative():
    # alpha = 2; current suffix: log p = [-1.0, -0.5] (sum -1.5), log q = [-0.6, -0.2] (sum -0.8)
    # proposal suffix:        log p = [-1.2, -0.9, -0.4] (sum -2.5), log q = [-0.3, -0.5, -0.1] (sum -0.9)
    # log A = min(0, 2 * (-2.5 - (-1.5)) + (-0.8) - (-0.9)) = min(0, -2.0 + 0.1) = -1.9
    log_a = log_acceptance(2.0, [-1.0, -0.5], [-1.2, -0.9, -0.4], [-0.6, -0.2], [-0.3, -0.5, -0.1])
    assert log_a.shape == ()
    assert float(log_a) == pytest.approx(-1.9, abs=1e-12)


def test_log_acceptance_hand_worked_clipped_at_zero():
    # alpha = 4; target: 4 * (-1.0 - (-1.5)) = 2.0; proposal: (-1.0) - (-0.5) = -0.5; log r = 1.5 -> log A = 0
    log_a = log_acceptance(4.0, [-1.0, -0.5], [-0.25, -0.75], [-0.8, -0.2], [-0.1, -0.4])
    assert float(log_a) == 0.0
    # the same numbers with alpha = 0.5: 0.5 * 0.5 - 0.5 = -0.25
    assert float(log_acceptance(0.5, [-1.0, -0.5], [-0.25, -0.75], [-0.8, -0.2], [-0.1, -0.4])) == pytest.approx(-0.25)


def test_position_ratio_is_added_before_the_clip():
    # log r = 2 * (-1.0 - (-1.0)) + (-0.5) - (-0.5) + log(2/3) = log(2/3)
    log_a = log_acceptance(2.0, [-1.0], [-0.4, -0.6], [-0.5], [-0.2, -0.3], log_position_ratio=math.log(2 / 3))
    assert float(log_a) == pytest.approx(math.log(2 / 3), abs=1e-12)


def test_alpha_one_with_proposal_equal_to_target_always_accepts():
    gen = torch.Generator().manual_seed(0)
    cur = torch.log_softmax(torch.randn(7, 5, generator=gen), -1)[:, 0]
    prop = torch.log_softmax(torch.randn(4, 5, generator=gen), -1)[:, 1]
    assert float(log_acceptance(1.0, cur, prop, cur, prop)) == 0.0
    assert bool(accept(log_acceptance(1.0, cur, prop, cur, prop), 0.999999))


def test_only_per_position_normalizers_remain_at_temperature_one_over_alpha():
    # With q_t = p_t^alpha / Z_t: alpha log p_t - log q_t = log Z_t, so log r = sum log Z(x') - sum log Z(x).
    alpha = 3.0
    gen = torch.Generator().manual_seed(1)
    logits_cur, logits_prop = torch.randn(5, 11, generator=gen), torch.randn(8, 11, generator=gen)
    tok_cur, tok_prop = torch.randint(11, (5,), generator=gen), torch.randint(11, (8,), generator=gen)

    def parts(logits, tok):
        logp = torch.log_softmax(logits.double(), -1)
        logq = torch.log_softmax(alpha * logits.double(), -1)
        log_z = torch.logsumexp(alpha * logp, -1)  # [T]
        return logp.gather(-1, tok[:, None])[:, 0], logq.gather(-1, tok[:, None])[:, 0], log_z

    p_c, q_c, z_c = parts(logits_cur, tok_cur)
    p_p, q_p, z_p = parts(logits_prop, tok_prop)
    expected = min(0.0, float(z_p.sum() - z_c.sum()))
    assert float(log_acceptance(alpha, p_c, p_p, q_c, q_p)) == pytest.approx(expected, abs=1e-10)


def test_batched_with_masks_equals_one_chain_at_a_time():
    gen = torch.Generator().manual_seed(2)
    B, T_cur, T_prop = 4, 6, 5
    tensors = [-torch.rand(B, T, generator=gen) for T in (T_cur, T_prop, T_cur, T_prop)]
    cur_len, prop_len = [6, 3, 1, 4], [2, 5, 5, 1]
    cur_mask = torch.arange(T_cur)[None, :] < torch.tensor(cur_len)[:, None]  # [B, T]
    prop_mask = torch.arange(T_prop)[None, :] < torch.tensor(prop_len)[:, None]  # [B, T']
    batched = log_acceptance(1.7, *tensors, cur_mask=cur_mask, prop_mask=prop_mask)
    assert batched.shape == (B,)
    for b in range(B):
        ct, pt, cq, pq = (t[b] for t in tensors)
        one = log_acceptance(1.7, ct[: cur_len[b]], pt[: prop_len[b]], cq[: cur_len[b]], pq[: prop_len[b]])
        assert float(batched[b]) == pytest.approx(float(one), abs=1e-12)


def test_accept_is_deterministic_given_u():
    log_a = math.log(0.3)
    assert bool(accept(log_a, 0.29)) and not bool(accept(log_a, 0.31))
    assert bool(accept(0.0, 0.9999)) and bool(accept(0.0, 0.0))
    assert not bool(accept(float("-inf"), 0.0))
    got = accept(torch.tensor([0.0, math.log(0.5), math.log(0.5)]), torch.tensor([0.7, 0.49, 0.51]))
    assert got.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        accept(0.0, 1.0)
    with pytest.raises(ValueError):
        log_acceptance(0.0, [0.0], [0.0], [0.0], [0.0])


# ---------------------------------------------------------------- exact check on the enumerable toy model


def test_toy_model_is_a_distribution():
    assert len(SEQS) == 15
    assert sum(math.exp(sum(token_logps(s))) for s in SEQS) == pytest.approx(1.0, abs=1e-12)
    assert low_temperature(4.0).sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_mh_kernel_leaves_p_alpha_invariant_exactly(alpha):
    target = power_target(alpha)
    K = transition_matrix(alpha)
    assert np.allclose(K.sum(1), 1.0, atol=1e-12)
    assert np.abs(target @ K - target).max() < 1e-12
    flow = target[:, None] * K  # detailed balance: pi(x) K(x, x') is symmetric
    assert np.abs(flow - flow.T).max() < 1e-12
    assert tv(stationary(K), target) < 1e-10
    # low temperature is a different distribution: measured 0.291 (alpha=2) and 0.659 (alpha=4)
    assert tv(low_temperature(alpha), target) > 0.25


def test_official_code_pitfall_dropping_the_current_tail_breaks_the_target():
    # The official code slices the current suffix to the proposal's length on early EOS.
    # Measured stationary TV to p^4/Z: 0.0252 (the correct rule gives < 1e-10).
    K = transition_matrix(4.0, drop_current_tail=True)
    assert tv(stationary(K), power_target(4.0)) > 0.02


def test_position_drawn_from_current_length_needs_the_position_ratio():
    target = power_target(4.0)  # measured stationary TV without the correction: 0.238
    assert tv(stationary(transition_matrix(4.0, position_rule="current_length")), target) > 0.1
    corrected = transition_matrix(4.0, position_rule="current_length_corrected")
    assert np.abs(target @ corrected - target).max() < 1e-12


def _sample_suffix(prefix, alpha, rng):
    seq = prefix
    while not _finished(seq):
        probs = np.exp(toy_next_logps(seq, 1.0 / alpha))
        seq = seq + (int(rng.choice(V, p=probs)),)
    return seq


def test_sampled_mh_chain_converges_to_p_alpha_while_low_temperature_does_not():
    alpha, num_steps, burn_in = 2.0, 20000, 200
    rng = np.random.default_rng(0)
    target = power_target(alpha)

    x = _sample_suffix((), alpha, rng)  # start from a low-temperature draw, like Algorithm 1's first extension
    counts = np.zeros(len(SEQS))
    accepted = 0
    for step in range(num_steps + burn_in):
        m = int(rng.integers(L))
        if m < len(x):  # a position past the end of a finished sequence is a no-op
            xp = _sample_suffix(x[:m], alpha, rng)
            if accept(mh_log_accept(alpha, x, xp, m), rng.random()):
                x, accepted = xp, accepted + 1
        if step >= burn_in:
            counts[INDEX[x]] += 1
    mh_tv = tv(counts / counts.sum(), target)

    low_temp_counts = np.zeros(len(SEQS))
    for _ in range(num_steps):
        low_temp_counts[INDEX[_sample_suffix((), alpha, rng)]] += 1
    low_temp_tv = tv(low_temp_counts / low_temp_counts.sum(), target)

    # Bound: 0.05. The chain's exact TV after the 200 burn-in steps is 4e-13 (second eigenvalue 0.872); the rest is
    # the sampling noise of 20k correlated draws over 15 states: seed 0 measures 0.019, seeds 1-7 at most 0.029.
    assert mh_tv < 0.05, mh_tv
    assert 0.2 < accepted / (num_steps + burn_in) < 1.0
    assert low_temp_tv > 0.25, low_temp_tv  # the exact value is 0.291
    assert low_temp_tv > 5 * mh_tv
