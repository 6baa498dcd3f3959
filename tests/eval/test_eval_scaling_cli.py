"""`posttrain scaling` on a synthetic metrics.jsonl drawn from a known sigmoid."""

import json

import numpy as np

from posttrain.cli import main
from posttrain.eval.scaling import sigmoid_law


def test_scaling_cli_recovers_a_known_curve(tmp_path):
    steps = np.arange(1, 61)
    step_cost = 2.0  # seconds per step, so cumulative compute = 2·step
    rate = sigmoid_law(steps * step_cost, A=0.7, B=1.8, C_mid=40.0, R0=0.2)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": int(s), "time/step": step_cost, "pass_rate": float(r)}) + "\n"
                            for s, r in zip(steps, rate)))
    assert main(["scaling", f"metrics={path}", "uncertainty=covariance"]) == 0
    result = json.loads((tmp_path / "scaling.json").read_text())
    # R0 is taken as the first point's pass rate (at C = 2, slightly above the true 0.2), so the fit is close, not exact
    fit = result["fit"]
    assert abs(fit["A"] - 0.7) < 5e-3 and abs(fit["B"] - 1.8) < 0.05 and abs(fit["C_mid"] - 40.0) < 1.0, fit
    assert result["early_half_prediction"]["max_abs_error"] < 0.01
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_scaling_cli_on_a_real_noisy_rl_log(tmp_path):
    """The committed GRPO-vs-ScaleRL run's log (20 noisy steps): bootstrap resamples that diverge are skipped."""
    from pathlib import Path

    log = Path(__file__).resolve().parents[2] / "experiments" / "grpo_arithmetic" / "metrics_scalerl.jsonl"
    assert main(["scaling", f"metrics={log}", "smooth=5", f"out={tmp_path / 'fit'}"]) == 0
    result = json.loads((tmp_path / "fit.json").read_text())
    assert len(result["points"]["compute"]) == 20
    assert all(np.isfinite(v) for v in (result["fit"]["A"], result["fit"]["A_err"], result["fit"]["C_mid"]))
