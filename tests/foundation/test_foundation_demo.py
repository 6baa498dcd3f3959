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
