"""Our backtest scores are gluonts.ev's definitions: each one is checked against gluonts on random data."""

import numpy as np
import pytest

from oryx_ts.evaluation.metrics import (
    interval_coverage,
    point_scores,
    quantile_coverage,
    score_forecasts,
    seasonal_scale,
    weighted_quantile_loss,
)

ev = pytest.importorskip("gluonts.ev.metrics", reason="gluonts (the forecasting extra) holds the reference metrics")
from gluonts.ev.ts_stats import seasonal_error  # noqa: E402

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _gluonts(metric, data: dict, axis=None) -> np.ndarray:
    """Evaluate one gluonts.ev metric definition over a batch of series (rows of `data`)."""
    evaluator = metric(axis=axis)
    evaluator.update(data)
    return evaluator.get()


def _random(seed: int, n_series: int = 6, length: int = 40):
    rng = np.random.default_rng(seed)
    target = rng.normal(3.0, 2.0, (n_series, length))
    pred = np.sort(target[..., None] + rng.normal(0, 1.5, (n_series, length, len(QUANTILES))), axis=-1)
    history = rng.normal(3.0, 2.0, (n_series, 200)) + np.sin(np.arange(200) * 2 * np.pi / 12)
    return target, pred, history


def _data(target, pred, scale):
    data = {"label": target, "seasonal_error": scale[:, None]}
    data |= {str(q): pred[..., i] for i, q in enumerate(QUANTILES)}
    data["mean"] = data["0.5"]
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_gluonts(seed):
    target, pred, history = _random(seed)
    scale = np.array([seasonal_error(h, 12)[0] for h in history])
    np.testing.assert_allclose(seasonal_scale(history.T, 12), scale, rtol=1e-12)
    data = _data(target, pred, scale)
    # our layout: series are channels (trailing axis), time is the horizon axis
    target_NHzC, pred_NHzCQ = target.T[None], np.moveaxis(pred, 0, 1)[None]
    ours = point_scores(pred_NHzCQ[..., 2], target_NHzC, scale)
    assert ours["mae"] == pytest.approx(float(_gluonts(ev.mae, data)), rel=1e-12)
    assert ours["rmse"] == pytest.approx(float(_gluonts(ev.rmse, data)), rel=1e-12)
    assert ours["mase"] == pytest.approx(float(_gluonts(ev.mase, data)), rel=1e-12)
    per = point_scores(pred_NHzCQ[..., 2], target_NHzC, scale, per_channel=True)
    np.testing.assert_allclose(per["mase"], _gluonts(ev.mase, data, axis=1), rtol=1e-12)
    np.testing.assert_allclose(per["rmse"], _gluonts(ev.rmse, data, axis=1), rtol=1e-12)
    wql = ev.MeanWeightedSumQuantileLoss(quantile_levels=QUANTILES)
    assert weighted_quantile_loss(pred_NHzCQ, target_NHzC, QUANTILES) == pytest.approx(float(_gluonts(wql, data)), rel=1e-12)
    np.testing.assert_allclose(weighted_quantile_loss(pred_NHzCQ, target_NHzC, QUANTILES, per_channel=True),
                               _gluonts(wql, data, axis=1), rtol=1e-12)
    for i, q in enumerate(QUANTILES):
        got = quantile_coverage(pred_NHzCQ, target_NHzC)[i]
        assert got == pytest.approx(float(_gluonts(ev.Coverage(q=q), data)), rel=1e-12)


def test_missing_targets_are_skipped():
    target, pred, history = _random(3)
    target_NHzC, pred_NHzCQ = target.T[None], np.moveaxis(pred, 0, 1)[None]
    holed = target_NHzC.copy()
    holed[0, ::3, 1] = np.nan
    keep = ~np.isnan(holed)
    scale = seasonal_scale(history.T, 12)
    got = point_scores(pred_NHzCQ[..., 2], holed, scale)
    assert got["mae"] == pytest.approx(np.abs(holed - pred_NHzCQ[..., 2])[keep].mean())
    # gluonts masks missing labels with a masked array; the kept entries alone give the same WQL
    data = _data(np.ma.masked_invalid(holed[0].T), np.moveaxis(pred_NHzCQ[0], 1, 0), scale)
    wql = ev.MeanWeightedSumQuantileLoss(quantile_levels=QUANTILES)
    assert weighted_quantile_loss(pred_NHzCQ, holed, QUANTILES) == pytest.approx(float(_gluonts(wql, data)), rel=1e-12)


def test_interval_coverage_and_summary():
    rng = np.random.default_rng(4)
    target = rng.normal(size=(50, 4, 2))
    pred = np.stack([target - 1, target, target + 1], axis=-1)
    pred[:10, ..., 2] = target[:10] - 0.5  # 10 of 50 origins miss above the interval
    assert interval_coverage(pred, target, 0, 2) == pytest.approx(0.8)
    summary = score_forecasts(pred, target, (0.1, 0.5, 0.9), scale_C=np.ones(2))
    assert summary["coverage_nominal"] == pytest.approx(0.8)
    assert summary["mae"] == 0.0 and summary["mase"] == 0.0
