"""eval.distill.evaluate_student's per-row results (rows_out): what paired comparisons (McNemar) are built on."""

import math

import pytest
import torch

from posttrain.eval.distill import evaluate_student
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.models.teacher import FrozenTeacher


def _rows(n):
    return [{"prompt": [{"role": "user", "content": f"q{i}"}], "parity": i % 2} for i in range(n)]


def _every_odd_row(completions, parity, **_):
    """1 on the rows whose `parity` column is 1, whatever the completion: the expected accuracy is known."""
    return [float(p) for p in parity]


@pytest.mark.parametrize("batch", [2, 32])
def test_rows_out_are_the_per_row_terms_of_the_means(batch):
    torch.manual_seed(0)
    student, teacher, tok = tiny_model(seed=1).eval(), tiny_model(seed=2).eval(), tiny_tokenizer()
    rows, out = _rows(5), {}
    m = evaluate_student(student, FrozenTeacher(teacher), tok, rows, _every_odd_row, max_new_tokens=4, seed=7,
                         batch=batch, rows_out=out)
    assert out["correct"] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert m["eval/accuracy"] == pytest.approx(0.4)
    kl = out["reverse_kl_seq"]
    assert len(kl) == 5 and all(v > 0 for v in kl)  # two different random models
    mean = sum(kl) / 5
    assert m["eval/reverse_kl_seq"] == pytest.approx(mean)
    assert m["eval/reverse_kl_seq_se"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in kl) / 4 / 5))
    again = {}
    evaluate_student(student, FrozenTeacher(teacher), tok, rows, _every_odd_row, max_new_tokens=4, seed=7,
                     batch=3, rows_out=again)  # row i's sample has seed 7 + i: the batching changes nothing
    assert again["reverse_kl_seq"] == pytest.approx(kl, rel=1e-5)


def test_student_equal_to_teacher_has_zero_kl_per_row():
    model, tok, out = tiny_model(seed=3).eval(), tiny_tokenizer(), {}
    evaluate_student(model, FrozenTeacher(model), tok, _rows(4), None, max_new_tokens=4, seed=0, rows_out=out)
    assert out["correct"] == []  # no verifier, no accuracy
    assert out["reverse_kl_seq"] == pytest.approx([0.0] * 4, abs=1e-5)
