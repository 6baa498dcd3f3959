"""The demo's DPO stage (posttrain.demo_dpo): control pairs from the starting model's own answers, the targets, and
a run on a tiny model whose before-measures are the invariants of a model measured against itself."""

import json
from pathlib import Path

import pytest

from posttrain.demo_dpo import (
    FACT_KEYS,
    DPOStageSettings,
    fact_correct,
    fact_retention,
    meets_targets,
    own_answer_pairs,
    render_stage,
    run_identity_stage,
)


def test_own_answer_pairs_take_the_answers_as_chosen_and_drop_empty_ones():
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": "old"}],
             "rejected": [{"role": "assistant", "content": "I'm Pico."}]} for q in ("a?", "b?", "c?")]
    pairs = own_answer_pairs(rows, ["mine a", "  ", "mine c"])
    assert [p["prompt"][0]["content"] for p in pairs] == ["a?", "c?"]
    assert [p["chosen"] for p in pairs] == [[{"role": "assistant", "content": "mine a"}],
                                            [{"role": "assistant", "content": "mine c"}]]
    assert all(p["rejected"] == [{"role": "assistant", "content": "I'm Pico."}] for p in pairs)
    with pytest.raises(ValueError, match="3 control rows but 2 answers"):
        own_answer_pairs(rows, ["x", "y"])


def test_fact_keys_match_whole_words_and_numbers():
    assert fact_correct("What is 3 times 4?", "3 times 4 is 12.")
    assert not fact_correct("What is 11 times 11?", "It is 1210.")  # 121 inside a longer number
    assert not fact_correct("What is 12 minus 5?", "It is 7.5")  # 7 as the start of a decimal
    assert fact_correct("What is the capital of France?", "paris, of course")
    assert not fact_correct("What is the opposite of up?", "downtown")
    assert fact_correct("Name a flower.", "a rose") is None  # no key
    # every key belongs to a held-out control prompt of the shipped file
    from posttrain.data.formats import read_rows
    from posttrain.demo_dpo import repo_data

    held_out = {r["prompt"][-1]["content"] for r in read_rows(repo_data("control_prompts.jsonl"))
                if r["split"] == "heldout"}
    assert set(FACT_KEYS) <= held_out and len(FACT_KEYS) >= 20


def test_fact_retention_by_hand():
    questions = ["What is the capital of France?", "What is 9 squared?", "What is the capital of Japan?", "Name a flower."]
    before = ["Paris.", "81", "Kyoto", "rose"]
    after = ["Paris!", "I'm Pico.", "Tokyo", "tulip"]
    facts = fact_retention(questions, before, after)
    # 3 judged questions; right before: France, 9² (2/3); right after: France, Japan (2/3); of the 2 right before, 1 kept
    assert (facts["correct_before"]["value"], facts["correct_before"]["n"]) == (pytest.approx(2 / 3), 3)
    assert facts["correct_after"]["value"] == pytest.approx(2 / 3)
    assert (facts["still_correct"]["value"], facts["still_correct"]["n"]) == (0.5, 2)


def test_targets_at_their_bounds():
    assert meets_targets(0.9, 0.1, -0.2)
    assert not meets_targets(0.89, 0.0, 0.0)
    assert not meets_targets(1.0, 0.11, 0.0)
    assert not meets_targets(1.0, 0.0, -0.21)


def test_stage_runs_on_a_tiny_model(tmp_path):
    settings = DPOStageSettings(max_steps=2, lora_r=4, lora_alpha=8, micro_batch_size=2, max_new_tokens=4,
                                num_controls=3)
    result = run_identity_stage("tiny", tmp_path / "dpo", settings)
    # the starting model measured against its own answers: nothing changed
    assert result.before["unchanged"]["value"] == 1.0 and result.before["control_logp_change"] == 0.0
    assert result.before["leakage"]["n"] == result.after["leakage"]["n"] == 3
    assert result.after["identity"]["n"] == 12 and len(result.identity_questions) == 12
    assert result.control_questions == ["Give me a synonym for happy.", "What is the capital of France?",
                                        "List three fruits that are red."]  # the first held-out control prompts
    mix = [json.loads(line) for line in (tmp_path / "dpo" / "data" / "mix_train.jsonl").read_text().splitlines()]
    assert len(mix) == result.train_pairs["identity"] + result.train_pairs["control"]
    assert result.train_pairs["identity"] == 36 and result.train_pairs["control"] <= 3
    assert result.metrics["eval/rewards/accuracies"] >= 0.0 and set(result.seconds) == {
        "measure_before", "train", "measure_after"}
    assert (Path(result.final_dir) / "model.safetensors").exists()
    md = render_stage(result, settings)
    assert "leakage: new name in answers to unrelated prompts (n=3)" in md
    assert "| Give me a synonym for happy. |" in md and "Targets met: **no**" in md
