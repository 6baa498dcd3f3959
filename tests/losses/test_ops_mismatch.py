"""Sampler/trainer mismatch figures on hand-worked numbers."""

import math

import pytest
import torch

from posttrain.ops.mismatch import Mismatch, logprob_mismatch


def test_hand_worked_mismatch():
    train = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    gen = torch.tensor([[-1.5, -2.0, -9.0], [-0.25, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    m = logprob_mismatch(train, gen, mask)
    # Δ = [0.5, 0, (masked)], [-0.25, 0.5, (masked)]
    assert m["mismatch/logp_abs_mean"] == pytest.approx((0.5 + 0 + 0.25 + 0.5) / 4)
    assert m["mismatch/logp_abs_max"] == pytest.approx(0.5)
    ratios = [math.exp(0.5), math.exp(0.25)]
    assert m["mismatch/seq_ratio_mean"] == pytest.approx(sum(ratios) / 2)
    assert m["mismatch/seq_ratio_min"] == pytest.approx(min(ratios))
    assert m["mismatch/seq_ratio_max"] == pytest.approx(max(ratios))


def test_accumulating_micro_batches_equals_one_batch_and_empty_rows_are_skipped():
    g = torch.Generator().manual_seed(0)
    train, gen = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[4] = False  # a row without completion tokens has no sequence ratio
    whole = logprob_mismatch(train, gen, mask)
    acc = Mismatch()
    acc.add(train[:2], gen[:2], mask[:2])
    acc.add(train[2:], gen[2:], mask[2:])
    assert acc.metrics() == pytest.approx(whole)
    seq = torch.where(mask, train - gen, 0.0).sum(1)[mask.any(1)].double().exp()
    assert whole["mismatch/seq_ratio_mean"] == pytest.approx(float(seq.mean()))
    assert logprob_mismatch(train, gen, torch.zeros_like(mask)) == {}
