"""Routers and the expected-FLOPs budget: attention where the stream needs it, recurrence elsewhere."""

from oryx_ts.routers.budget import Budget, ControllerState, controller_step, window_sums
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
from oryx_ts.routers.runtime import RoutedForecast, realized_over_budget, route_forward
from oryx_ts.routers.state import RoutedState

__all__ = [
    "AllRouter",
    "Budget",
    "ControllerState",
    "FixedRouter",
    "LearnedRouter",
    "N_FEATURES",
    "NoneRouter",
    "OracleRouter",
    "RandomRouter",
    "RoutedForecast",
    "RoutedState",
    "Router",
    "RouterInputs",
    "SurpriseRouter",
    "controller_step",
    "realized_over_budget",
    "route_forward",
    "surprise_features",
    "window_sums",
]
