"""Beam search: width 1 is greedy; an exhaustive width finds the best completions of an enumerable model, with and
without a length penalty."""

import math

import pytest

from posttrain.generation.beam import BeamParams, BeamSearch
from posttrain.generation.sampler import HFGenerator, SamplingParams
from posttrain.generation.toy import completion_distribution, random_table_lm
from posttrain.models import tiny_model


def test_width_one_is_greedy():
    model = tiny_model(seed=1, init_std=0.25).eval()
    prompts = [[5, 17, 99, 3], [42], [7, 7, 250, 11]]
    for eos in (258, 33):  # 33 is emitted early by some rows: exercises the stop path
        greedy = HFGenerator(model, eos_token_ids=[eos]).generate(prompts, SamplingParams(max_new_tokens=16,
                                                                                          temperature=0.0))
        beam = BeamSearch(model, eos_token_ids=[eos]).generate(prompts, BeamParams(width=1, max_new_tokens=16))
        for b, tokens in enumerate(greedy.token_lists()):
            hyp = beam.hypotheses[b][0]
            assert hyp.token_ids == tokens
            assert hyp.logp == pytest.approx(sum(greedy.logps_lists()[b]), abs=1e-4)
            assert hyp.finish_reason == greedy.finish_reasons[b]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -0.5])
def test_exhaustive_width_finds_the_best_completions(length_penalty):
    """V = 4 (EOS = 3), at most 3 new tokens: 1 + 3 + 36 = 40 completions. Width 36 never drops a candidate (at
    most 9 live prefixes × 4 tokens per step), so beam search must return the top completions by log p / |y|^λ,
    ranked here by enumerating them all."""
    lm = random_table_lm(4, scale=2.0, seed=3)
    exact = completion_distribution(lm, [1], 3, [3])
    assert len(exact) == 40
    ranked = sorted(exact, key=lambda y: -math.log(exact[y]) / len(y) ** length_penalty)
    result = BeamSearch(lm, eos_token_ids=[3]).generate([[1]], BeamParams(width=36, max_new_tokens=3,
                                                                          length_penalty=length_penalty,
                                                                          num_return=3))
    got = [tuple(h.token_ids) for h in result.hypotheses[0]]
    assert got == ranked[:3]
    for h in result.hypotheses[0]:
        assert h.logp == pytest.approx(math.log(exact[tuple(h.token_ids)]), abs=1e-6)
        assert h.score == pytest.approx(h.logp / len(h.token_ids) ** length_penalty, abs=1e-9)
        assert sum(h.token_logps) == pytest.approx(h.logp, abs=1e-9)
