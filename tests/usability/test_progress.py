"""Long phases say what they are doing: model loading, reference log-probs, held-out evaluation, `posttrain eval`."""

import json

from posttrain.recipes.dpo import DPOConfig, run
from posttrain.train.state import phase


def test_phase_announces_start_and_duration(capsys):
    with phase("counting sheep"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[posttrain] counting sheep ..."
    assert err[1].startswith("[posttrain] counting sheep: done in ") and err[1].endswith(" s")
    with phase("quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_a_dpo_run_reports_each_long_phase(tmp_path, capsys):
    turn = lambda role, text: [{"role": role, "content": text}]
    rows = [{"prompt": turn("user", f"Who are you? #{i}"), "chosen": turn("assistant", "I am Ada."),
             "rejected": turn("assistant", "I am Bob.")} for i in range(6)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(DPOConfig(train_file=str(data), eval_file=str(data), model="tiny", max_steps=1, micro_batch_size=2,
                  max_length=64, progress=False, tensorboard=False, output_dir=str(tmp_path / "dpo")))
    err = capsys.readouterr().err
    for what in ("loading tiny", "reference log-probs", "held-out evaluation"):
        assert f"[posttrain] {what} ..." in err and f"[posttrain] {what}: done in" in err, what
    assert err.index("[posttrain] loading tiny ...") < err.index("[posttrain] reference log-probs ...")
    assert "posttrain dpo: done." in err and "The trained model is in" in err


def test_posttrain_eval_reports_loading_and_decoding(tmp_path, capsys):
    from posttrain.cli import main

    task = tmp_path / "qa.jsonl"
    task.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    assert main(["eval", "--model", "tiny", f"task={task}", "max_new_tokens=4", f"output_dir={tmp_path}"]) == 0
    err = capsys.readouterr().err
    assert "[posttrain] loading tiny ..." in err and "[posttrain] greedy on 1 problems × 1 samples: done in" in err
