"""Routing on real data is reported per labelled window (reached in time, first attention token) and per kind, so those counts must be right."""

import numpy as np
import pytest

from oryx_ts.config import BudgetConfig
from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.evaluation.routing import RealStream, real_routing, real_stream
from oryx_ts.routers import AllRouter, OracleRouter
from tests.conftest import random_model


def test_real_routing_counts_windows_reached_and_first_attention_tokens():
    model = random_model()
    P, T = 8, 40
    values = np.random.default_rng(0).normal(size=(T * P, 4)).cumsum(0).astype(np.float32)
    windows = [LabelWindow(5 * P + 3, 9 * P, "extreme"), LabelWindow(20 * P, 22 * P, "outage"), LabelWindow(30 * P, 31 * P, "extreme")]
    mask = np.zeros(T, dtype=bool)
    mask[[7, 21, 35]] = True  # window 1 at its third token, window 2 at its second, window 3 never inside it
    stream = RealStream("fake", values, values, windows, "by hand")
    (row,) = real_routing(model, {"oracle": OracleRouter(mask)}, [BudgetConfig(fraction=1.0, window=8)], stream)
    assert row["first_attention"] == [2, 1, None]
    assert (row["recalled"], row["windows"]) == (2, 3)
    assert row["by_kind"] == {"extreme": [1, 2], "outage": [1, 1]}
    assert row["attention_rate"] == pytest.approx(3 / T) and row["realized_over_budget"] <= 1.0
    every, half = real_routing(model, {"all": AllRouter()}, [BudgetConfig(fraction=1.0, window=8), BudgetConfig(fraction=0.5, window=8)], stream)
    assert every["first_attention"] == [0, 0, 0] and every["recalled"] == 3 and every["attention_rate"] == 1.0
    assert half["budget"] == 0.5 and 0.0 < half["surcharge_over_budget"] <= 1.0 + 1e-9


def test_unknown_real_streams_are_refused():
    with pytest.raises(ValueError, match="unknown real stream"):
        real_stream("nope", 8)
