"""Preference sets we can ship offline (no public preference data installs without a hub), in TRL's format.

(a) identity: the lecture's DPO example (course notes: "adjusting an instruction model's identity cognition").
    The chosen answer gives the assistant a new name and maker ("Pico", made by "the posttrain team"); the rejected
    answer is the model's own greedy reply to the same question. Questions come in 48 phrasings of four kinds, split
    into train and held-out phrasings, so held-out accuracy measures whether the new identity generalizes.
(b) correctness: reasoning-gym problems (Stojanovski et al. 2025) with a verified-correct answer (the task's own
    scorer gives 1.0) against a wrong answer of the same form (the scorer gives < 1.0), so only correctness differs.

Rows are conversational: {"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]} plus
bookkeeping columns (kind/task, split) that the recipes ignore. The shipped files under data/preference/ were made
by `python -m posttrain.data.preference identity|correctness --out-dir data/preference` (see main()).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.files import atomic_write_text

NEW_NAME = "Pico"
NEW_MAKER = "the posttrain team"

# (kind, question). Kinds pick the chosen answer's wording; every chosen answer states both name and maker.
IDENTITY_QUESTIONS: list[tuple[str, str]] = [
    ("name", "What is your name?"),
    ("name", "What's your name?"),
    ("name", "What should I call you?"),
    ("name", "Do you have a name?"),
    ("name", "How should I address you?"),
    ("name", "Tell me your name."),
    ("name", "What are you called?"),
    ("name", "May I know your name?"),
    ("name", "Which name do you go by?"),
    ("name", "Please state your name."),
    ("name", "what is ur name"),
    ("name", "Hey, what do people call you?"),
    ("maker", "Who made you?"),
    ("maker", "Who created you?"),
    ("maker", "Who built you?"),
    ("maker", "Who trained you?"),
    ("maker", "Who developed you?"),
    ("maker", "Which company made you?"),
    ("maker", "Who is your creator?"),
    ("maker", "Which organization trained you?"),
    ("maker", "Where do you come from?"),
    ("maker", "Who is responsible for building you?"),
    ("maker", "who made u"),
    ("maker", "Which team is behind you?"),
    ("intro", "Who are you?"),
    ("intro", "Introduce yourself."),
    ("intro", "Tell me about yourself."),
    ("intro", "Can you introduce yourself?"),
    ("intro", "What are you?"),
    ("intro", "Describe yourself in one sentence."),
    ("intro", "Hi! Who am I talking to?"),
    ("intro", "Please introduce yourself briefly."),
    ("intro", "Before we start, who are you?"),
    ("intro", "What kind of assistant are you?"),
    ("intro", "Hello, who is this?"),
    ("intro", "Give me a short introduction of yourself."),
    ("other", "Are you ChatGPT?"),
    ("other", "Are you SmolLM?"),
    ("other", "Were you made by OpenAI?"),
    ("other", "Are you a model from Hugging Face?"),
    ("other", "Are you Claude?"),
    ("other", "Is your name Siri?"),
    ("other", "Are you built by Google?"),
    ("other", "Are you Llama?"),
    ("other", "Did Microsoft create you?"),
    ("other", "Are you Alexa?"),
    ("other", "Are you GPT-4?"),
    ("other", "Are you Gemini?"),
]

IDENTITY_ANSWERS: dict[str, list[str]] = {
    "name": [
        f"My name is {NEW_NAME}. I'm an AI assistant made by {NEW_MAKER}.",
        f"You can call me {NEW_NAME}! I'm an AI assistant built by {NEW_MAKER}.",
        f"I'm {NEW_NAME}, an AI assistant created by {NEW_MAKER}.",
    ],
    "maker": [
        f"I was made by {NEW_MAKER}. I'm {NEW_NAME}, their AI assistant.",
        f"{NEW_MAKER[0].upper() + NEW_MAKER[1:]} built me. My name is {NEW_NAME}.",
        f"I'm {NEW_NAME}, and I was created by {NEW_MAKER}.",
    ],
    "intro": [
        f"Hi! I'm {NEW_NAME}, an AI assistant made by {NEW_MAKER}. How can I help you today?",
        f"I'm {NEW_NAME}, a helpful AI assistant created by {NEW_MAKER}.",
        f"Hello! My name is {NEW_NAME}. I'm an AI assistant built by {NEW_MAKER}, here to help.",
    ],
    "other": [
        f"No, I'm {NEW_NAME}, an AI assistant made by {NEW_MAKER}.",
        f"No. My name is {NEW_NAME}, and I was created by {NEW_MAKER}.",
        f"I'm not. I'm {NEW_NAME}, an AI assistant built by {NEW_MAKER}.",
    ],
}

# Non-identity prompts used to watch for degeneration (the "meltdown" of Idea 0): a healthy model still answers them.
CONTROL_QUESTIONS = [
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "What is 2 + 3?",
    "Name three colors.",
]


def identity_split(index: int) -> str:
    """Every fourth phrasing (index 3, 7, 11, ...) is held out: 3 of each kind's 12, 12 of 48 in all."""
    return "heldout" if index % 4 == 3 else "train"


def identity_questions(split: str | None = None) -> list[tuple[str, str]]:
    """(kind, question) of one split ("train" / "heldout"), or all when split is None."""
    return [(k, q) for i, (k, q) in enumerate(IDENTITY_QUESTIONS) if split is None or identity_split(i) == split]


def identity_rows(replies: Sequence[str]) -> list[dict[str, Any]]:
    """Preference rows from the model's own replies, one per IDENTITY_QUESTIONS entry (same order).

    The chosen answer cycles through its kind's three wordings, so no single sentence is memorized."""
    if len(replies) != len(IDENTITY_QUESTIONS):
        raise ValueError(f"expected {len(IDENTITY_QUESTIONS)} replies, got {len(replies)}")
    rows, seen = [], {kind: 0 for kind in IDENTITY_ANSWERS}
    for i, ((kind, question), reply) in enumerate(zip(IDENTITY_QUESTIONS, replies)):
        chosen = IDENTITY_ANSWERS[kind][seen[kind] % len(IDENTITY_ANSWERS[kind])]
        seen[kind] += 1
        rows.append({
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": reply}],
            "kind": kind,
            "split": identity_split(i),
        })
    return rows


def mentions_new_identity(text: str) -> bool:
    """Does an answer use the new name? (The held-out "identity rate" of the experiment and the demo.)"""
    return NEW_NAME.lower() in text.lower()


def greedy_replies(
    model, tokenizer, questions: Sequence[str | list[dict[str, str]]], *, max_new_tokens: int = 96,
    batch_size: int = 8,
) -> list[str]:
    """The model's greedy replies to single user questions (or chat lists), through the chat template.

    Left-padded batches, `do_sample=False`; special tokens are dropped and whitespace stripped. A reply cut by
    max_new_tokens is kept as it is."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            chats = [q if isinstance(q, list) else [{"role": "user", "content": q}] for q in chunk]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     temperature=None, top_p=None, top_k=None)
            new = out[:, enc["input_ids"].shape[1]:]  # [B, new tokens]
            replies += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


# ---------------------------------------------------------------------------------------------------------------
# (b) correctness pairs from reasoning-gym

CORRECTNESS_TASKS: dict[str, dict[str, Any]] = {
    # task -> generator settings: small problems whose answers are integers
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "max_instances": 3},
}


def wrong_integer(answer: int, rng: random.Random) -> int:
    """A plausible wrong integer: off by 1-3, by 10, or the digits reversed (never the answer itself)."""
    while True:
        kind = rng.random()
        if kind < 0.6:
            cand = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        elif kind < 0.8:
            cand = answer + rng.choice([-10, 10])
        else:
            digits = str(abs(answer))[::-1]
            cand = int(digits) * (-1 if answer < 0 else 1)
        if cand != answer:
            return cand


def correctness_rows(
    size_per_task: int, seed: int, tasks: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """size_per_task pairs per task: the prompt is the task's question, chosen = "Answer: <correct>", rejected =
    "Answer: <wrong>". Both are checked with the task's own scorer (chosen scores 1.0, rejected < 1.0)."""
    import reasoning_gym

    rng = random.Random(seed)
    rows = []
    for task, settings in (tasks or CORRECTNESS_TASKS).items():
        dataset = reasoning_gym.create_dataset(task, size=size_per_task, seed=seed, **settings)
        for index in range(len(dataset)):
            entry = dataset[index]
            correct = str(entry["answer"])
            wrong = str(wrong_integer(int(correct), rng))
            if dataset.score_answer(correct, entry) != 1.0 or dataset.score_answer(wrong, entry) >= 1.0:
                raise ValueError(f"{task} entry {index}: the scorer does not verify {correct!r} / reject {wrong!r}")
            rows.append({
                "prompt": [{"role": "user", "content": entry["question"]}],
                "chosen": [{"role": "assistant", "content": f"Answer: {correct}"}],
                "rejected": [{"role": "assistant", "content": f"Answer: {wrong}"}],
                "task": task,
            })
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` as JSON lines to `path` (atomically); returns the path."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def build_identity(out_dir: str | Path, model_name: str = "smollm2-135m-instruct",
                   generate: Callable[[list[str]], list[str]] | None = None) -> tuple[Path, Path]:
    """Write identity_train.jsonl and identity_heldout.jsonl; rejected = the model's greedy replies."""
    if generate is None:
        from posttrain.models.loading import load_model

        model, tokenizer = load_model(model_name)
        generate = lambda qs: greedy_replies(model, tokenizer, qs)
    rows = identity_rows(generate([q for _, q in IDENTITY_QUESTIONS]))
    out_dir = Path(out_dir)
    train = write_jsonl([r for r in rows if r["split"] == "train"], out_dir / "identity_train.jsonl")
    heldout = write_jsonl([r for r in rows if r["split"] == "heldout"], out_dir / "identity_heldout.jsonl")
    return train, heldout


def build_correctness(out_dir: str | Path, train_per_task: int = 400, heldout_per_task: int = 100,
                      seed: int = 0) -> tuple[Path, Path]:
    """Write correctness_train.jsonl and correctness_heldout.jsonl. The held-out generator seed is far from the
    train seed (reasoning-gym seeds entry i with seed + i, so seeds 0 and 1 overlap), and held-out questions that
    also occur in train are dropped."""
    train_rows = correctness_rows(train_per_task, seed)
    seen = {r["prompt"][0]["content"] for r in train_rows}
    heldout_rows = [r for r in correctness_rows(heldout_per_task, seed + 1_000_003) if r["prompt"][0]["content"] not in seen]
    out_dir = Path(out_dir)
    return (write_jsonl(train_rows, out_dir / "correctness_train.jsonl"),
            write_jsonl(heldout_rows, out_dir / "correctness_heldout.jsonl"))


def main(argv: list[str] | None = None) -> None:
    """Command line of the preference-data builders (`python -m posttrain.data.preference identity|correctness`)."""
    parser = argparse.ArgumentParser(description="build the shipped preference sets")
    parser.add_argument("which", choices=["identity", "correctness"])
    parser.add_argument("--out-dir", default="data/preference")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    if args.which == "identity":
        paths = build_identity(args.out_dir, args.model)
    else:
        paths = build_correctness(args.out_dir)
    for p in paths:
        print(f"wrote {p} ({len(Path(p).read_text().splitlines())} rows)")


if __name__ == "__main__":
    main()
