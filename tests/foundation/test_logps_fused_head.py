"""The fused LM-head log-prob path: float32 logits for bf16 heads (the matmul itself returns float32, no bf16
rounding of the logits), and gradients for every combination of which inputs require grad."""

import pytest
import torch

from posttrain.ops.logps import (
    IGNORE_INDEX,
    entropy_at_rows,
    logps_at_rows,
    logps_from_hidden,
)


def _bf16_case(V=4096, N=64, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=g) * 0.6).to(torch.bfloat16)
    weight = (torch.randn(V, D, generator=g) * 0.6).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g)
    exact = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, labels[:, None]).squeeze(-1)
    return hidden, weight, labels, exact


def test_bf16_head_gives_float32_logits():
    hidden, weight, labels, exact = _bf16_case()
    got = logps_at_rows(hidden, weight, labels, chunk_size=16)
    assert got.dtype == torch.float32
    err = (got.double() - exact).abs().max().item()
    # rounding the logits to bf16 before the upcast (the old path) is off by ~1e-2 nats on these logits of |z| ~ 5
    rounded = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, labels[:, None]).squeeze(-1)
    old_err = (rounded.double() - exact).abs().max().item()
    assert err < 2e-5 and old_err > 1e-3, (err, old_err)
    ent = entropy_at_rows(hidden, weight, chunk_size=16)
    p = torch.softmax(hidden.double() @ weight.double().t(), -1)
    torch.testing.assert_close(ent.double(), -(p * p.clamp_min(1e-300).log()).sum(-1), atol=2e-5, rtol=0)


def test_bf16_gradients_match_float64_math_on_the_same_values():
    hidden, weight, labels, _ = _bf16_case(V=512, N=24, D=32, seed=1)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    up = torch.randn(24, dtype=torch.float64)
    (logps_at_rows(h, w, labels, chunk_size=7).double() * up).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.t(), -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref * up).sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # only the final rounding of the gradient to bf16 (relative 2^-8) separates them
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("need_h, need_w", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_for_each_input_that_requires_grad(need_h, need_w, temperature):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64).requires_grad_(need_h)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64).requires_grad_(need_w)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[1, :2] = IGNORE_INDEX
    up = torch.randn(2, 6, generator=g, dtype=torch.float64)
    got = logps_from_hidden(hidden, weight, labels, chunk_size=5, temperature=temperature)
    ref = torch.log_softmax(hidden @ weight.t() / temperature, -1).gather(-1, labels.clamp(min=0)[..., None])
    ref = ref.squeeze(-1) * (labels != IGNORE_INDEX)
    inputs = [t for t, need in ((hidden, need_h), (weight, need_w)) if need]
    for a, b in zip(torch.autograd.grad((got * up).sum(), inputs), torch.autograd.grad((ref * up).sum(), inputs)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_no_grad_forward_keeps_nothing_for_backward():
    hidden = torch.randn(5, 8)
    weight = torch.randn(30, 8, requires_grad=True)
    with torch.no_grad():
        out = logps_at_rows(hidden, weight, torch.randint(0, 30, (5,)))
    assert not out.requires_grad


@pytest.mark.parametrize("need_w", [False, True])
def test_labels_of_vanishing_probability_keep_exact_log_probs_and_gradients(need_w):
    # fp32 probabilities below ~1e-38 underflow: the fused path forms the softmax in place, so log p(y) and the
    # log-normaliser the backward reuses must not be read off (or cancel against) tiny probabilities
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    hidden[0] = weight[7] * 6.0  # label 3 of row 0 is > 100 nats below the top logit
    hidden[4] = weight[11] * 3.0
    labels = torch.randint(0, 50, (9,), generator=g)
    labels[0], labels[4] = 30, 34
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(need_w)
    got = logps_at_rows(h, w, labels, chunk_size=4)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_(need_w)
    exact = torch.log_softmax(h64 @ w64.t(), -1).gather(-1, labels[:, None]).squeeze(-1)
    assert exact[0] < -104 and -87 < exact[4] < -69  # p(y) = 0 and p(y) < 1e-30 in fp32
    naive = torch.softmax(hidden @ weight.t(), -1).gather(-1, labels[:, None]).squeeze(-1).log()
    assert torch.isinf(naive[0])  # what reading log p(y) off the fp32 softmax would give
    torch.testing.assert_close(got.double(), exact.detach(), atol=2e-4, rtol=1e-6)
    up = torch.randn(9, generator=g)
    (got * up).sum().backward()
    (exact * up.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-4, rtol=1e-5)
    if need_w:
        torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("keep_budget", [0.0, 0.9, 1.2, 3.0])
@pytest.mark.parametrize("n_rows, chunk", [(10, 4), (8, 4), (3, 8), (1, 1), (13, 2)])
def test_trained_head_gradients_with_kept_and_recomputed_chunks(n_rows, chunk, keep_budget):
    # the backward uses the softmax the forward kept for the last budget·N − D rows (D = 8; at least the last,
    # possibly partial, chunk) and recomputes the others; a second backward (retain_graph) recomputes every chunk
    # and gives the same gradients
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(n_rows, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (n_rows,), generator=g)
    up = torch.randn(n_rows, generator=g, dtype=torch.float64)
    out = logps_at_rows(hidden, weight, labels, chunk_size=chunk, temperature=0.7, keep_budget=keep_budget)
    first = torch.autograd.grad((out * up).sum(), [hidden, weight], retain_graph=True)
    second = torch.autograd.grad((out * up).sum(), [hidden, weight])
    ref = torch.log_softmax(hidden @ weight.t() / 0.7, -1).gather(-1, labels[:, None]).squeeze(-1)
    want = torch.autograd.grad((ref * up).sum(), [hidden, weight])
    for a, b, c in zip(first, second, want):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
        torch.testing.assert_close(b, c, atol=1e-12, rtol=0)


@pytest.mark.parametrize("keep_budget, n_rows, chunk, kept_rows", [(0.0, 10, 4, 4), (1.0, 10, 4, 4), (1.5, 10, 4, 7),
                                                                   (2.0, 10, 4, 10), (9.0, 10, 4, 10), (1.5, 3, 4, 3)])
def test_the_kept_softmax_rows_fill_the_budget_beyond_the_head_gradient(keep_budget, n_rows, chunk, kept_rows):
    # D = 8: budget 1.5 of 10 rows' logits holds dW (8 rows' worth of V floats) and the last 15 − 8 = 7 rows' softmax;
    # budget 0 or 1 (2 rows < one chunk) still keeps the last chunk's 4 rows, in the one-chunk buffer in which the
    # backward recomputes the others
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(n_rows, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    out = logps_at_rows(hidden, weight, torch.randint(0, 30, (n_rows,), generator=g), chunk_size=chunk,
                        keep_budget=keep_budget)
    assert tuple(out.grad_fn.store.shape) == (kept_rows, 30)
    frozen = logps_at_rows(hidden.detach().requires_grad_(), weight.detach(), torch.zeros(n_rows, dtype=torch.long),
                           chunk_size=chunk, keep_budget=keep_budget)
    assert frozen.grad_fn.store is None  # a frozen head keeps no softmax rows


@pytest.mark.parametrize("keep_budget", [-0.1, float("inf"), float("nan")])
def test_a_negative_or_non_finite_keep_budget_is_refused(keep_budget):
    with pytest.raises(ValueError, match="keep_budget"):
        logps_at_rows(torch.randn(4, 8), torch.randn(30, 8), torch.zeros(4, dtype=torch.long), keep_budget=keep_budget)
