"""ScaleRL sigmoid law: closed forms, recovery of known parameters, the grid's B against curve_fit, the early-half
forecast, reading metrics.jsonl and the plot."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy.optimize import curve_fit

from posttrain.errors import DataError
from posttrain.eval.scaling import (
    _fit_b_on_grid,
    extrapolation_check,
    fit_sigmoid,
    linearized_F,
    plot_fit,
    power_law_limit,
    read_curve,
    sigmoid_law,
)
from posttrain.train.logging import MetricsLogger

# ScaleRL's 8B run (Table 1): C_mid 2542, B 1.92, A 0.610; R0 picked for the test
TRUE = dict(A=0.61, B=1.92, C_mid=2542.0, R0=0.2)
COMPUTE = np.linspace(0.0, 20000.0, 41)  # an evaluation every 500 units, starting at C = 0


def test_sigmoid_law_closed_form_points():
    A, _B, C_mid, R0 = TRUE.values()
    assert sigmoid_law(C_mid, **TRUE) == pytest.approx((A + R0) / 2)  # half the gain at C_mid
    assert sigmoid_law(0.0, **TRUE) == R0
    # by hand at C = 2 C_mid: 2^-1.92 = exp(-1.92 ln 2) = 0.264255, so 0.2 + 0.41 / 1.264255 = 0.524302
    assert sigmoid_law(2 * C_mid, **TRUE) == pytest.approx(0.2 + 0.41 / (1 + 2 ** -1.92), rel=1e-12)
    assert sigmoid_law(2 * C_mid, **TRUE) == pytest.approx(0.524302, abs=1e-6)
    r = sigmoid_law(np.geomspace(1, 1e7, 50), **TRUE)
    assert np.all(np.diff(r) > 0) and r[-1] == pytest.approx(A, abs=1e-6)


def test_power_law_limit_for_large_compute():
    A, B, C_mid, R0 = TRUE.values()
    C = np.array([1e4, 1e5, 1e6, 1e7])
    x = (C_mid / C) ** B
    sig, pl = sigmoid_law(C, **TRUE), power_law_limit(C, **TRUE)
    # exact difference (A - R0) x^2 / (1 + x), from 1/(1+x) = 1 - x + x^2/(1+x)
    np.testing.assert_allclose(sig - pl, (A - R0) * x**2 / (1 + x), rtol=1e-6, atol=1e-15)
    # the gaps to A agree ever more closely: (A - R_C) / (D / C^B) = 1 / (1 + x) -> 1
    ratio = (A - sig) / ((A - R0) * C_mid**B / C**B)
    np.testing.assert_allclose(ratio, 1 / (1 + x), rtol=1e-6)
    assert abs(ratio[-1] - 1) < 1e-4 and abs(ratio[0] - 1) > 0.05


def test_linearized_F_is_C_to_the_B():
    C = np.geomspace(100, 1e5, 20)
    F = linearized_F(sigmoid_law(C, **TRUE), **TRUE)
    np.testing.assert_allclose(np.log(F), TRUE["B"] * np.log(C), rtol=1e-9)


def test_exact_data_gives_exact_parameters():
    rate = sigmoid_law(COMPUTE, **TRUE)
    fit = fit_sigmoid(COMPUTE, rate)  # R0 = initial pass rate = the C = 0 point = 0.2
    assert fit.R0 == 0.2 and fit.r0_mode == "initial" and fit.n_points == 40
    assert fit.A == pytest.approx(0.61, abs=1e-8)
    assert fit.B == pytest.approx(1.92, rel=1e-7)
    assert fit.C_mid == pytest.approx(2542.0, rel=1e-7)
    assert fit.sse < 1e-20
    np.testing.assert_allclose(fit.predict(COMPUTE), rate, atol=1e-10)
    # the grid alone lands on the grid's nearest cell: A on the 0.005 lattice, C_mid within one log step
    coarse = fit_sigmoid(COMPUTE, rate, refine=False)
    assert coarse.A == pytest.approx(0.61, abs=0.005 + 1e-12)
    step = (math.log(20000 * 10) - math.log(500 / 10)) / 99
    assert abs(math.log(coarse.C_mid / 2542.0)) <= step
    assert coarse.B == pytest.approx(1.92, rel=0.05)


def test_noisy_data_recovers_parameters_within_stated_tolerances():
    rng = np.random.default_rng(0)
    rate = sigmoid_law(COMPUTE, **TRUE) + rng.normal(0.0, 0.01, COMPUTE.shape)
    fit = fit_sigmoid(COMPUTE, rate)
    # tolerances: A within the paper's ±0.02 margin, B within 10%, C_mid within 10% (seed 0 measures
    # A 0.6127, B 1.818, C_mid 2568)
    assert abs(fit.A - 0.61) < 0.02
    assert abs(fit.B - 1.92) < 0.1 * 1.92
    assert abs(fit.C_mid - 2542.0) < 0.1 * 2542.0
    assert fit.uncertainty == "covariance" and fit.R0_err is None
    # the truth lies within 3 standard errors
    assert abs(fit.A - 0.61) < 3 * fit.A_err
    assert abs(fit.B - 1.92) < 3 * fit.B_err
    assert abs(fit.C_mid - 2542.0) < 3 * fit.C_mid_err
    # bootstrap errors agree with the covariance errors to within a factor of 2
    boot = fit_sigmoid(COMPUTE, rate, uncertainty="bootstrap", n_bootstrap=100, seed=1)
    assert boot.uncertainty == "bootstrap" and (boot.A, boot.B) == (fit.A, fit.B)
    for name in ("A_err", "B_err", "C_mid_err"):
        assert 0.5 < getattr(boot, name) / getattr(fit, name) < 2.0, name


def test_fitted_r0_and_min_compute():
    rate = sigmoid_law(COMPUTE, **TRUE)
    # drop C = 0 and the first points: R0 must then come from the fit (the initial value is 0.2 anyway)
    fit = fit_sigmoid(COMPUTE, rate, r0="fit", min_compute=1000.0)
    assert fit.n_points == 39 and fit.r0_mode == "fit"
    assert fit.R0 == pytest.approx(0.2, abs=1e-6) and fit.R0_err is not None
    assert fit.A == pytest.approx(0.61, abs=1e-6) and fit.B == pytest.approx(1.92, rel=1e-5)
    # a fixed R0 that is wrong gives a worse fit than the right one
    assert fit_sigmoid(COMPUTE, rate, r0=0.15).sse > 1e-4


def _law_of_b(A, C_mid):
    def model(C, B):
        return sigmoid_law(C, A, B, C_mid, 0.2)

    return model


def test_grid_b_matches_curve_fit_near_the_optimum():
    rng = np.random.default_rng(2)
    c = COMPUTE[1:]
    rate = sigmoid_law(c, **TRUE) + rng.normal(0.0, 0.01, c.shape)
    A_grid = np.round(np.arange(0.55, 0.675, 0.01), 3)  # [13]
    C_mid_grid = np.geomspace(1500, 4000, 12)  # [12]
    b_grid, sse_grid = _fit_b_on_grid(np.log(c), rate, A_grid, np.log(C_mid_grid), 0.2)
    assert b_grid.shape == sse_grid.shape == (13, 12)
    for i, A in enumerate(A_grid):
        for j, C_mid in enumerate(C_mid_grid):
            model = _law_of_b(A, C_mid)  # curve_fit reads the fitted parameters from the signature

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (b_ref,), _ = curve_fit(model, c, rate)  # the paper's call: default start B = 1
            sse_ref = float(((model(c, b_ref) - rate) ** 2).sum())
            assert sse_grid[i, j] <= sse_ref + 1e-12
            assert b_grid[i, j] == pytest.approx(b_ref, rel=1e-4), (A, C_mid)


def test_early_half_predicts_the_later_half():
    clean = extrapolation_check(COMPUTE, sigmoid_law(COMPUTE, **TRUE))
    assert clean.split_compute == 9500.0 and clean.heldout_compute.shape == (21,)
    assert clean.max_abs_error < 1e-8
    rng = np.random.default_rng(0)
    noisy = extrapolation_check(COMPUTE, sigmoid_law(COMPUTE, **TRUE) + rng.normal(0.0, 0.005, COMPUTE.shape))
    # seed 0 measures MAE 0.0082, final-point error 0.0086 (noise sd 0.005)
    assert noisy.mean_abs_error < 0.015 and noisy.final_abs_error < 0.02
    assert noisy.rmse >= noisy.mean_abs_error and noisy.max_abs_error >= noisy.rmse
    np.testing.assert_allclose(noisy.predicted, noisy.fit.predict(noisy.heldout_compute))


def _write_run(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 13):
        logger.log(step, {"loss": 1.0 / step, "tokens": 100 * step, "time/total": 2.0 * step})
        if step % 4 == 0:
            logger.log(step, {"eval/accuracy": step / 100})  # a separate row at the same step
    logger.log(0, {"eval/accuracy": 0.01})  # an evaluation before training, logged last
    logger.close()
    return tmp_path / "metrics.jsonl"


def test_read_curve_merges_rows_and_accumulates(tmp_path):
    path = _write_run(tmp_path)
    # the step-0 evaluation has no time/total yet: it takes 0, the value before any was logged
    compute, rate = read_curve(path, "time/total", "eval/accuracy")
    np.testing.assert_allclose(compute, [0.0, 8.0, 16.0, 24.0])
    np.testing.assert_allclose(rate, [0.01, 0.04, 0.08, 0.12])
    # cumulative tokens: step 4 -> 100+200+300+400 = 1000; step 8 -> 3600; step 12 -> 7800
    compute, rate = read_curve(path, "tokens", "eval/accuracy", cumulative=True)
    np.testing.assert_allclose(compute, [0.0, 1000.0, 3600.0, 7800.0])
    np.testing.assert_allclose(rate, [0.01, 0.04, 0.08, 0.12])
    steps, _ = read_curve(path, "step", "eval/accuracy")
    np.testing.assert_allclose(steps, [0, 4, 8, 12])


def test_read_curve_errors_name_the_line_and_key(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "pass_rate": 0.5}\n{"step": 2, "pass_rate": 0.6\n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_curve(path, "step", "pass_rate")
    path.write_text('{"step": 1, "pass_rate": 0.5}\n{"step": 2, "pass_rate": "high"}\n')
    with pytest.raises(DataError, match="line 2, key 'pass_rate'"):
        read_curve(path, "step", "pass_rate")
    path.write_text('{"step": 1, "eval/acc": 0.5}\n')
    with pytest.raises(DataError, match="no row has key 'pass_rate'; keys present: eval/acc, step"):
        read_curve(path, "step", "pass_rate")
    with pytest.raises(DataError, match="no row has key 'time'; keys present: eval/acc, step"):
        read_curve(path, "time", "eval/acc")
    with pytest.raises(DataError, match="no such metrics file"):
        read_curve(tmp_path / "missing.jsonl", "step", "pass_rate")


def test_read_then_fit_then_plot(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": step, "time/total": c,
                                "pass_rate": float(sigmoid_law(c, **TRUE) + rng.normal(0, 0.005))}) + "\n" for step, c in enumerate(COMPUTE))
    compute, rate = read_curve(path, "time/total", "pass_rate")
    check = extrapolation_check(compute, rate)
    png = plot_fit(tmp_path / "plots" / "fit.png", compute, rate, check.fit, fitted_upto=check.split_compute,
                   compute_label="time/total (s)")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[:2] == (440, 640)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_sigmoid([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="3 values but pass_rate has 2"):
        fit_sigmoid([1, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="uncertainty"):
        fit_sigmoid(COMPUTE, sigmoid_law(COMPUTE, **TRUE), uncertainty="jackknife")


def test_flat_noisy_early_halves_never_give_a_degenerate_midpoint():
    """Flat, noisy curves (a run that has not started to rise) used to send ln C_mid to -inf in the refinement:
    C_mid = 0.0, and predict() then raised a math domain error. C_mid must stay a positive value inside the
    grid's range, predictions finite, and a fit whose B is stuck at its bound must say so."""
    compute = np.arange(1, 21) * 10.0
    flagged = 0
    for seed in range(40):
        rate = np.clip(0.3 + np.random.default_rng(seed).normal(0.0, 0.05, compute.size), 0.0, 1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check = extrapolation_check(compute, rate)
        fit = check.fit
        assert compute[:10].min() / 10 * (1 - 1e-9) <= fit.C_mid <= compute[:10].max() * 10 * (1 + 1e-9)
        assert np.all(np.isfinite(check.predicted))
        if fit.B > 0.99 * 100.0:
            assert "B" in fit.at_bounds and fit.degenerate
        assert fit.degenerate == any("bound of the search" in str(w.message) for w in caught)
        flagged += fit.degenerate
    assert flagged >= 20  # pure noise: most fits are steps, and every one of them is flagged


def test_a_clean_sigmoid_is_not_flagged():
    compute = np.geomspace(1.0, 1000.0, 30)
    rate = sigmoid_law(compute, A=0.8, B=1.5, C_mid=30.0, R0=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bound warning may be raised
        fit = fit_sigmoid(compute, rate)
    assert fit.at_bounds == () and not fit.degenerate
    assert fit.to_dict()["at_bounds"] == []


def test_sigmoid_law_refuses_a_nonpositive_midpoint():
    with pytest.raises(ValueError, match="C_mid"):
        sigmoid_law(np.array([1.0]), A=0.5, B=1.0, C_mid=0.0, R0=0.1)
