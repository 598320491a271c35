"""Routing at run time: what `OryxForecaster.step` and `forward` call when given a router and a budget.

Legend: B series, T tokens, L raw steps, P patch length, D model dim, Hz horizon, C channels, Q quantiles.

Per token: surprise features from the forecast the previous token made for this patch, router
scores, then the budget controller's hard modes. One function (`route_token`) does it for a
streaming step; a routed forward either streams through `step` (routers that read surprise: their
decisions depend on earlier forecasts, so they are sequential by nature) or, for routers that do
not, decides every mode with the same controller first and runs the model in parallel.
"""

from dataclasses import dataclass

import numpy as np
import torch

from oryx_ts.config import OryxConfig
from oryx_ts.flops import mode_costs
from oryx_ts.routers.budget import Budget, ControllerState, controller_step
from oryx_ts.routers.features import N_FEATURES, surprise_features
from oryx_ts.routers.heuristics import Router, RouterInputs
from oryx_ts.routers.state import RoutedState


@dataclass
class RoutedForecast:
    """A routed forward: forecasts in data units and, per token, score, mode, FLOPs spent and allowance."""

    forecast: torch.Tensor  # (B, T, Hz, C, Q)
    scores_BT: torch.Tensor
    modes_BT: torch.Tensor  # 1 = attention
    flops_BT: torch.Tensor  # float64, by the `oryx_ts.flops` cost model
    allowance_BT: torch.Tensor  # float64; NaN without a budget


def forecast_steps(config: OryxConfig) -> int:
    """Pf: how many steps of the next patch a token's forecast covers."""
    return min(config.tokenizer.patch_len, config.head.horizon)


def make_routed_state(state, config: OryxConfig, budget: Budget | None) -> RoutedState:
    shape = (forecast_steps(config), config.tokenizer.channels, len(config.head.quantiles))
    return RoutedState.from_state(state, forecast_shape=shape, budget=budget)


def _decide(scores_B: torch.Tensor, ctrl: ControllerState, budget: Budget | None, config: OryxConfig, n: int):
    if budget is not None:
        return controller_step(scores_B, ctrl, budget, config, n)
    modes = (scores_B.detach().cpu() >= 0.5).float()
    costs = mode_costs(config, n, 1)
    flops = costs.recurrent_T[0] + modes.double() * costs.surcharge_T[0]
    return modes, flops, torch.full_like(flops, float("nan"))


def route_token(router: Router, budget: Budget | None, config: OryxConfig, state, tokens_B1D: torch.Tensor, patch_BPC: torch.Tensor) -> torch.Tensor:
    """Modes `(B, 1)` of the token at `state.n_tokens`; records score, mode, FLOPs and allowance in `state`.

    Raises `ValueError` if `state` is not a `RoutedState` (make it with `model.init_state(B, budget=...)`).
    """
    if not isinstance(state, RoutedState):
        raise ValueError("routing needs a RoutedState: create it with model.init_state(batch_size, budget=...) or routed=True")
    n = state.n_tokens
    has_prev = torch.tensor([n > 0])
    feats, state.ema_B = surprise_features(
        patch_BPC[:, None], state.prev_forecast_BPCQ[:, None], has_prev, state.ema_B,
        median_index=config.head.median_index, decay=config.router.surprise_decay,
    )
    scores = router.scores(RouterInputs(tokens_B1D, feats.to(tokens_B1D.device), torch.tensor([n])))[:, 0]
    modes, flops, allow = _decide(scores, state.controller, budget, config, n)
    state.last_score_B = scores.detach().float().cpu().to(state.last_score_B.device)
    state.last_mode_B = modes.to(state.last_mode_B.device)
    state.last_flops_B = flops.to(state.last_flops_B.device)
    state.last_allowance_B = allow.to(state.last_allowance_B.device)
    state.spent_B = state.spent_B + state.last_flops_B
    state.allowed_B = state.allowed_B + state.last_allowance_B
    return modes.to(tokens_B1D.device)[:, None]


def after_token(state: RoutedState, forecast_BHzCQ: torch.Tensor) -> None:
    """Keep the part of this token's forecast that covers the next patch, for the next token's surprise."""
    state.prev_forecast_BPCQ = forecast_BHzCQ[:, : state.prev_forecast_BPCQ.shape[1]].detach().clone()


@torch.no_grad()
def route_forward(model, x_BLC: torch.Tensor, router: Router, budget: Budget | None) -> RoutedForecast:
    """A routed forward over a whole stream from an empty state; see the module docstring."""
    config: OryxConfig = model.config
    P = config.tokenizer.patch_len
    model.tokenizer.check_input(x_BLC)
    B, T = x_BLC.shape[0], x_BLC.shape[1] // P
    if router.needs_surprise:
        state = model.init_state(B, capacity=T, budget=budget, routed=True)
        out = {k: [] for k in ("forecast", "scores", "modes", "flops", "allow")}
        for n in range(T):
            forecast, state = model.step(x_BLC[:, n * P : (n + 1) * P], state, router=router, budget=budget)
            for k, v in zip(out, (forecast, state.last_score_B, state.last_mode_B, state.last_flops_B, state.last_allowance_B)):
                out[k].append(v)
        stacked = {k: torch.stack(v, dim=1) for k, v in out.items()}
        return RoutedForecast(stacked["forecast"], stacked["scores"], stacked["modes"], stacked["flops"], stacked["allow"])
    tokens_BTD = model.tokenizer(x_BLC)[0]
    surprise = torch.zeros(B, T, N_FEATURES)
    scores_BT = router.scores(RouterInputs(tokens_BTD, surprise, torch.arange(T))).detach().float().cpu()
    ctrl = ControllerState.init(B, budget.window if budget else 1)
    decided = [_decide(scores_BT[:, n], ctrl, budget, config, n) for n in range(T)]
    modes, flops, allow = (torch.stack([d[i] for d in decided], dim=1) for i in range(3))
    forecast = model(x_BLC, modes.to(x_BLC.device))
    return RoutedForecast(forecast, scores_BT, modes, flops, allow)


def realized_over_budget(flops: np.ndarray | torch.Tensor, allowance: np.ndarray | torch.Tensor) -> float:
    """Realized FLOPs over the allowance, summed over tokens."""
    return float(np.asarray(flops, dtype=np.float64).sum() / np.asarray(allowance, dtype=np.float64).sum())
