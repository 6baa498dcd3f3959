"""Math reward: answer extraction, hand-checked equivalences, TRL's accuracy_reward as a peer, thread safety."""

from __future__ import annotations

import threading

import pytest
from trl.rewards import accuracy_reward

from posttrain.rewards.math import extract_math_answer, make_math_reward, math_reward
from posttrain.rewards.text import final_answer_line, last_boxed


def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{ {2}+{3} }") == "{2}+{3}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"cut off \boxed{\frac{1}{2}") is None
    assert last_boxed("no box") is None


def test_final_answer_line_is_strict():
    assert final_answer_line("work\nAnswer: 0.5\n\n") == "0.5"
    assert final_answer_line("work\nanswer :  -3 ") == "-3"
    assert final_answer_line("Answer: 4\nbut wait") is None  # the answer line must be the last line
    assert final_answer_line("The answer: 4") is None
    assert final_answer_line("Answer:") is None


def test_sources_and_their_order():
    text = "Answer: 3\n" + r"I meant \boxed{4}." + "\nAnswer: 5"
    assert extract_math_answer(text) == "4"  # boxed first by default
    assert extract_math_answer(text, sources=("final_line", "boxed")) == "5"
    assert extract_math_answer("Answer: 2.", sources=("final_line",)) == "2"  # a closing period is dropped
    with pytest.raises(ValueError, match="unknown answer source"):
        make_math_reward(sources=("last_word",))


# (gold, completion, expected reward), each checked by hand
CASES = [
    (r"\frac{1}{2}", r"The answer is \boxed{0.5}.", 1.0),
    ("0.5", "so\nAnswer: 1/2", 1.0),
    (r"\frac{3}{4}", r"\boxed{\dfrac{3}{4}}", 1.0),
    ("3", r"\boxed{3.0}", 1.0),
    ("-0.5", r"\boxed{-\frac{1}{2}}", 1.0),
    ("(x+1)^2", r"\boxed{x^2+2x+1}", 1.0),
    (r"\sqrt{2}", r"\boxed{\sqrt 2}", 1.0),
    ("10000", r"\boxed{10,000}", 1.0),
    (r"\frac{1}{3}", r"\boxed{0.333333}", 1.0),  # math-verify rounds floats to 6 decimals
    (r"\frac{1}{3}", r"\boxed{0.33}", 0.0),
    (r"\sqrt{2}", r"\boxed{1.414}", 0.0),
    ("2", r"\boxed{3}", 0.0),
    ("2", "I think it is 2", 0.0),  # no box, no answer line: nothing to check
    ("7", [{"role": "assistant", "content": r"\boxed{7}"}], 1.0),  # chat-format completion
]


def test_hand_checked_cases():
    golds = [g for g, _, _ in CASES]
    completions = [c for _, c, _ in CASES]
    assert math_reward(prompts=[""] * len(CASES), completions=completions, answer=golds) == [e for _, _, e in CASES]


def test_unparsable_gold_gives_none():
    assert math_reward(prompts=["q"], completions=[r"\boxed{1}"], answer=[""]) == [None]


def test_agrees_with_trl_accuracy_reward_on_boxed_answers():
    """TRL's accuracy_reward (math-verify on boxed answers) as a peer. Left out: `\\boxed{\\sqrt 2}`, which TRL's
    stricter LaTeX settings reject on purpose (it requires well-formed LaTeX), and the `Answer:` line it never reads."""
    cases = [(g, c) for g, c, _ in CASES if isinstance(c, str) and r"\boxed" in c and c != r"\boxed{\sqrt 2}"]
    ours = math_reward(prompts=[""] * len(cases), completions=[c for _, c in cases], answer=[g for g, _ in cases])
    theirs = accuracy_reward(completions=[[{"role": "assistant", "content": c}] for _, c in cases],
                             solution=[f"${g}$" for g, _ in cases])
    assert ours == theirs
    assert 0.0 in ours and 1.0 in ours


def test_works_off_the_main_thread():
    """math-verify's signal-based timeouts fail outside the main thread; the reward turns them off there."""
    golds = [g for g, _, _ in CASES]
    completions = [c for _, c, _ in CASES]
    box = {}

    def target():
        try:
            box["value"] = math_reward(prompts=[""] * len(CASES), completions=completions, answer=golds)
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    assert "error" not in box, box.get("error")
    assert box["value"] == [e for _, _, e in CASES]
