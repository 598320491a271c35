"""Forecast accuracy metrics over (origin, horizon, channel) grids; NaN targets are skipped."""

import numpy as np


def mae(point: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error over the entries where `target` is observed."""
    valid = ~np.isnan(target) & ~np.isnan(point)
    return float(np.abs(point[valid] - target[valid]).mean()) if valid.any() else float("nan")


def crps_quantiles(pred_Q: np.ndarray, target: np.ndarray, quantiles: np.ndarray) -> float:
    """CRPS approximated by twice the mean pinball loss over the quantile levels (trailing axis of `pred_Q`)."""
    valid = ~np.isnan(target)
    diff = target[valid][..., None] - pred_Q[valid]
    q = np.asarray(quantiles)
    pinball = np.maximum(q * diff, (q - 1) * diff)
    return float(2 * pinball.mean()) if valid.any() else float("nan")


def horizon_targets(values_LC: np.ndarray, origins_end: np.ndarray, horizon: int) -> np.ndarray:
    """Targets `(N, horizon, C)`: the `horizon` steps after each origin's last observed step (NaN past the end)."""
    L, C = values_LC.shape
    idx = origins_end[:, None] + 1 + np.arange(horizon)[None, :]
    out = np.full((len(origins_end), horizon, C), np.nan, dtype=np.float64)
    inside = idx < L
    out[inside] = values_LC[idx[inside]]
    return out


def seasonal_naive(values_LC: np.ndarray, origins_end: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """Seasonal-naive point forecasts `(N, horizon, C)`: the value one (or more) periods earlier, never after the origin."""
    h = np.arange(1, horizon + 1)
    lag = period * np.ceil(h / period).astype(int)
    idx = origins_end[:, None] + h[None, :] - lag[None, :]
    out = np.full((len(origins_end), horizon, values_LC.shape[1]), np.nan, dtype=np.float64)
    ok = idx >= 0
    out[ok] = values_LC[idx[ok]]
    return out


# --- Backtest scores: gluonts.ev's definitions, NaN targets skipped ---------------------------------
# The formulas below are gluonts.ev's (`absolute_error`, `squared_error`, `quantile_loss`, `coverage`,
# `absolute_scaled_error`, `MeanWeightedSumQuantileLoss`, `seasonal_error`), written in numpy so that
# the core install needs no gluonts; tests/evaluation/test_metrics.py checks them against gluonts.
# Arrays: target `(N, Hz, C)`, quantile forecasts `(N, Hz, C, Q)`; channel is the trailing target axis.


def seasonal_scale(values_LC: np.ndarray, period: int) -> np.ndarray:
    """MASE scale per channel `(C,)`: mean |y_t - y_{t-period}| over the pairs both observed (gluonts' `seasonal_error`).

    A `period` longer than the stream falls back to 1, as in gluonts. A channel with no observed pair gets NaN.
    """
    values = np.asarray(values_LC, dtype=np.float64)
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    if period >= len(values):
        period = 1
    diff = np.abs(values[period:] - values[:-period])
    valid = ~np.isnan(diff)
    counts = valid.sum(axis=0)
    sums = np.where(valid, diff, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _over(values: np.ndarray, valid: np.ndarray, per_channel: bool) -> np.ndarray | float:
    """Mean of `values` where `valid`, over everything (float) or over all but the trailing channel axis (C,)."""
    axes = tuple(range(values.ndim - 1)) if per_channel else None
    n = valid.sum(axis=axes)
    s = np.where(valid, values, 0.0).sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    return out if per_channel else float(out)


def point_scores(point: np.ndarray, target: np.ndarray, scale_C: np.ndarray | None = None,
                 *, per_channel: bool = False) -> dict[str, float | np.ndarray]:
    """MAE, RMSE and (with `scale_C`, see `seasonal_scale`) MASE of point forecasts over the observed targets.

    Aggregates pool every observed entry (gluonts' `Mean(axis=None)`); `per_channel=True` gives `(C,)` arrays.
    """
    point, target = np.asarray(point, np.float64), np.asarray(target, np.float64)
    valid = ~np.isnan(target) & ~np.isnan(point)
    err = np.abs(target - point)
    out = {"mae": _over(err, valid, per_channel), "rmse": np.sqrt(_over(err**2, valid, per_channel))}
    if scale_C is not None:
        scale = np.asarray(scale_C, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            scaled = err / scale
        out["mase"] = _over(scaled, valid & np.isfinite(scaled), per_channel)
    return out


def weighted_quantile_loss(pred_Q: np.ndarray, target: np.ndarray, quantiles: np.ndarray | tuple[float, ...],
                           *, per_channel: bool = False) -> float | np.ndarray:
    """CRPS as gluonts' mean weighted quantile loss: mean over levels q of sum 2|(y - y_q)(1[y_q >= y] - q)| / sum |y|.

    Sums run over the observed targets (all of them, or per channel); NaN where the sum of |y| is 0.
    """
    pred = np.asarray(pred_Q, np.float64)
    target = np.asarray(target, np.float64)
    q = np.asarray(quantiles, np.float64)
    valid = ~np.isnan(target)
    y = np.where(valid, target, 0.0)[..., None]
    loss = 2 * np.abs((y - pred) * ((pred >= y) - q))
    loss = np.where(valid[..., None] & ~np.isnan(pred), loss, 0.0)
    axes = tuple(range(target.ndim - 1)) if per_channel else tuple(range(target.ndim))
    num = loss.sum(axis=axes)  # (C, Q) or (Q,)
    den = np.abs(y[..., 0]).sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (num / (den[..., None] if per_channel else den)).mean(axis=-1)
        out = np.where(np.asarray(den) > 0, out, np.nan)
    return out if per_channel else float(out)


def quantile_coverage(pred_Q: np.ndarray, target: np.ndarray, *, per_channel: bool = False) -> np.ndarray:
    """Share of observed targets at or below each quantile forecast (gluonts' `coverage`): `(Q,)`, or `(C, Q)`."""
    pred, target = np.asarray(pred_Q, np.float64), np.asarray(target, np.float64)
    valid = np.broadcast_to(~np.isnan(target)[..., None], pred.shape)
    below = (target[..., None] <= pred).astype(np.float64)
    Q = pred.shape[-1]
    if per_channel:
        return np.stack([_over(below[..., i], valid[..., i], True) for i in range(Q)], axis=-1)
    return np.array([_over(below[..., i], valid[..., i], False) for i in range(Q)])


def interval_coverage(pred_Q: np.ndarray, target: np.ndarray, lo: int, hi: int, *, per_channel: bool = False) -> float | np.ndarray:
    """Share of observed targets inside `[pred[..., lo], pred[..., hi]]` (nominal: level hi - level lo)."""
    pred, target = np.asarray(pred_Q, np.float64), np.asarray(target, np.float64)
    valid = ~np.isnan(target)
    inside = ((target >= pred[..., lo]) & (target <= pred[..., hi])).astype(np.float64)
    return _over(inside, valid, per_channel)


def score_forecasts(pred_NHzCQ: np.ndarray, target_NHzC: np.ndarray, quantiles: tuple[float, ...], *,
                    scale_C: np.ndarray, per_channel: bool = False) -> dict[str, float | np.ndarray]:
    """Every backtest score of quantile forecasts: MAE, RMSE, MASE (on the level nearest 0.5), CRPS
    (`weighted_quantile_loss`), and coverage of the widest central interval (`coverage`, nominal in
    `coverage_nominal`). Aggregated over every observed entry, or per channel `(C,)`."""
    q = np.asarray(quantiles, np.float64)
    mid = int(np.argmin(np.abs(q - 0.5)))
    out = point_scores(pred_NHzCQ[..., mid], target_NHzC, scale_C, per_channel=per_channel)
    out["crps"] = weighted_quantile_loss(pred_NHzCQ, target_NHzC, q, per_channel=per_channel)
    if len(q) >= 2:
        out["coverage"] = interval_coverage(pred_NHzCQ, target_NHzC, 0, len(q) - 1, per_channel=per_channel)
        out["coverage_nominal"] = float(q[-1] - q[0])
    return out
