"""The onset analysis decides whether a window's first tokens stand out from the rest of a series, so its ranks must be exact and its statistics causal."""

import numpy as np
import pytest
import torch

from oryx_ts.config import BudgetConfig
from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.evaluation.onset import budget_fill, decision_shares, local_top_share, onset_rows, onset_trace, rank_tables, signal_statistics, top_share
from oryx_ts.evaluation.routing import run_router
from oryx_ts.routers import FixedRouter, SurpriseRouter
from tests.conftest import random_model


def test_top_share_counts_the_tokens_scoring_at_least_as_high():
    v = np.array([0.5, 0.1, 0.9, 0.5, 0.3])
    assert top_share(v).tolist() == [0.6, 1.0, 0.2, 0.6, 0.8]
    # locally: the token and the window - 1 before it
    assert local_top_share(v, 2).tolist() == [1.0, 1.0, 0.5, 1.0, 1.0]
    assert local_top_share(v, 5)[-1] == pytest.approx(0.8)


def test_signal_statistics_are_causal_and_flag_a_level_shift():
    P, T = 8, 60
    values = np.random.default_rng(0).normal(size=(T * P, 2)).astype(np.float32)
    values[50 * P :, 1] += 20.0  # a level shift in one channel at token 50
    stats = signal_statistics(values, P, history=20)
    later = values.copy()
    later[55 * P :] = 100.0  # what comes after token 54 cannot change its statistics
    changed = signal_statistics(later, P, history=20)
    for k, v in stats.items():
        assert v.shape == (T,) and v[0] == 0.0
        np.testing.assert_array_equal(v[:55], changed[k][:55])
    assert stats["level"][50] == 1.0 and stats["deviation"][50] > 10 and stats["change"][50] > 10
    assert top_share(stats["change"])[50] == pytest.approx(1 / T)
    assert stats["deviation"][40] < 5


def test_onset_rows_read_the_first_tokens_of_each_window():
    tables = rank_tables({"s": np.arange(20.0)}, window=4)
    rows = onset_rows(tables, [LabelWindow(43, 60, "anomaly"), LabelWindow(80, 90, "anomaly")], patch_len=8, tokens=3)
    assert [(r["window"], r["token"], r["s"]["value"]) for r in rows] == [(1, 0, 5.0), (1, 1, 6.0), (1, 2, 7.0), (2, 0, 10.0), (2, 1, 11.0),
                                                                          (2, 2, 12.0)]
    assert rows[0]["s"]["top"] == pytest.approx(15 / 20) and rows[0]["s"]["local"] == pytest.approx(1 / 4)


def test_budget_fill_counts_the_attention_before_each_window_within_the_budget_window():
    modes = np.zeros(40)
    modes[[2, 10, 17, 18, 19, 20]] = 1  # token 20 is the second window's first token: not before it
    windows = [LabelWindow(8 * 12 + 5, 8 * 14, "anomaly"), LabelWindow(8 * 20, 8 * 22, "anomaly")]
    assert budget_fill(modes, windows, patch_len=8, window=8) == [1, 3]  # tokens 5..11 and 13..19
    assert budget_fill(modes, windows, patch_len=8, window=40) == [2, 5]


def test_the_trace_records_the_scores_and_modes_of_the_routed_run():
    model = random_model()
    P, T = model.config.tokenizer.patch_len, 48
    values = np.random.default_rng(1).normal(size=(T * P, model.config.tokenizer.channels)).cumsum(0).astype(np.float32)
    budget = BudgetConfig(fraction=0.2, window=16)
    trace = onset_trace(model, SurpriseRouter(), budget, values)
    modes = run_router(model, torch.as_tensor(values)[None], SurpriseRouter(), budget)[1]
    np.testing.assert_array_equal(trace.modes_T, modes)
    assert trace.scores_T.shape == (T,) and trace.surprise_TF.shape[0] == T
    err = np.expm1(trace.surprise_TF[:, 0])
    np.testing.assert_allclose(trace.scores_T, err / (1 + err), rtol=1e-6)
    assert trace.scores_T[0] == 0.0 and trace.scores_T[1:].max() > 0  # the first token has no earlier forecast
    with pytest.raises(ValueError, match="reads no surprise"):
        onset_trace(model, FixedRouter(4), budget, values)
    shares = decision_shares(trace, budget, model.config)  # no hold: every attention token asked or spiked
    assert shares["attention"] == pytest.approx(trace.modes_T.mean()) and shares["attention"] > 0
    assert shares["ordinary"] + shares["spike"] == pytest.approx(shares["attention"]) and shares["asked"] >= shares["ordinary"]
    with pytest.raises(ValueError, match="budget it ran under"):
        decision_shares(trace, BudgetConfig(fraction=0.05, window=16), model.config)
