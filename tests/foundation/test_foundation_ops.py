import pytest
import torch

from posttrain.ops.logps import (
    IGNORE_INDEX,
    entropy_from_hidden,
    entropy_from_logits,
    logps_from_hidden,
    logps_from_logits,
    shift_labels,
)
from posttrain.ops.masked import masked_mean, masked_sum


def _reference(logits, labels, temperature=1.0):
    full = torch.log_softmax(logits / temperature, dim=-1)  # the [B, T, V] tensor we avoid, same dtype
    picked = full.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return picked * (labels != IGNORE_INDEX)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 16, 1000])  # 2*7=14 rows: 3 and 5 leave a partial last chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype, scale, atol", [(torch.float32, 1.0, 1e-6), (torch.float64, 4.0, 1e-12)])
def test_chunked_logps_equal_full_log_softmax(chunk_size, temperature, dtype, scale, atol):
    # float32 resolution near |log p| ~ 5 is ~5e-7, so 1e-6 is a float32-tight bound; float64 checks exactness.
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=g) * scale).to(dtype)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :2] = IGNORE_INDEX
    got = logps_from_logits(logits, labels, chunk_size=chunk_size, temperature=temperature)
    assert got.shape == (2, 7)
    torch.testing.assert_close(got, _reference(logits, labels, temperature), atol=atol, rtol=0)
    assert (got[0, :2] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 4, 9, 64])
def test_fused_hidden_logps_values_and_gradients(chunk_size):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (3, 5), generator=g)
    labels[2, -1] = IGNORE_INDEX
    labels[0, :3] = IGNORE_INDEX  # a "prompt": the head is skipped at these rows
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = logps_from_hidden(hidden, weight, labels, chunk_size=chunk_size, temperature=0.8)
    ref = _reference(hidden @ weight.t(), labels, 0.8)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad((got * upstream).sum(), [hidden, weight])
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [hidden, weight])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert (grads[0][0, :3] == 0).all() and (grads[0][2, -1] == 0).all()


def test_fused_logps_with_no_labels_is_zero_with_zero_gradient():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    got = logps_from_hidden(hidden, weight, torch.full((2, 3), IGNORE_INDEX))
    assert got.shape == (2, 3) and (got == 0).all()
    got.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_fused_logps_float32_within_1e6():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 6, 16, generator=g) / 4, torch.randn(100, 16, generator=g)
    labels = torch.randint(0, 100, (2, 6), generator=g)
    got = logps_from_hidden(hidden, weight, labels, chunk_size=5)
    torch.testing.assert_close(got, _reference(hidden @ weight.t(), labels), atol=1e-6, rtol=0)


def test_entropy_matches_definition():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    logits = hidden @ weight.t()
    p = torch.softmax(logits, -1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), expected)
    torch.testing.assert_close(entropy_from_hidden(hidden, weight, chunk_size=4), expected)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(entropy_from_hidden(hidden, weight, chunk_size=1, mask=mask), expected * mask)
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(torch.log(torch.tensor(8.0)).item())


def test_shift_labels_stop_at_packed_boundaries():
    input_ids = torch.tensor([[10, 11, 12, 20, 21, 22]])
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    labels = shift_labels(input_ids, loss_mask, position_ids)
    # position 2 would predict token 20, the first token of the next example: no label crosses the boundary
    assert labels.tolist() == [[11, 12, IGNORE_INDEX, 21, 22, IGNORE_INDEX]]


def test_masked_mean_with_global_count_splits_exactly():
    g = torch.Generator().manual_seed(4)
    values, mask = torch.randn(8, 5, generator=g), torch.rand(8, 5, generator=g) > 0.4
    whole = masked_mean(values, mask)
    n = float(mask.sum())
    parts = sum(masked_mean(values[i:i + 2], mask[i:i + 2], global_count=n) for i in range(0, 8, 2))
    torch.testing.assert_close(parts, whole)
    # per-micro-batch means averaged are NOT the global mean in general (the bug global counts fix)
    naive = sum(masked_mean(values[i:i + 2], mask[i:i + 2]) for i in range(0, 8, 2)) / 4
    assert abs(float(naive - whole)) > 1e-4
    assert float(masked_sum(values, mask)) == pytest.approx(float((values * mask).sum()))
    assert masked_mean(values, torch.zeros_like(mask), dim=1).tolist() == [0.0] * 8
