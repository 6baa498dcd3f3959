"""`posttrain scaling`: fit ScaleRL's sigmoid law (Khatri et al. 2025, Eq. 1) to an RL run's logged curve.

    posttrain scaling --metrics runs/grpo/metrics.jsonl --compute time/step --cumulative --rate pass_rate

Reads (compute, pass-rate) points from metrics.jsonl (posttrain.eval.scaling.read_curve), optionally smooths the
pass rate with a trailing moving average, fits A, B, C_mid with standard errors, checks how well a fit on the early
half predicts the later half, and writes `<out>.json` and `<out>.png`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.config import field
from posttrain.eval.scaling import extrapolation_check, fit_sigmoid, plot_fit, read_curve
from posttrain.train.checkpoint import atomic_write_text


@dataclass
class ScalingConfig:
    metrics: str = field(help="an RL run's metrics.jsonl")
    compute: str = field("time/step", help="the key measuring compute (e.g. time/step with cumulative, or step)")
    cumulative: bool = field(True, help="sum the compute key over steps (per-step costs like time/step)")
    rate: str = field("pass_rate", help="the pass-rate key (train pass_rate, or eval/accuracy)")
    smooth: int = field(1, help="trailing moving average of the pass rate over this many points (1 = none)")
    uncertainty: str = field("bootstrap", help="bootstrap (resample points) or covariance (refined fit)")
    out: str | None = field(None, help="output prefix; default: <metrics folder>/scaling")


def _smooth(values: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return values
    return np.array([values[max(0, i - k + 1):i + 1].mean() for i in range(len(values))])


def run(config: ScalingConfig) -> dict[str, Any]:
    """`posttrain scaling`: fit the sigmoid compute-performance law to a run's metrics and save the fit."""
    compute, rate = read_curve(config.metrics, config.compute, config.rate, cumulative=config.cumulative)
    rate = _smooth(np.asarray(rate, dtype=float), config.smooth)
    fit = fit_sigmoid(compute, rate, uncertainty=config.uncertainty)
    check = extrapolation_check(compute, rate)
    prefix = Path(config.out) if config.out else Path(config.metrics).parent / "scaling"
    plot_fit(prefix.with_suffix(".png"), compute, rate, check.fit, fitted_upto=check.split_compute,
             title="sigmoid fit on the early half; later points held out", compute_label=config.compute)
    result = {"fit": fit.to_dict(), "early_half_fit": check.fit.to_dict(),
              "early_half_prediction": {"mean_abs_error": check.mean_abs_error, "rmse": check.rmse,
                                        "max_abs_error": check.max_abs_error},
              "points": {"compute": list(map(float, compute)), "pass_rate": list(map(float, rate))}}
    atomic_write_text(prefix.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    print(f"A = {fit.A:.3f} ± {fit.A_err:.3f}   B = {fit.B:.2f} ± {fit.B_err:.2f}   "
          f"C_mid = {fit.C_mid:.4g} ± {fit.C_mid_err:.2g}   (R0 = {fit.R0:.3f}, {fit.n_points} points)")
    print(f"fit on the early half predicts the later half with mean |error| {check.mean_abs_error:.3f} "
          f"(max {check.max_abs_error:.3f}); wrote {prefix.with_suffix('.json')} and .png")
    for name, f in (("full", fit), ("early-half", check.fit)):
        if f.degenerate:
            print(f"warning: the {name} fit has {', '.join(f.at_bounds)} on a bound of the search: the points do "
                  "not determine the curve (too flat, too noisy or not yet saturating); do not trust its forecast")
    return result
