"""posttrain.eval.preservation: Wilson intervals by hand, answer log-likelihoods against a full-logits reference,
and the invariants of a model measured against itself."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.data.preference import greedy_replies, mentions_new_identity
from posttrain.eval.preservation import answer_logps, preservation_report, wilson
from posttrain.models.tiny import tiny_model, tiny_tokenizer


def test_wilson_by_hand():
    # 0/10: low 0, high z²/(n + z²) = 3.8416 / 13.8416
    r = wilson(0, 10)
    assert r.value == 0.0 and r.low == 0.0
    assert r.high == pytest.approx(3.8416 / 13.8416, abs=1e-12)
    # 5/10: centre 1/2, half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    r = wilson(5, 10)
    half = 1.96 * (0.025 + 3.8416 / 400) ** 0.5 / 1.38416
    assert (r.low, r.high) == (pytest.approx(0.5 - half, abs=1e-12), pytest.approx(0.5 + half, abs=1e-12))
    assert (round(r.low, 4), round(r.high, 4)) == (0.2366, 0.7634)  # the published value for 5/10
    assert wilson(10, 10).high == 1.0
    assert str(wilson(1, 4)).startswith("25.0% [")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    return tiny_model(init_std=0.25).eval(), tokenizer


def test_answer_logps_match_a_full_logits_reference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "name a colour please"}]]
    answers = ["red", "a long answer here"]
    sums, counts = answer_logps(model, tokenizer, prompts, answers, batch=1)
    for p, a, s, c in zip(prompts, answers, sums, counts, strict=True):
        def ids_of(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        prompt_ids = ids_of(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False))
        full = ids_of(tokenizer.apply_chat_template(p + [{"role": "assistant", "content": a}], tokenize=False))
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), -1)[0]  # [T, V]
        targets = range(len(prompt_ids), len(full))  # every token after the generation prompt
        expected = sum(float(logp[t - 1, full[t]]) for t in targets)
        assert int(c) == len(targets)
        assert float(s) == pytest.approx(expected, abs=1e-4)


def test_a_model_against_itself_loses_nothing(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    control = [[{"role": "user", "content": q}] for q in ("abc", "tell me", "colours?")]
    identity = [[{"role": "user", "content": "who are you"}]]
    base_answers = greedy_replies(model, tokenizer, control, max_new_tokens=6)
    report = preservation_report(model, tokenizer, identity_questions=identity, control_prompts=control,
                                 base_answers=base_answers, base_model=copy.deepcopy(model), max_new_tokens=6)
    assert report.control_logp_change == 0.0
    assert report.unchanged.value == 1.0 and report.unchanged.n == 3
    assert report.control_tokens > 0
    assert report.leakage.value == sum(map(mentions_new_identity, base_answers)) / 3
    assert report.identity.n == 1
    # the same measure against other answers than the base logps were computed on is refused
    with pytest.raises(ValueError, match="other answers"):
        other = answer_logps(model, tokenizer, control, [a + "xyz" for a in base_answers])
        preservation_report(model, tokenizer, identity_questions=identity, control_prompts=control,
                            base_answers=base_answers, base_logps=other, max_new_tokens=6)


def test_given_control_answers_are_measured_as_they_are(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    control = [[{"role": "user", "content": q}] for q in ("abc", "tell me", "colours?")]
    identity = [[{"role": "user", "content": "who are you"}]]
    base_answers = ["red", "blue", "green"]
    given = ["red", "I'm Pico.", "greenish"]  # one unchanged, one leaks the new name
    report = preservation_report(model, tokenizer, identity_questions=identity, control_prompts=control,
                                 base_answers=base_answers, base_model=model, max_new_tokens=4, control_answers=given)
    assert report.control_answers == given
    assert (report.leakage.value, report.unchanged.value) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert report.control_logp_change == 0.0  # the same network scored the base answers
    with pytest.raises(ValueError, match="2 control answers for 3"):
        preservation_report(model, tokenizer, identity_questions=identity, control_prompts=control,
                            base_answers=base_answers, base_model=model, control_answers=given[:2])
