"""ScaleRL's sigmoid compute-performance law and its fit (Khatri et al. 2025, arXiv 2510.13786, Eq. 1, App. A.4–A.5).

Notation (paper -> code): C -> compute (any unit: GPU-hours, seconds, tokens; the paper uses GPU-hours),
R_C -> pass rate at compute C, A -> asymptotic pass rate `A`, B -> scaling exponent `B`, C_mid -> compute at half
of the gain `C_mid`, R_0 -> the pass rate the curve starts from `R0`.

    R_C = R_0 + (A − R_0) / (1 + (C_mid / C)^B)                          (Eq. 1)
        = R_0 + (A − R_0) · σ(B · (ln C − ln C_mid))                     (σ = logistic; the form used here)
    R_C ≈ A − D / C^B,  D = (A − R_0) · C_mid^B,  for C ≫ C_mid          (App. A.4)

Fitting (App. A.5), adapted to arbitrary compute units:
  1. Grid over A and C_mid. The paper uses A ∈ {0.450, 0.455, …, 0.800} and 100 linearly spaced C_mid in
     [100, 40000] GPU-hours. Here A runs over the same 0.005 steps from just above R_0 to 1.0, and C_mid over 100
     log-spaced values from min(C)/10 to 10·max(C) of the fitted points (log spacing because the unit and scale
     are unknown; a linear grid of 100 values is coarse at the low end).
  2. For each (A, C_mid), B is fitted by least squares (the paper: curve_fit from its default start B = 1). A
     vectorized scan + golden-section search in ln B replaces 20,000 curve_fit calls (see `_fit_b_on_grid` for
     why and how it compares). The cell with the lowest sum of squared residuals is kept.
  3. Optionally (`refine=True`, default) all free parameters are refined jointly by scipy.optimize.least_squares
     from that cell (the paper stops at step 2; refinement removes the grid's resolution from A and C_mid).
  The paper also drops points before ~1.5k GPU-hours (about one epoch): pass `min_compute`.

R_0: the paper does not say how it is set. Default `r0="initial"`: the pass rate at the
smallest compute in the data (the mean if several points share it), before `min_compute` drops anything; points
at C = 0 only serve this purpose (the law gives exactly R_0 there). `r0=<float>` fixes it; `r0="fit"` makes it a
free parameter of the refinement (the grid runs with R_0 at the initial pass rate).

Uncertainty: `uncertainty="covariance"` (default) reports standard errors from the fit's covariance
σ̂²·(JᵀJ)⁻¹, σ̂² = SSE/(N − P), at the final parameters (C_mid's by the delta method from ln C_mid).
`uncertainty="bootstrap"` resamples the points with replacement and refits each resample by least squares from
the full-data fit (no new grid search), reporting the standard deviation of each parameter; R_0 stays fixed unless
it is fitted.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

from posttrain.errors import DataError

A_STEP = 0.005  # the paper's grid step for A
NUM_C_MID = 100  # the paper's number of C_mid grid values
B_START = 1.0  # curve_fit's default initial value
B_BOUNDS = (1e-3, 100.0)


def sigmoid_law(compute: np.ndarray | float, A: float, B: float, C_mid: float, R0: float) -> np.ndarray:
    """R_C of Eq. 1 at each compute value ([N] -> [N]); C = 0 gives R0."""
    if not (math.isfinite(C_mid) and C_mid > 0):
        raise ValueError(f"C_mid must be a positive finite compute value, got {C_mid!r}")
    compute = np.asarray(compute, dtype=np.float64)
    with np.errstate(divide="ignore"):
        z = B * (np.log(compute) - math.log(C_mid))  # -inf at C = 0
    return R0 + (A - R0) * expit(z)


def power_law_limit(compute: np.ndarray | float, A: float, B: float, C_mid: float, R0: float) -> np.ndarray:
    """The large-compute form A − D/C^B with D = (A − R0)·C_mid^B (App. A.4). It differs from the sigmoid by
    exactly (A − R0)·x²/(1 + x), x = (C_mid/C)^B."""
    compute = np.asarray(compute, dtype=np.float64)
    return A - (A - R0) * (C_mid / compute) ** B


def linearized_F(pass_rate: np.ndarray | float, A: float, B: float, C_mid: float, R0: float) -> np.ndarray:
    """F(R_C) = C_mid^B / ((A − R0)/(R_C − R0) − 1), which equals C^B on the curve: the paper plots log F against
    log C, a line of slope B. Defined for R_C strictly between R0 and A."""
    r = np.asarray(pass_rate, dtype=np.float64)
    return C_mid**B / ((A - R0) / (r - R0) - 1.0)


@dataclass(frozen=True)
class SigmoidFit:
    """The fitted law with one standard error per parameter (R0_err is None when R0 was not fitted).

    uncertainty: how the errors were obtained ("covariance" or "bootstrap"); sse: sum of squared residuals on the
    fitted points; n_points: how many points were fitted; r0_mode: "initial", "fixed" or "fit".
    at_bounds: the parameters that ended on a bound of the search ("B" at 1e-3 or 100, "C_mid" at the edge of its
    range, "A" at A_max or at R0): the data do not determine them, and `fit_sigmoid` warns. A flat, noisy curve
    typically ends with B at its upper bound, a step somewhere among the points."""

    A: float
    B: float
    C_mid: float
    R0: float
    A_err: float
    B_err: float
    C_mid_err: float
    R0_err: float | None
    uncertainty: str
    sse: float
    n_points: int
    r0_mode: str
    at_bounds: tuple[str, ...] = ()

    @property
    def degenerate(self) -> bool:
        """True when some parameter sits on a bound of the search (see `at_bounds`)."""
        return bool(self.at_bounds)

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        return sigmoid_law(compute, self.A, self.B, self.C_mid, self.R0)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["at_bounds"] = list(self.at_bounds)
        return out


def _fit_b_on_grid(log_c: np.ndarray, rate: np.ndarray, A_grid: np.ndarray, log_c_mid_grid: np.ndarray, R0: float,
                   *, num_scan: int = 25, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares B for every (A, C_mid) cell: a scan over ln B, then golden-section search around the best.

    log_c, rate: [N] fitted points; A_grid: [nA]; log_c_mid_grid: [nC]. Returns B and SSE, each [nA, nC].

    Departure from the paper's curve_fit(B) from B = 1: for cells far from the data's shape the SSE in B has flat
    stretches and several minima, where Gauss–Newton (curve_fit's Levenberg–Marquardt) creeps for hundreds of
    iterations or stops in whichever minimum is downhill from B = 1. Here `num_scan` log-spaced values of B in
    B_BOUNDS = [1e-3, 100] are scanned and the bracket around the best is narrowed by `iterations` golden-section
    steps (to ~1e-9 in ln B); B < 0 (a falling curve) and B > 100 (a step) are excluded. Near the lowest-SSE cell,
    where the SSE in B has one minimum, the result equals curve_fit's (test_eval_scaling.py checks it cell by
    cell); elsewhere the two may land in different minima, which does not change the chosen cell.
    """
    num_a, num_c = len(A_grid), len(log_c_mid_grid)
    x = log_c[None, :] - log_c_mid_grid[:, None]  # [nC, N]
    gain = np.repeat(np.asarray(A_grid, dtype=np.float64) - R0, num_c)  # [nA*nC], cell (i, j) at i*nC + j
    col = np.tile(np.arange(num_c), num_a)  # [nA*nC]
    scan = np.linspace(math.log(B_BOUNDS[0]), math.log(B_BOUNDS[1]), num_scan)  # [S], ln B
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0

    def sse_of(log_b, g, xs):  # log_b [m] or [m, S], g [m], xs [m, N] -> SSE shaped like log_b
        if log_b.ndim == 1:
            return sse_of(log_b[:, None], g, xs)[:, 0]
        pred = R0 + g[:, None, None] * expit(np.exp(log_b)[:, :, None] * xs[:, None, :])  # [m, S, N]
        return ((rate - pred) ** 2).sum(-1)  # [m, S]

    log_b_out = np.empty(num_a * num_c)
    sse_out = np.empty(num_a * num_c)
    chunk = max(1, int(4_000_000 // (num_scan * x.shape[1])))  # cells per chunk: ~4M elements per array
    for start in range(0, num_a * num_c, chunk):
        sl = slice(start, start + chunk)
        g, xs = gain[sl], x[col[sl]]  # [m], [m, N]
        scan_sse = sse_of(np.broadcast_to(scan, (g.size, num_scan)), g, xs)  # [m, S]
        k = scan_sse.argmin(-1)  # [m]
        lo, hi = scan[np.maximum(k - 1, 0)], scan[np.minimum(k + 1, num_scan - 1)]  # [m]
        left, right = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        f_left, f_right = sse_of(left, g, xs), sse_of(right, g, xs)  # [m]
        for _ in range(iterations):
            go_left = f_left < f_right  # the minimum lies in [lo, right]: drop (right, hi], else drop [lo, left)
            hi = np.where(go_left, right, hi)
            lo = np.where(go_left, lo, left)
            kept, f_kept = np.where(go_left, left, right), np.where(go_left, f_left, f_right)
            new = np.where(go_left, hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo))  # the one new probe
            f_new = sse_of(new, g, xs)
            left, f_left = np.where(go_left, new, kept), np.where(go_left, f_new, f_kept)
            right, f_right = np.where(go_left, kept, new), np.where(go_left, f_kept, f_new)
        mid = 0.5 * (lo + hi)
        f_mid = sse_of(mid, g, xs)
        best_scan = scan_sse[np.arange(g.size), k]
        better = f_mid <= best_scan
        log_b_out[sl] = np.where(better, mid, scan[k])
        sse_out[sl] = np.where(better, f_mid, best_scan)
    return np.exp(log_b_out).reshape(num_a, num_c), sse_out.reshape(num_a, num_c)


def _model_and_jac(theta: np.ndarray, log_c: np.ndarray, R0_fixed: float | None) -> tuple[np.ndarray, np.ndarray]:
    """f and df/dθ for θ = (A, B, ln C_mid[, R0]); log_c: [N]. Returns [N] and [N, P]."""
    A, B, log_c_mid = theta[:3]
    R0 = theta[3] if R0_fixed is None else R0_fixed
    x = log_c - log_c_mid  # [N]
    s = expit(B * x)  # [N]
    ds = s * (1.0 - s)
    cols = [s, (A - R0) * ds * x, -(A - R0) * ds * B]
    if R0_fixed is None:
        cols.append(1.0 - s)
    return R0 + (A - R0) * s, np.stack(cols, axis=-1)  # [N], [N, P]


def _refine(theta0: np.ndarray, log_c: np.ndarray, rate: np.ndarray, R0_fixed: float | None,
            A_max: float, log_c_mid_range: tuple[float, float]) -> np.ndarray:
    """Joint least squares from theta0 = (A, B, ln C_mid[, R0]). ln C_mid stays inside `log_c_mid_range` (the
    grid's range): unbounded, a flat curve sends it to -inf, where C_mid = exp(ln C_mid) underflows to 0."""
    lower = [-np.inf, B_BOUNDS[0], log_c_mid_range[0]] + ([-np.inf] if R0_fixed is None else [])
    upper = [A_max, B_BOUNDS[1], log_c_mid_range[1]] + ([np.inf] if R0_fixed is None else [])
    theta0 = np.clip(theta0, np.array(lower) + 1e-12, np.array(upper) - 1e-12)
    result = least_squares(
        lambda th: _model_and_jac(th, log_c, R0_fixed)[0] - rate,
        theta0,
        jac=lambda th: _model_and_jac(th, log_c, R0_fixed)[1],
        bounds=(lower, upper),
        x_scale="jac",
        xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000,
    )
    return result.x


def fit_sigmoid(
    compute: Sequence[float] | np.ndarray,
    pass_rate: Sequence[float] | np.ndarray,
    *,
    r0: str | float = "initial",
    min_compute: float = 0.0,
    A_grid: np.ndarray | None = None,
    C_mid_grid: np.ndarray | None = None,
    A_max: float = 1.0,
    refine: bool = True,
    uncertainty: str = "covariance",
    n_bootstrap: int = 200,
    seed: int = 0,
) -> SigmoidFit:
    """Fit Eq. 1 to (compute, pass rate) points by the paper's grid + least squares (see the module docstring).

    compute, pass_rate: [N]. r0: "initial" | "fit" | a number. min_compute: points with smaller compute (and all
    with compute ≤ 0) are left out of the fit. A_grid / C_mid_grid: override the grids (C_mid in compute units).
    A_max: upper bound on A in the refinement (pass rates cannot exceed 1). uncertainty: "covariance" |
    "bootstrap" (n_bootstrap resamples, numpy seed `seed`).
    """
    c_all = np.asarray(compute, dtype=np.float64).reshape(-1)  # [N]
    y_all = np.asarray(pass_rate, dtype=np.float64).reshape(-1)  # [N]
    if c_all.shape != y_all.shape:
        raise ValueError(f"compute has {c_all.size} values but pass_rate has {y_all.size}")
    if not (np.all(np.isfinite(c_all)) and np.all(np.isfinite(y_all))):
        raise ValueError("compute and pass_rate must be finite")
    if uncertainty not in ("covariance", "bootstrap"):
        raise ValueError(f"uncertainty must be 'covariance' or 'bootstrap', got {uncertainty!r}")

    if isinstance(r0, str):
        if r0 not in ("initial", "fit"):
            raise ValueError(f"r0 must be 'initial', 'fit' or a number, got {r0!r}")
        R0 = float(y_all[c_all == c_all.min()].mean())
        r0_mode = r0
    else:
        R0, r0_mode = float(r0), "fixed"
    keep = (c_all > 0) & (c_all >= min_compute)
    c, y = c_all[keep], y_all[keep]  # [N']
    num_params = 3 + (r0_mode == "fit")
    if c.size < num_params + 1:
        raise ValueError(f"need at least {num_params + 1} points with compute > 0 and >= min_compute, got {c.size}")
    log_c = np.log(c)

    # 1-2. grid over (A, C_mid), least-squares B per cell, lowest SSE
    if A_grid is None:
        start = (math.floor(R0 / A_STEP + 1e-9) + 1) * A_STEP
        A_grid = np.round(np.arange(start, A_max + 1e-9, A_STEP), 6)
        if A_grid.size == 0:
            raise ValueError(f"R0 = {R0} leaves no room for A in (R0, {A_max}]; pass A_grid")
    A_grid = np.asarray(A_grid, dtype=np.float64)
    if C_mid_grid is None:
        C_mid_grid = np.geomspace(c.min() / 10.0, c.max() * 10.0, NUM_C_MID)
    log_c_mid_grid = np.log(np.asarray(C_mid_grid, dtype=np.float64))
    b_grid, sse_grid = _fit_b_on_grid(log_c, y, A_grid, log_c_mid_grid, R0)
    i, j = np.unravel_index(np.argmin(sse_grid), sse_grid.shape)
    theta = np.array([A_grid[i], b_grid[i, j], log_c_mid_grid[j]] + ([R0] if r0_mode == "fit" else []))
    R0_fixed = None if r0_mode == "fit" else R0
    log_c_mid_range = (float(log_c_mid_grid.min()), float(log_c_mid_grid.max()))

    # 3. joint refinement
    if refine:
        refined = _refine(theta, log_c, y, R0_fixed, A_max, log_c_mid_range)
        if _sse(refined, log_c, y, R0_fixed) <= _sse(theta, log_c, y, R0_fixed):
            theta = refined
    sse = _sse(theta, log_c, y, R0_fixed)

    if uncertainty == "covariance":
        _, jac = _model_and_jac(theta, log_c, R0_fixed)  # [N', P]
        sigma2 = sse / max(c.size - num_params, 1)
        errors = np.sqrt(np.clip(np.diag(np.linalg.pinv(jac.T @ jac)) * sigma2, 0.0, None))  # [P]
        errors[2] = math.exp(theta[2]) * errors[2]  # delta method: se(C_mid) = C_mid · se(ln C_mid)
    else:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, c.size, size=c.size)
            if np.unique(c[idx]).size < num_params:
                continue  # too few distinct points to determine the curve
            th = _refine(theta, log_c[idx], y[idx], R0_fixed, A_max, log_c_mid_range)
            if not np.isfinite(th).all():
                continue
            draws.append(np.concatenate([th[:2], [math.exp(th[2])], th[3:]]))
        if len(draws) < 2:
            raise ValueError("bootstrap: too few usable resamples; use uncertainty='covariance'")
        errors = np.std(np.stack(draws), axis=0, ddof=1)  # [P]

    R0_final = float(theta[3]) if r0_mode == "fit" else R0
    at_bounds = _at_bounds(theta, R0_final, A_max, log_c_mid_range)
    if at_bounds:
        warnings.warn(f"sigmoid fit: {', '.join(at_bounds)} ended on a bound of the search (A={theta[0]:.4g}, "
                      f"B={theta[1]:.4g}, C_mid={math.exp(theta[2]):.4g}): the points do not determine the curve "
                      "(too flat or too noisy); treat its extrapolation as unreliable", stacklevel=2)
    return SigmoidFit(
        A=float(theta[0]), B=float(theta[1]), C_mid=float(math.exp(theta[2])), R0=R0_final,
        A_err=float(errors[0]), B_err=float(errors[1]), C_mid_err=float(errors[2]),
        R0_err=float(errors[3]) if r0_mode == "fit" else None,
        uncertainty=uncertainty, sse=float(sse), n_points=int(c.size), r0_mode=r0_mode, at_bounds=at_bounds,
    )


def _at_bounds(theta: np.ndarray, R0: float, A_max: float, log_c_mid_range: tuple[float, float],
               *, rtol: float = 1e-4) -> tuple[str, ...]:
    """Names of the parameters within `rtol` (relative, in ln B / ln C_mid / A units) of a search bound."""
    A, B, log_c_mid = float(theta[0]), float(theta[1]), float(theta[2])
    hits = []
    if A >= A_max - rtol or abs(A - R0) <= rtol:
        hits.append("A")
    log_b, (b_lo, b_hi) = math.log(B), (math.log(B_BOUNDS[0]), math.log(B_BOUNDS[1]))
    if min(log_b - b_lo, b_hi - log_b) <= rtol * (b_hi - b_lo):
        hits.append("B")
    lo, hi = log_c_mid_range
    if min(log_c_mid - lo, hi - log_c_mid) <= rtol * max(hi - lo, 1.0):
        hits.append("C_mid")
    return tuple(hits)


def _sse(theta: np.ndarray, log_c: np.ndarray, rate: np.ndarray, R0_fixed: float | None) -> float:
    return float(((_model_and_jac(theta, log_c, R0_fixed)[0] - rate) ** 2).sum())


@dataclass(frozen=True)
class ExtrapolationCheck:
    """A fit on the early points and its error on the later, held-out points (absolute pass-rate units).

    split_compute: the largest compute that was fitted; heldout_compute/heldout_rate/predicted: [M]."""

    fit: SigmoidFit
    split_compute: float
    heldout_compute: np.ndarray
    heldout_rate: np.ndarray
    predicted: np.ndarray
    mean_abs_error: float
    rmse: float
    max_abs_error: float
    final_abs_error: float


def extrapolation_check(compute: Sequence[float] | np.ndarray, pass_rate: Sequence[float] | np.ndarray, *,
                        fraction: float = 0.5, **fit_kwargs) -> ExtrapolationCheck:
    """Fit on the first `fraction` of the points (ordered by compute) and predict the rest.

    The split is by number of points (evaluations), which for evenly spaced evaluations is also by compute.
    fit_kwargs go to `fit_sigmoid`; with r0="initial", R0 comes from the early points, as it would in a real
    forecast. final_abs_error is the error at the largest compute, the forecast that matters most.
    """
    c = np.asarray(compute, dtype=np.float64).reshape(-1)
    y = np.asarray(pass_rate, dtype=np.float64).reshape(-1)
    order = np.argsort(c, kind="stable")
    c, y = c[order], y[order]
    n_fit = math.floor(c.size * fraction)
    if n_fit < 1 or n_fit >= c.size:
        raise ValueError(f"fraction={fraction} leaves {n_fit} of {c.size} points to fit; need some on each side")
    fit = fit_sigmoid(c[:n_fit], y[:n_fit], **fit_kwargs)
    heldout_c, heldout_y = c[n_fit:], y[n_fit:]
    predicted = fit.predict(heldout_c)
    err = np.abs(predicted - heldout_y)  # [M]
    return ExtrapolationCheck(
        fit=fit, split_compute=float(c[n_fit - 1]), heldout_compute=heldout_c, heldout_rate=heldout_y,
        predicted=predicted, mean_abs_error=float(err.mean()), rmse=float(np.sqrt((err**2).mean())),
        max_abs_error=float(err.max()), final_abs_error=float(err[-1]),
    )


def read_curve(path: str | Path, compute_key: str, rate_key: str, *,
               cumulative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(compute, pass rate) points from an RL run's metrics.jsonl (rows {"step": int, key: number, ...}).

    Rows with the same step are merged (a run may log training and evaluation metrics in separate rows); a point
    is every step that has `rate_key`. compute_key: e.g. "time/total" (already cumulative; a step without it takes
    the latest earlier value, 0 before the first, as for an evaluation before training) or, with cumulative=True,
    a per-step amount such as "tokens" summed over all steps up to and including the point (steps without it add
    0). compute_key may be "step" itself. Returns [N], [N] ordered by step.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such metrics file")
    merged: dict[int, dict] = {}
    seen_keys: set[str] = set()
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise DataError(f"{path}, line {line_no}: expected an object with an integer 'step'")
        for key in (compute_key, rate_key):
            value = row.get(key)
            if key in row and (isinstance(value, bool) or not isinstance(value, (int, float))
                               or not math.isfinite(value)):
                raise DataError(f"{path}, line {line_no}, key {key!r}: expected a finite number, got {value!r}")
        seen_keys.update(row)
        merged.setdefault(row["step"], {}).update(row)

    for key in (rate_key, compute_key):
        if key not in seen_keys:
            raise DataError(f"{path}: no row has key {key!r}; keys present: {', '.join(sorted(seen_keys))}")
    compute_values, rates = [], []
    running = 0.0  # the cumulative sum, or the latest value of an already-cumulative key
    for step in sorted(merged):
        row = merged[step]
        if cumulative:
            running += float(row.get(compute_key, 0.0))
        elif compute_key in row:
            running = float(row[compute_key])
        if rate_key in row:
            compute_values.append(running)
            rates.append(float(row[rate_key]))
    return np.asarray(compute_values), np.asarray(rates)


def plot_fit(path: str | Path, compute: Sequence[float] | np.ndarray, pass_rate: Sequence[float] | np.ndarray,
             fit: SigmoidFit, *, fitted_upto: float | None = None, title: str | None = None,
             compute_label: str = "compute") -> Path:
    """Points and the fitted law to a PNG (Agg canvas, no pyplot state). Points beyond `fitted_upto` are drawn as
    held out; the asymptote A and C_mid are marked, and the parameters with their errors are printed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = np.asarray(compute, dtype=np.float64)
    y = np.asarray(pass_rate, dtype=np.float64)
    positive = c > 0
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    held = positive & (c > fitted_upto) if fitted_upto is not None else np.zeros_like(positive)
    ax.scatter(c[positive & ~held], y[positive & ~held], s=18, color="C0", label="fitted points", zorder=3)
    if held.any():
        ax.scatter(c[held], y[held], s=18, facecolors="none", edgecolors="C1", label="held out", zorder=3)
    grid = np.geomspace(c[positive].min(), c[positive].max() * 2.0, 300)
    ax.plot(grid, fit.predict(grid), color="C2", label="sigmoid fit")
    ax.axhline(fit.A, color="gray", ls="--", lw=0.8)
    ax.axvline(fit.C_mid, color="gray", ls=":", lw=0.8)
    if fitted_upto is not None:
        ax.axvline(fitted_upto, color="C1", ls="-.", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(compute_label)
    ax.set_ylabel("pass rate")
    ax.set_title(title or "R_C = R0 + (A - R0) / (1 + (C_mid / C)^B)")
    ax.text(0.02, 0.97, f"A = {fit.A:.3f} ± {fit.A_err:.3f}\nB = {fit.B:.2f} ± {fit.B_err:.2f}\n"
            f"C_mid = {fit.C_mid:.4g} ± {fit.C_mid_err:.2g}\nR0 = {fit.R0:.3f} ({fit.r0_mode})\n"
            f"errors: {fit.uncertainty}", transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
    ax.legend(loc="lower right", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
