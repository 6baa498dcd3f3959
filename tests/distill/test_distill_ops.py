"""Chunked two-head divergences (ops/distill.py, models/teacher.py) equal the unchunked full-logits computation, in
value and gradient; the teacher gets no gradient; the teacher's top-k is the top-k of its full distribution."""

import pytest
import torch

from posttrain.losses.distill import row_divergence
from posttrain.models import tiny_model
from posttrain.models.teacher import FrozenTeacher, hidden_at_labels, token_divergences
from posttrain.ops.distill import divergence_at_rows, teacher_topk_at_rows
from posttrain.ops.logps import IGNORE_INDEX


@pytest.mark.parametrize("name,beta", [("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.3)])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_chunked_equals_unchunked(name, beta, temperature):
    torch.manual_seed(0)
    N, D_s, D_t, V = 11, 6, 9, 23
    h_s = torch.randn(N, D_s, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(V, D_s, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(N, D_t, dtype=torch.float64), torch.randn(V, D_t, dtype=torch.float64)
    fn = row_divergence(name, beta)
    weights = torch.arange(N, dtype=torch.float64)  # a non-uniform upstream gradient

    def unchunked():
        return fn((h_s @ w_s.t() / temperature).log_softmax(-1), (h_t @ w_t.t() / temperature).log_softmax(-1))

    reference = unchunked()
    g_ref = torch.autograd.grad((reference * weights).sum(), (h_s, w_s))
    for chunk in (1, 4, 11, 64):
        out = divergence_at_rows(h_s, w_s, h_t, w_t, fn, chunk_size=chunk, temperature=temperature)
        assert out.shape == (N,)
        assert torch.allclose(out, reference, atol=1e-12)
        g = torch.autograd.grad((out * weights).sum(), (h_s, w_s))
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, atol=1e-10)
    with torch.no_grad():  # the no-grad path (evaluation) gives the same values
        assert torch.allclose(divergence_at_rows(h_s, w_s, h_t, w_t, fn, chunk_size=3, temperature=temperature),
                              reference, atol=1e-12)


def test_mismatched_rows_or_vocabularies_raise():
    h, w = torch.randn(3, 4), torch.randn(7, 4)
    fn = row_divergence("forward_kl")
    with pytest.raises(ValueError, match="rows"):
        divergence_at_rows(h, w, torch.randn(2, 4), w, fn)
    with pytest.raises(ValueError, match="vocabularies"):
        divergence_at_rows(h, w, h, torch.randn(8, 4), fn)


def test_teacher_topk_chunked():
    torch.manual_seed(1)
    h, w = torch.randn(10, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    values, ids = teacher_topk_at_rows(h, w, 4, chunk_size=3, temperature=2.0)
    full = (h @ w.t() / 2.0).log_softmax(-1).topk(4, dim=-1)
    assert torch.allclose(values, full.values) and torch.equal(ids, full.indices)


def _batch():
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 259, (3, 10), generator=g)
    labels = torch.full((3, 10), IGNORE_INDEX)
    labels[0, 3:9] = input_ids[0, 4:10]
    labels[1, 5:7] = input_ids[1, 6:8]
    labels[2, 1:9] = input_ids[2, 2:10]
    return input_ids, torch.arange(10).expand(3, 10), labels


@pytest.mark.parametrize("name,beta", [("reverse_kl", 0.0), ("jsd", 0.5)])
def test_model_level_divergences_equal_full_logits(name, beta):
    """token_divergences through both decoders and chunked heads = log_softmax of each model's full logits."""
    student, teacher_model = tiny_model(seed=0, init_std=0.3), tiny_model(seed=1, init_std=0.3, hidden_size=48)
    teacher = FrozenTeacher(teacher_model)
    input_ids, position_ids, labels = _batch()
    fn = row_divergence(name, beta)
    out = token_divergences(student, teacher, input_ids, position_ids, labels, fn, chunk_size=5)
    out.sum().backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    keep = labels != IGNORE_INDEX
    s_logps = student(input_ids=input_ids, position_ids=position_ids).logits.log_softmax(-1)[keep]  # [N, V]
    with torch.no_grad():
        t_logps = teacher_model(input_ids=input_ids, position_ids=position_ids).logits.log_softmax(-1)[keep]
    reference = fn(s_logps, t_logps)
    reference.sum().backward()
    assert out.shape == (int(keep.sum()),)
    assert torch.allclose(out, reference, atol=1e-5)
    for a, p in zip(grads, student.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)
    assert all(p.grad is None for p in teacher_model.parameters())  # frozen


def test_hidden_rows_order_is_row_major():
    model = tiny_model(seed=0)
    input_ids, position_ids, labels = _batch()
    rows, weight = hidden_at_labels(model, input_ids, position_ids, labels)
    hidden = model.get_decoder()(input_ids=input_ids, position_ids=position_ids).last_hidden_state
    assert torch.allclose(rows, hidden[labels != IGNORE_INDEX])
    assert weight is model.get_output_embeddings().weight


def test_teacher_token_logps_match_full_logits():
    teacher_model = tiny_model(seed=2, init_std=0.3)
    teacher = FrozenTeacher(teacher_model, chunk_size=4)
    input_ids, position_ids, labels = _batch()
    out = teacher.token_logps(input_ids, position_ids, labels)
    with torch.no_grad():
        full = teacher_model(input_ids=input_ids, position_ids=position_ids).logits.log_softmax(-1)
    expected = full.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != IGNORE_INDEX)
    assert torch.allclose(out, expected, atol=1e-5)
