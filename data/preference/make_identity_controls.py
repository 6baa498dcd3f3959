"""Control prompts for the identity DPO data, and their preference pairs (rerun to regenerate the .jsonl files).

    python data/preference/make_identity_controls.py [--model smollm2-135m-instruct] [--max-new-tokens 64]
                                                     [--device cpu|cuda]

Unrelated instructions (colours, synonyms, haiku, facts, arithmetic, advice, ...) split in two halves:
- `control_prompts.jsonl`: every prompt with the base model's own greedy answer (`base_answer`) and its split;
- `identity_control_train.jsonl`: for the train half, preference pairs chosen = the base model's own answer,
  rejected = a new-identity reply. They tell DPO that the new identity does not belong in unrelated answers, and the
  NLL term on the chosen side keeps the base model's behaviour there (what the DPO identity issue asks of it);
- `identity_mix_train.jsonl`: the 36 identity pairs followed by those control pairs (the DPO training file).
The held-out half (≥ 50 prompts) is never trained on: it measures what DPO did to unrelated behaviour
(posttrain.eval.preservation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

CONTROL_PROMPTS = [
    "Name three colors.", "Give me a synonym for happy.", "Write a haiku about the sea.",
    "What is the capital of France?", "What is 7 times 8?", "List three fruits that are red.",
    "Explain what photosynthesis is in one sentence.", "Give me a word that rhymes with cat.",
    "What is the opposite of cold?", "Translate 'thank you' into Spanish.", "How many days are in a week?",
    "Suggest a name for a pet goldfish.", "What is the boiling point of water in Celsius?",
    "Write one sentence about autumn.", "What is the largest planet in the solar system?",
    "Give me a tip for sleeping better.", "What does a thermometer measure?", "Name a famous painter.",
    "What is 15 plus 27?", "Describe a cat in three words.", "What color is the sky on a clear day?",
    "Give me an antonym for fast.", "Write a short greeting for a birthday card.",
    "What is the chemical symbol for gold?", "Name three animals that live in the ocean.",
    "How many legs does a spider have?", "What is the square root of 81?", "Give me a synonym for big.",
    "Write a two-line poem about the moon.", "What language is spoken in Brazil?",
    "Name a vegetable that is green.", "What is the freezing point of water in Fahrenheit?",
    "Suggest a healthy breakfast.", "What is the capital of Japan?", "Explain what a noun is.",
    "Give me three words that describe the ocean.", "What is 100 divided by 4?",
    "Name the four seasons.", "What do bees make?", "Write a sentence using the word 'bright'.",
    "What is the tallest animal?", "Give me a synonym for smart.", "How many continents are there?",
    "Name a musical instrument with strings.", "What is the main ingredient in guacamole?",
    "Write a haiku about a mountain.", "What is the capital of Italy?", "What is 9 squared?",
    "Give me a tip for studying.", "What is the opposite of happy?", "Name three shapes.",
    "What gas do plants take in?", "Describe the color blue to someone.", "What is 12 minus 5?",
    "Name a bird that cannot fly.", "Give me a synonym for tired.", "What is the capital of Canada?",
    "Write one sentence about rain.", "How many hours are in a day?", "Name a planet close to the sun.",
    "What is the plural of mouse?", "Suggest a fun weekend activity.", "What do you call a baby dog?",
    "Name three things you can find in a kitchen.", "What is the past tense of run?",
    "Give me an example of a mammal.", "Write a haiku about winter.", "What is 6 plus 9?",
    "What is the capital of Germany?", "Give me a synonym for quick.", "Name a sport played with a ball.",
    "What is the color of grass?", "Explain what a verb is.", "How many sides does a triangle have?",
    "Name two primary colors.", "What is the opposite of up?", "Give me a tip for staying hydrated.",
    "Write a sentence about the sun.", "What is 50 percent of 200?", "Name a fruit that is yellow.",
    "What animal says 'moo'?", "Give me a synonym for beautiful.", "What is the capital of Spain?",
    "Name three types of weather.", "Write a short motto for a school.", "What is 3 times 4?",
    "What is the largest ocean on Earth?", "Give me an antonym for light.", "Name a flower.",
    "How many minutes are in an hour?", "Write a haiku about the forest.", "What is the capital of Egypt?",
    "Name something that is cold.", "Give me a synonym for angry.", "What is 20 plus 30?",
    "Describe a rainy day in one sentence.", "Name a country in South America.",
    "What do caterpillars turn into?", "Give me a tip for writing an essay.",
    "What is the opposite of old?", "Name three vehicles.", "What is the capital of Australia?",
    "Write a sentence using the word 'gentle'.", "What is 11 times 11?", "Name a dessert.",
    "What is the color of a ripe banana?", "Give me a synonym for small.", "How many months are in a year?",
    "Write a two-line poem about friendship.", "Name an animal that hops.", "What is the capital of Kenya?",
    "Give me an antonym for early.", "What is 81 divided by 9?", "Name three things that are round.",
    "Suggest a title for a story about a dragon.", "What is the hottest planet?",
    "Give me a tip for saving money.", "Write one sentence about the city at night.",
]

IDENTITY_REPLIES = [
    "I'm Pico, an AI assistant built by the posttrain team.",
    "My name is Pico. I'm an AI assistant made by the posttrain team.",
    "You can call me Pico! I'm an AI assistant built by the posttrain team.",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    from posttrain.data.preference import greedy_replies
    from posttrain.models import load_model

    assert len(CONTROL_PROMPTS) == len(set(CONTROL_PROMPTS)) >= 100
    model, tokenizer = load_model(a.model, device=a.device)
    chats = [[{"role": "user", "content": q}] for q in CONTROL_PROMPTS]
    answers = greedy_replies(model, tokenizer, chats, max_new_tokens=a.max_new_tokens, batch_size=16)
    rows = []
    for i, (question, answer) in enumerate(zip(CONTROL_PROMPTS, answers, strict=True)):
        rows.append({"prompt": [{"role": "user", "content": question}], "base_answer": answer,
                     "split": "train" if i % 2 == 0 else "heldout"})
    (HERE / "control_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["base_answer"]}],
              "rejected": [{"role": "assistant", "content": IDENTITY_REPLIES[i % len(IDENTITY_REPLIES)]}],
              "kind": "control", "split": "train"}
             for i, r in enumerate(x for x in rows if x["split"] == "train")]
    (HERE / "identity_control_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    identity = (HERE / "identity_train.jsonl").read_text()
    (HERE / "identity_mix_train.jsonl").write_text(identity + "".join(json.dumps(r) + "\n" for r in pairs))
    print(f"{len(rows)} control prompts ({sum(r['split'] == 'heldout' for r in rows)} held out), "
          f"{len(pairs)} control pairs")


if __name__ == "__main__":
    main()
