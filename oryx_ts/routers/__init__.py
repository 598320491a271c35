"""Routers and the expected-FLOPs budget: attention where the stream needs it, recurrence elsewhere."""

from oryx_ts.config import BudgetConfig
from oryx_ts.routers.budget import ControllerState, HoldState, RankState, allowance, controller_step, window_sums
from oryx_ts.routers.features import N_FEATURES, surprise_features
from oryx_ts.routers.heuristics import (
    AllRouter,
    FixedRouter,
    NoneRouter,
    OracleRouter,
    RandomRouter,
    Router,
    RouterInputs,
    SurpriseRouter,
)
from oryx_ts.routers.learned import LearnedRouter
from oryx_ts.routers.runtime import RoutedForecast, RoutedForecaster, realized_over_budget
from oryx_ts.routers.state import RoutingState

__all__ = [
    "AllRouter",
    "BudgetConfig",
    "ControllerState",
    "FixedRouter",
    "HoldState",
    "LearnedRouter",
    "N_FEATURES",
    "NoneRouter",
    "OracleRouter",
    "RandomRouter",
    "RankState",
    "RoutedForecast",
    "RoutedForecaster",
    "RoutingState",
    "Router",
    "RouterInputs",
    "SurpriseRouter",
    "allowance",
    "controller_step",
    "realized_over_budget",
    "surprise_features",
    "window_sums",
]
