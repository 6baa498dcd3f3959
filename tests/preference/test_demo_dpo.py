"""The demo's DPO stage (posttrain.demo_dpo): control pairs from the starting model's own answers, the targets, and
a run on a tiny model whose before-measures are the invariants of a model measured against itself."""

import json
from pathlib import Path

import pytest

from posttrain.demo_dpo import DPOStageSettings, meets_targets, own_answer_pairs, render_stage, run_identity_stage


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
