"""Replaying a long history in one parallel pass is only a shortcut if the backtest's per-token results stay those of the full replay."""

import numpy as np

from oryx_ts.evaluation.backtest import backtest_streams
from oryx_ts.routers import BudgetConfig, FixedRouter, RoutedForecaster
from tests.conftest import random_model


def test_a_prefilled_history_gives_the_full_replays_results():
    model = random_model("gdn", block={"retention": "bounded", "window": 6, "pinned": 2})
    routed = RoutedForecaster(model, FixedRouter(3), BudgetConfig(fraction=0.5, window=8))
    rng = np.random.default_rng(0)
    values = {f"s{i}": rng.normal(size=(40 * 8 + 5, 4)).astype(np.float32) for i in range(3)}
    values["s1"][100:120] = np.nan  # a gap inside the history
    full = backtest_streams(routed, values)
    fast = backtest_streams(routed, values, history=25 * 8 + 3)
    for sid in values:
        a, b = full[sid], fast[sid]
        np.testing.assert_allclose(b.forecasts_THzCQ, a.forecasts_THzCQ, rtol=1e-4, atol=1e-4)
        assert np.array_equal(a.modes_T, b.modes_T) and np.array_equal(a.flops_T, b.flops_T)
        assert a.audit["matured_entries"] == b.audit["matured_entries"]
