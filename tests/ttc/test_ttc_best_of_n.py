"""Best-of-N strategies driven by fake generate/score callables with hand-worked expectations."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.ttc.best_of_n import (
    STRATEGIES,
    Candidate,
    best_of_n,
    majority_of_n,
    weighted_majority_of_n,
)

# Two prompts, four samples each. The answer is the text after "answer:".
FAKE = {
    "p0": [
        {"text": "think... answer: 4", "token_logps": [-0.5, -0.5], "num_tokens": 2},
        {"text": "think... answer: 5", "token_logps": [-0.1, -0.1, -0.1], "num_tokens": 3},
        {"text": "think... answer: 4", "token_logps": [-3.0, -3.0, -3.0, -3.0], "num_tokens": 4},
        {"text": "no answer here", "token_logps": [-0.2], "num_tokens": 1},
    ],
    "p1": [
        {"text": "answer: 9", "token_logps": [-1.0], "num_tokens": 1},
        {"text": "answer: 8", "token_logps": [-1.0], "num_tokens": 1},
        {"text": "answer: 8", "token_logps": [-2.0, -2.0], "num_tokens": 2},
        {"text": "answer: 9", "token_logps": [-2.0, -2.0], "num_tokens": 2},
    ],
}


def fake_generate(prompts, n):
    fake_generate.calls.append((list(prompts), n))
    return [FAKE[p][:n] for p in prompts]


fake_generate.calls = []


def extract(text):
    return text.split("answer:")[1].strip() if "answer:" in text else None


def length_score(prompts, completions):
    """A fake reward model: longer text scores higher; records its calls."""
    length_score.calls.append((list(prompts), list(completions)))
    return [float(len(c)) for c in completions]


length_score.calls = []


def test_best_of_n_picks_the_highest_score_and_scores_the_flat_batch():
    length_score.calls.clear()
    results = best_of_n(["p0", "p1"], fake_generate, length_score, n=4, extract=extract)
    # one score call on the [B*G] flat batch, prompt repeated G times
    assert len(length_score.calls) == 1
    assert length_score.calls[0][0] == ["p0"] * 4 + ["p1"] * 4
    # p0: lengths 18, 18, 18, 14 -> tie among 0, 1, 2 -> earliest, index 0, answer "4"
    r0 = results[0]
    assert (r0.index, r0.answer, r0.text) == (0, "4", "think... answer: 4")
    assert r0.scores == (18.0, 18.0, 18.0, 14.0)
    assert r0.answers == ("4", "5", "4", None)
    assert r0.votes is None
    assert r0.generated_tokens == 2 + 3 + 4 + 1
    # p1: all lengths 9 -> index 0
    assert (results[1].index, results[1].answer, results[1].generated_tokens) == (0, "9", 6)


def test_best_of_n_with_a_verifier():
    def verifier(prompts, completions):  # 1 if the extracted answer is the reference
        reference = {"p0": "5", "p1": "8"}
        return [float(extract(c) == reference[p]) for p, c in zip(prompts, completions)]

    results = best_of_n(["p0", "p1"], fake_generate, verifier, n=4, extract=extract)
    assert [r.answer for r in results] == ["5", "8"]
    assert [r.index for r in results] == [1, 1]
    assert results[1].scores == (0.0, 1.0, 1.0, 0.0)


def test_majority_of_n_hand_worked():
    results = majority_of_n(["p0", "p1"], fake_generate, n=4, extract=extract)
    # p0: "4" x2, "5" x1, None ignored -> "4", first at index 0
    assert (results[0].answer, results[0].index, results[0].votes) == ("4", 0, {"4": 2, "5": 1})
    # p1: "9" x2 (first at 0), "8" x2 (first at 1) -> tie -> "9"
    assert (results[1].answer, results[1].index, results[1].votes) == ("9", 0, {"9": 2, "8": 2})
    assert results[1].scores is None


def test_weighted_majority_changes_the_winner():
    results = weighted_majority_of_n(["p0", "p1"], fake_generate, n=4, extract=extract)
    # p0: "4" = exp(-0.5) + exp(-3.0) = 0.6563, "5" = exp(-0.1) = 0.9048 -> "5" (the plain vote said "4")
    assert results[0].answer == "5" and results[0].index == 1
    assert results[0].votes["4"] == pytest.approx(math.exp(-0.5) + math.exp(-3.0))
    # p1: "9" = exp(-1) + exp(-2), "8" = exp(-1) + exp(-2) -> tie, "9" appears first
    assert results[1].answer == "9"


def test_first_n_candidates_and_cost_unknown():
    def plain_generate(prompts, n):
        return [["answer: 1", "answer: 2", "answer: 2"][:n] for _ in prompts]

    results = majority_of_n(["q"], plain_generate, n=3, extract=extract)
    assert results[0].answer == "2" and results[0].index == 1
    assert results[0].generated_tokens is None  # plain strings carry no token counts
    assert results[0].candidates[0] == Candidate(text="answer: 1")


def test_all_answers_missing():
    results = majority_of_n(["q"], lambda prompts, n: [["x"] * n for _ in prompts], n=2, extract=extract)
    assert results[0].answer is None and results[0].index is None and results[0].text is None


def test_candidate_normalizes_logps():
    c = Candidate("t", token_logps=torch.tensor([-1.0, -2.0]))
    assert c.token_logps == (-1.0, -2.0) and c.generated_tokens == 2
    assert Candidate("t", token_logps=[-1.0], num_tokens=5).generated_tokens == 5


def test_bad_callables_are_reported():
    with pytest.raises(ValueError, match="prompt 0, expected n=4"):
        majority_of_n(["p0"], lambda prompts, n: [["a"]], n=4)
    with pytest.raises(ValueError, match="1 candidate lists for 2 prompts"):
        majority_of_n(["p0", "p1"], lambda prompts, n: [["a"] * n], n=2)
    with pytest.raises(ValueError, match="3 scores for 4"):
        best_of_n(["p0", "p1"], lambda p, n: [["a"] * n for _ in p], lambda p, c: [0.0] * 3, n=2)
    with pytest.raises(ValueError, match="NaN for prompt 1, candidate 0"):
        best_of_n(["p0", "p1"], lambda p, n: [["a"] * n for _ in p], lambda p, c: [0.0, 0.0, math.nan, 0.0], n=2)
    with pytest.raises(ValueError, match="candidate 1 has none"):
        weighted_majority_of_n(["q"], lambda p, n: [[{"text": "a", "token_logps": [-1.0]}, "b"]], n=2)
    with pytest.raises(TypeError, match="prompt 0, candidate 0"):
        majority_of_n(["q"], lambda p, n: [[3.5]], n=1)


def test_strategy_registry_shares_one_call_shape():
    for name, strategy in STRATEGIES.items():
        results = strategy(["p1"], fake_generate, length_score, n=4, extract=extract)
        assert len(results) == 1 and len(results[0].candidates) == 4, name
