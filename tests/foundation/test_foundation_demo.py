"""`posttrain demo` runs every stage end to end (on a tiny model here; `make demo` uses the embedded SmolLM2)."""

import json

from posttrain.cli import main


def test_demo_pipeline_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "model=tiny", f"output_dir={out}", "train_problems=16", "eval_problems=6", "ttc_problems=3",
                 "grpo_steps=2", "grpo_prompts=2", "grpo_generations=2", "grpo_task_size=8", "grpo_eval_every=1",
                 "ttc_samples=2", "max_new_tokens=6", "dpo_steps=2", "dpo_controls=3"])
    assert code == 0
    report = (out / "report.md").read_text()
    for title in ("1. SFT", "2. GRPO", "3. Test-time compute", "4. DPO"):
        assert title in report
    metrics = json.loads((out / "report.json").read_text())
    sft = next(v for k, v in metrics.items() if k.startswith("1."))
    assert 0.0 <= sft["after_format"] <= 1.0 and sft["train_seconds"] > 0
    grpo = next(v for k, v in metrics.items() if k.startswith("2."))
    # the same 6 held-out problems before and after, paired; the held-out curve at steps 0, 1, 2
    assert grpo["held_out"] == 6 and grpo["fixed"] + grpo["broken"] <= 6 and 0.0 <= grpo["mcnemar_p"] <= 1.0
    assert [s for s, _ in grpo["eval_curve"]] == [0, 1, 2] and len(grpo["reward_curve"]) == 2
    assert "McNemar exact p" in report
    dpo = next(v for k, v in metrics.items() if k.startswith("4."))
    assert dpo["leakage_after"]["n"] == 3 and dpo["identity_after"]["n"] == 12
    assert "leakage: new name in answers to unrelated prompts" in report
    ttc = next(v for k, v in metrics.items() if k.startswith("3."))
    assert set(ttc) == {"greedy", "temperature", "majority", "low_temperature", "power"}
    # majority voting over 2 samples forwards more tokens per output token than one greedy answer
    assert ttc["majority"]["forward_tokens"] > ttc["greedy"]["forward_tokens"]
    assert (out / "sft.png").stat().st_size > 0 and (out / "grpo.png").stat().st_size > 0


def test_demo_rejects_unknown_stage(tmp_path, capsys):
    assert main(["demo", "stages=sft,rlhf", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_demo_grpo_start_chooses_the_starting_model_and_its_answer_reading(tmp_path):
    # base (default): a side branch from the starting model, scored on the last number; sft: from the SFT model,
    # scored on the `Answer:` line, and the later stages continue from the GRPO model
    small = ["model=tiny", "train_problems=8", "eval_problems=4", "grpo_steps=1", "grpo_prompts=2",
             "grpo_generations=2", "grpo_task_size=8", "grpo_eval_every=1", "max_new_tokens=6",
             "grpo_max_new_tokens=6"]
    for start, phrase in (("base", "from the base model"), ("sft", "from the SFT model")):
        out = tmp_path / start
        assert main(["demo", "stages=sft,grpo", f"grpo_start={start}", f"output_dir={out}", *small]) == 0
        report = (out / "report.md").read_text()
        assert phrase in report
        assert ("reward = the task's scorer on the last number" in report) == (start == "base")
        runs = json.loads((out / "grpo" / "run_config.json").read_text())
        assert runs["reward_options"]["gym"]["extract"] == ("last_number" if start == "base" else "final_line")
        assert runs["model"].endswith("final") == (start == "sft")


def test_demo_rejects_unknown_grpo_start(tmp_path, capsys):
    assert main(["demo", "grpo_start=ppo", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "grpo_start" in capsys.readouterr().err
