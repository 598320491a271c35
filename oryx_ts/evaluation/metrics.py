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
