"""The shipped preference sets: the identity pairs' structure and split, and correctness pairs the task scorers verify."""

import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.data.formats import load_dataset_file
from posttrain.data.preference import (
    IDENTITY_QUESTIONS,
    NEW_MAKER,
    NEW_NAME,
    correctness_rows,
    identity_rows,
    identity_split,
    mentions_new_identity,
    wrong_integer,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "preference"


def test_identity_rows_from_replies():
    replies = [f"I am SmolLM, reply {i}." for i in range(len(IDENTITY_QUESTIONS))]
    rows = identity_rows(replies)
    assert len(rows) == 48
    splits = Counter((r["kind"], r["split"]) for r in rows)
    for kind in ("name", "maker", "intro", "other"):
        assert splits[(kind, "train")] == 9 and splits[(kind, "heldout")] == 3
    for i, row in enumerate(rows):
        assert row["rejected"][0]["content"] == replies[i]  # the model's own reply, in question order
        assert row["prompt"][0]["content"] == IDENTITY_QUESTIONS[i][1]
        chosen = row["chosen"][0]["content"]
        assert NEW_NAME in chosen and NEW_MAKER in chosen.lower()
        assert row["split"] == identity_split(i)
    assert len({r["chosen"][0]["content"] for r in rows}) == 12  # three wordings per kind
    with pytest.raises(ValueError, match="expected 48 replies"):
        identity_rows(replies[:-1])
    assert mentions_new_identity("hello, I'm pico!") and not mentions_new_identity("I am SmolLM.")


def test_shipped_identity_files_are_valid_and_disjoint():
    train, fmt = load_dataset_file(DATA / "identity_train.jsonl", "dpo")
    heldout, _ = load_dataset_file(DATA / "identity_heldout.jsonl", "dpo")
    assert fmt == "preference" and len(train) == 36 and len(heldout) == 12
    questions = {r["prompt"][0]["content"] for r in train}
    assert not questions & {r["prompt"][0]["content"] for r in heldout}
    for row in train + heldout:
        assert mentions_new_identity(row["chosen"][0]["content"])
        assert not mentions_new_identity(row["rejected"][0]["content"])  # the model never called itself Pico
        assert row["rejected"][0]["content"].strip()


def test_wrong_integers_are_wrong_and_close():
    import random

    rng = random.Random(0)
    for answer in (-103, -1, 0, 7, 10, 12, 100):
        reversed_digits = int(str(abs(answer))[::-1]) * (-1 if answer < 0 else 1)
        seen = set()
        for _ in range(50):
            wrong = wrong_integer(answer, rng)
            assert wrong != answer
            assert abs(wrong - answer) in (1, 2, 3, 10) or wrong == reversed_digits
            seen.add(wrong)
        assert len(seen) >= 5  # varied


def test_correctness_pairs_are_verified_by_the_task_scorers():
    import reasoning_gym

    rows = correctness_rows(5, seed=3)
    assert Counter(r["task"] for r in rows) == {"basic_arithmetic": 5, "chain_sum": 5, "leg_counting": 5}
    for row in rows:
        correct = row["chosen"][0]["content"].removeprefix("Answer: ")
        wrong = row["rejected"][0]["content"].removeprefix("Answer: ")
        assert int(correct) != int(wrong)
    # independent check on the shipped held-out file: re-create each task's entries and score both answers
    heldout = [json.loads(line) for line in (DATA / "correctness_heldout.jsonl").read_text().splitlines()]
    train_questions = {json.loads(line)["prompt"][0]["content"]
                       for line in (DATA / "correctness_train.jsonl").read_text().splitlines()}
    assert len(heldout) > 200 and not {r["prompt"][0]["content"] for r in heldout} & train_questions
    scorer = {t: reasoning_gym.get_score_answer_fn(t) for t in ("basic_arithmetic", "chain_sum", "leg_counting")}
    by_question = {}
    from posttrain.data.preference import CORRECTNESS_TASKS

    for task, settings in CORRECTNESS_TASKS.items():
        for entry in reasoning_gym.create_dataset(task, size=100, seed=1_000_003, **settings):
            by_question[entry["question"]] = entry
    for row in heldout[:60]:
        entry = by_question[row["prompt"][0]["content"]]
        assert scorer[row["task"]](row["chosen"][0]["content"].removeprefix("Answer: "), entry) == 1.0
        assert scorer[row["task"]](row["rejected"][0]["content"].removeprefix("Answer: "), entry) < 1.0
