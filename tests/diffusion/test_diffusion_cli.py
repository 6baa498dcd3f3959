"""`posttrain diffusion train|sample` end to end on a tiny two-moons run: outputs, loss, a killed run's resume, errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.diffusion import recipe
from posttrain.train.logging import read_metrics

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "diffusion_moons.yaml"
TINY = ["--config", str(CONFIG), "max_steps=200", "save_every=100", "log_every=40", "lr=3e-3",
        "warmup_steps=10", "lr_decay=constant", "num_data_samples=2000", "hidden_dim=64", "num_layers=2",
        "num_eval_samples=300", "num_inference_steps=50", "num_threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("moons") / "run"
    assert main(["diffusion", "train", *TINY, f"output_dir={out}"]) == 0
    return out


def test_train_writes_outputs_and_loss_decreases(trained):
    for name in ("metrics.jsonl", "loss.png", "samples.png", "eval.json", "model/model.safetensors",
                 "model/ema.safetensors", "model/config.json", "checkpoints/step-00000100/trainer_state.pt",
                 "checkpoints/step-00000200/model.safetensors"):
        assert (trained / name).is_file(), name
    rows = [r for r in read_metrics(trained / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [40, 80, 120, 160, 200]
    assert rows[-1]["train/loss"] < 0.6 * rows[0]["train/loss"]
    assert all(r["train/loss_t_high"] < r["train/loss_t_low"] for r in rows[1:])  # ε is easy to predict from very noisy x_t
    ev = json.loads((trained / "eval.json").read_text())
    data = recipe.load_data("moons", num_samples=2000, seed=0)
    noise_sw = recipe.two_d_scores(torch.randn(400, 2, generator=torch.Generator().manual_seed(0)), data.test)
    # samples are far closer to the held-out data than N(0, I) is (0.35 and 0.14 on these points)
    assert 0 < ev["sliced_w2"] < 0.5 * noise_sw["sliced_w2"]
    assert ev["mmd2"] < 0.3 * noise_sw["mmd2"]
    assert ev["num_samples"] == 300 and ev["sampler"] == "ddim"


def test_killed_run_resumes_to_the_same_weights(trained, tmp_path, monkeypatch):
    """Die after the step-100 checkpoint, rerun with --resume: the weights at 200 equal the uninterrupted run's."""
    out = tmp_path / "run"
    calls = {"n": 0}
    real_loss = recipe.denoising_loss

    def dying_loss(*args):
        calls["n"] += 1
        if calls["n"] > 130:
            raise RuntimeError("simulated crash")
        return real_loss(*args)

    monkeypatch.setattr(recipe, "denoising_loss", dying_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["diffusion", "train", *TINY, f"output_dir={out}"])
    assert not (out / "model").exists()
    monkeypatch.setattr(recipe, "denoising_loss", real_loss)
    assert main(["diffusion", "train", *TINY, f"output_dir={out}", "--resume"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        ours, ref = load_file(str(out / "model" / name)), load_file(str(trained / "model" / name))
        for key in ref:
            assert torch.equal(ours[key], ref[key]), (name, key)
    resumed = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    straight = [r for r in read_metrics(trained / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # the log reads as one run
    assert [r["train/loss"] for r in resumed] == pytest.approx([r["train/loss"] for r in straight], rel=1e-6)


def test_sample_command(trained, tmp_path):
    out = tmp_path / "ddpm"
    assert main(["diffusion", "sample", f"model_dir={trained}", "sampler=ddpm", "num_inference_steps=10",
                 "num_samples=150", f"output_dir={out}", "num_threads=1"]) == 0
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (150, 2) and torch.isfinite(samples).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sampler"] == "ddpm" and metrics["sliced_w2"] > 0 and (out / "samples.png").is_file()
    # DDIM (η = 0) from a checkpoint folder, twice with the same seed: the same samples
    a, b = tmp_path / "a", tmp_path / "b"
    ckpt = trained / "checkpoints" / "step-00000200"
    for folder in (a, b):
        assert main(["diffusion", "sample", f"model_dir={ckpt}", "num_inference_steps=5", "num_samples=20",
                     f"output_dir={folder}", "evaluate=false"]) == 0
    assert torch.equal(torch.load(a / "samples.pt"), torch.load(b / "samples.pt"))


def test_config_errors_are_reported(tmp_path, capsys):
    assert main(["diffusion", "train", *TINY, f"output_dir={tmp_path}/x", "prediction_type=prev_sample"]) == 2
    assert "prev_sample" in capsys.readouterr().err
    assert main(["diffusion", "train", *TINY, f"output_dir={tmp_path}/y", "process=ve", "prediction_type=prev_sample",
                 "num_inference_steps=20"]) == 2
    assert "unit steps" in capsys.readouterr().err
    assert main(["diffusion", "sample", f"model_dir={tmp_path}/nothing"]) == 2
    assert "model_dir" in capsys.readouterr().err
    assert main(["diffusion", "train", *TINY, f"output_dir={tmp_path}/z", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
