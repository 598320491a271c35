"""The routing benchmarks' numbers (window recall, error inside event windows, FLOPs against the budget)
come from these helpers, so each is checked on a case small enough to count by hand."""

import numpy as np
import pytest
import torch

from oryx_ts.config import BudgetConfig, preset
from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.datasets.scenarios import SCENARIOS
from oryx_ts.evaluation.audit import rare_regime_audit
from oryx_ts.evaluation.routing import (
    WARMUP,
    attention_ceiling,
    choose_controller,
    flatten,
    forced_forecast,
    fresh_streams,
    routing_scores,
    run_router,
    scored_tokens,
    segments,
    window_recall,
)
from oryx_ts.flops import mode_costs
from oryx_ts.routers import FixedRouter, NoneRouter, SurpriseRouter
from tests.conftest import random_model


def test_segments_cut_the_stream_in_order_and_flatten_undoes_it():
    values = np.arange(30 * 2, dtype=np.float32).reshape(30, 2)
    x = segments(values, seg_tokens=3, n_seg=2, patch_len=4)
    assert x.shape == (2, 12, 2) and np.array_equal(x[1, 0].numpy(), values[12])
    assert np.array_equal(flatten(x), values[:24])
    with pytest.raises(ValueError, match="need 24 steps, got 20"):
        segments(values[:20], 3, 2, 4)
    assert scored_tokens(4, 2, warmup=1).tolist() == [False, True, True, True] * 2


def test_window_recall_counts_attention_among_the_first_tokens_from_the_start():
    P = 4
    modes = np.zeros(10)
    modes[[4, 9]] = 1
    windows = [
        LabelWindow(8, 16, "spike"),  # tokens 2-3; token 4 is among its first 3 tokens: recalled
        LabelWindow(12, 14, "spike"),  # token 3 only, but tokens 3-5 are read: recalled
        LabelWindow(20, 40, "fault"),  # tokens 5-9, first 3 quiet: missed
        LabelWindow(36, 44, "regime_switch"),  # not a kind asked for
        LabelWindow(40, 48, "spike"),  # starts after the last token: not counted
    ]
    assert window_recall(modes, windows, P, ("spike", "fault")) == (2, 3)
    assert window_recall(modes, windows, P, ("spike", "fault"), first_tokens=1) == (0, 3)
    # the audit reads only tokens that overlap the window, so it misses the short one
    audit = rare_regime_audit(modes, np.zeros((10, 1, 1, 1)), np.zeros((48, 1)), windows[1:2], patch_len=P,
                              quantiles=np.array([0.5]), median_index=0)
    assert audit.window_recall == 0.0


def test_routing_scores_by_hand():
    config = preset("debug")
    P, Hz, C = config.tokenizer.patch_len, config.head.horizon, config.tokenizer.channels
    assert config.head.quantiles == (0.1, 0.5, 0.9)
    seg_tokens, n_seg = WARMUP + 4, 2  # scored: tokens 16-19 and 36-39
    T = seg_tokens * n_seg
    values = np.zeros((T * P + Hz, C), np.float32)
    windows = [LabelWindow(18 * P, 20 * P, "spike"), LabelWindow(36 * P, 38 * P, "spike"), LabelWindow(38 * P, 40 * P, "recurring_repeat"),
               LabelWindow(2 * P, 4 * P, "fault")]  # the fault lies in the warm-up: in the recall, not in the errors
    median = np.ones(T)
    median[[2, 3, 18, 19, 36, 37]] = 3.0
    median[[38, 39]] = 5.0
    forecasts = np.broadcast_to(median[:, None, None, None] + np.array([-1.0, 0.0, 1.0]), (T, Hz, C, 3))
    modes = np.zeros(T)
    modes[[2, 18]] = 1  # the fault and the first spike caught, the second spike and the repeat missed
    rec = mode_costs(config, 0, seg_tokens).recurrent_T[0]
    flops, allowance = rec + 10 * modes, np.full(T, rec + 2.0)
    scores = routing_scores(modes, forecasts, values, windows, config=config, seg_tokens=seg_tokens,
                            events=("spike", "fault", "recurring_repeat"), flops_T=flops, allowance_T=allowance)
    assert scores["n_windows"] == 4 and scores["window_recall"] == 0.5 and scores["token_precision"] == 1.0
    assert scores["anomaly_recall"] == pytest.approx(2 / 3)
    assert scores["mae_in"] == pytest.approx((3 * 4 + 5 * 2) / 6)  # scored event tokens 18, 19, 36-39
    assert scores["mae_anomaly"] == pytest.approx(3.0) and scores["mae_repeat"] == pytest.approx(5.0)
    assert scores["mae_all"] == pytest.approx(24 / 8)
    # target 0 below every quantile: the pinball loss is (1 - q) x the prediction, CRPS twice its mean
    assert scores["crps_all"] == pytest.approx(2 * (1.5 * 3.0 - 0.8) / 3)
    assert scores["realized_over_budget"] == pytest.approx((T * rec + 20) / (T * (rec + 2)))
    assert scores["surcharge_over_budget"] == pytest.approx(20 / (2 * T))
    assert np.isnan(routing_scores(modes, forecasts, values, windows, config=config, seg_tokens=seg_tokens,
                                   events=("spike",))["realized_over_budget"])  # no FLOPs given


def test_forced_forecast_lays_per_token_modes_out_segment_after_segment():
    model = random_model()
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    x = torch.randn(2, 12 * P, C, generator=torch.Generator().manual_seed(0))
    rec, att = forced_forecast(model, x, 0.0), forced_forecast(model, x, 1.0)
    assert rec.shape == (24, model.config.head.horizon, C, len(model.config.head.quantiles))
    assert np.array_equal(att, forced_forecast(model, x, np.ones(24, np.float32)))
    mixed = forced_forecast(model, x, np.repeat([0.0, 1.0], 12))
    np.testing.assert_allclose(mixed[:12], rec[:12], rtol=0, atol=1e-6)
    np.testing.assert_allclose(mixed[12:], att[12:], rtol=0, atol=1e-6)
    assert not np.allclose(rec[12:], att[12:])


def test_run_router_streams_each_segment_like_the_forward():
    model = random_model()
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    x = torch.randn(2, 12 * P, C, generator=torch.Generator().manual_seed(1))
    forecast, modes, flops, allowance = run_router(model, x, NoneRouter(), BudgetConfig(fraction=0.1))
    assert modes.shape == flops.shape == allowance.shape == (24,) and not modes.any()
    np.testing.assert_allclose(forecast, forced_forecast(model, x, 0.0), rtol=1e-4, atol=1e-4)
    modes = run_router(model, x, FixedRouter(4), BudgetConfig(fraction=0.5))[1]
    assert np.array_equal(np.flatnonzero(modes), [3, 7, 11, 15, 19, 23])  # each segment's clock starts at 0


@pytest.mark.slow
def test_controller_choice_and_fresh_streams_on_a_short_stream():
    model = random_model()
    scenario, seg_tokens, n_seg, seed = SCENARIOS["anomalies"], 160, 1, 4  # seed 4's first 160 tokens hold a spike
    grid = ((0.3, 2.0), (0.5, 3.0))
    best, trials = choose_controller(model, SurpriseRouter(), scenario, seg_tokens, n_seg, seed=seed, grid=grid)
    assert [(t["reserve"], t["spike_z"]) for t in trials] == list(grid)
    assert trials[0]["windows"] == trials[1]["windows"] > 0
    hits = [t["recalled"] for t in trials]
    assert best == grid[hits.index(max(hits))]

    (row,) = fresh_streams(model, {"fixed": FixedRouter(10)}, BudgetConfig(fraction=0.1), scenario, seg_tokens, n_seg, [seed])
    ceiling = attention_ceiling(model, scenario, seed, seg_tokens, n_seg)
    assert row["seed"] == seed and row["fixed"]["windows"] == trials[0]["windows"]
    assert 0 <= row["fixed"]["recalled"] <= row["fixed"]["windows"]
    assert row["all-recurrent"]["mae_in"] == ceiling["rec"] and row["all-attention"]["mae_in"] == ceiling["att"]
    assert all(np.isfinite(v) and v > 0 for v in ceiling.values())
