"""`RoutedForecaster`: a plain forecaster wrapped with a router and an expected-FLOPs budget.

Legend: B series, T tokens, L raw steps, P patch length, D model dim, Hz horizon, C channels, Q quantiles.

Per token: surprise features from the forecast the previous token made for this patch, router
scores, then the budget controller's hard modes, then the model's step in those modes. `step`
does it for one patch of every series, each at its own position; `forward` over a whole stream
either streams through `step` (routers that read surprise: their decisions depend on earlier
forecasts, so they are sequential by nature) or, for routers that do not, decides every mode
with the same controller first and runs the model in parallel. Both give the same decisions.
"""

from dataclasses import dataclass

import numpy as np
import torch

from oryx_ts.config import BudgetConfig, OryxConfig
from oryx_ts.flops import mode_costs_at
from oryx_ts.model import OryxForecaster
from oryx_ts.routers.budget import ControllerState, HoldState, RankState, SpikeState, controller_run, controller_step
from oryx_ts.routers.features import N_FEATURES, surprise_features
from oryx_ts.routers.heuristics import Router, RouterInputs
from oryx_ts.routers.state import RoutingState
from oryx_ts.state import State


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


class RoutedForecaster:
    """A forecaster whose modes a router chooses under a budget; `forward` and `step` as the model's.

    `budget=None` runs a token in attention when its score is >= 0.5 (no controller); pass
    `model.config.budget` for the budget a checkpoint was trained for.
    """

    def __init__(self, model: OryxForecaster, router: Router, budget: BudgetConfig | None = None):
        if not isinstance(router, Router):
            raise TypeError(f"router must have `needs_surprise` and `scores(inputs)`, got {type(router).__name__}")
        if budget is not None and not isinstance(budget, BudgetConfig):
            raise TypeError(f"budget must be a BudgetConfig or None, got {type(budget).__name__}")
        if budget is not None and budget.spike_feature >= N_FEATURES:
            raise ValueError(f"budget.spike_feature = {budget.spike_feature}: there are {N_FEATURES} surprise features")
        self.model, self.router, self.budget = model, router, budget
        self.model_step = model.step  # the model's step; `compile_step` swaps in a compiled one
        self.config: OryxConfig = model.config

    @property
    def _holds(self) -> bool:
        return self.budget is not None and self.budget.hold > 0

    @property
    def _signals(self) -> bool:
        return self.budget is not None and self.budget.spike_feature >= 0

    @property
    def _ranks(self) -> bool:
        return self.budget is not None and self.budget.threshold == "window"

    def compile_step(self) -> None:
        """Run the model's part of every step through `torch.compile` (routing stays eager, on the host)."""
        self.model_step = torch.compile(self.model.step, dynamic=False)

    def init_state(self, batch_size: int, *, capacity: int = 256, device=None, parts=None) -> State:
        """An empty state with the routing and controller parts (and any further `parts`)."""
        c = self.config
        shape = (forecast_steps(c), c.tokenizer.channels, len(c.head.quantiles))
        window = self.budget.window if self.budget else 1
        routed = {
            "routing": lambda n, dev: RoutingState.allocate(n, shape, dev),
            "controller": lambda n, dev: ControllerState.init(n, window, dev),
        }
        if self._holds:
            routed["hold"] = lambda n, dev: HoldState.init(n, dev)
        if self._signals:
            routed["spike"] = lambda n, dev: SpikeState.init(n, dev)
        if self._ranks:
            routed["rank"] = lambda n, dev: RankState.init(n, window, dev)
        return self.model.init_state(batch_size, capacity=capacity, device=device, parts={**routed, **(parts or {})})

    def _decide(self, scores_B: torch.Tensor, ctrl: ControllerState, positions_B: torch.Tensor, hold: HoldState | None = None,
                feats_BF: torch.Tensor | None = None, spike: SpikeState | None = None, rank: RankState | None = None):
        if self.budget is not None:
            signal = feats_BF[:, self.budget.spike_feature] if self._signals else None
            return controller_step(scores_B, ctrl, self.budget, self.config, positions_B, hold, signal, spike, rank)
        modes = (scores_B.detach().cpu() >= 0.5).float()
        costs = mode_costs_at(self.config, positions_B.cpu().numpy())
        flops = torch.from_numpy(costs.recurrent_T) + modes.double() * torch.from_numpy(costs.surcharge_T)
        return modes, flops, torch.full_like(flops, float("nan"))

    @torch.no_grad()
    def step(self, patch_BPC: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Route and consume one patch per series; returns `(forecast_BHzCQ, state)`.

        The token's score, mode, FLOPs and allowance are recorded in `state.parts["routing"]`.
        Raises `ValueError` for a state without routing parts (make it with `init_state`).
        """
        self._check_state(state)
        rs, ctrl = state.parts["routing"], state.parts["controller"]
        embedded = self.model.embed_step(patch_BPC, state)
        n_B = state.n_tokens_B
        B = patch_BPC.shape[0]
        if self.router.needs_surprise:
            feats, ema = surprise_features(
                patch_BPC[:, None], rs.prev_forecast_BPCQ[:, None], (n_B > 0)[:, None], rs.ema_B,
                median_index=self.config.head.median_index, decay=self.config.router.surprise_decay,
            )
        else:
            feats, ema = torch.zeros(B, 1, N_FEATURES), rs.ema_B
        tokens = embedded.tokens_B1D
        scores = self.router.scores(RouterInputs(tokens, feats.to(tokens.device), n_B[:, None]))[:, 0]
        modes, flops, allow = self._decide(scores, ctrl, n_B, state.parts.get("hold"), feats[:, 0], state.parts.get("spike"),
                                           state.parts.get("rank"))
        forecast, state = self.model_step(patch_BPC, state, modes.to(patch_BPC.device), embedded=embedded)
        dev = rs.ema_B.device
        rs.ema_B = ema.to(dev)
        rs.last_score_B = scores.detach().float().to(dev)
        rs.last_mode_B = modes.to(dev)
        rs.last_flops_B = flops.to(dev)
        rs.last_allowance_B = allow.to(dev)
        rs.spent_B = rs.spent_B + rs.last_flops_B
        rs.allowed_B = rs.allowed_B + rs.last_allowance_B
        rs.prev_forecast_BPCQ = forecast[:, : rs.prev_forecast_BPCQ.shape[1]].detach().clone()
        return forecast, state

    @torch.no_grad()
    def forward(self, x_BLC: torch.Tensor) -> RoutedForecast:
        """A routed forward over whole streams from an empty state; see the module docstring."""
        model, P = self.model, self.config.tokenizer.patch_len
        model.tokenizer.check_input(x_BLC)
        B, T = x_BLC.shape[0], x_BLC.shape[1] // P
        if self.router.needs_surprise:
            state = self.init_state(B, capacity=T, device=x_BLC.device)
            rs = state.parts["routing"]
            out = {k: [] for k in ("forecast", "scores", "modes", "flops", "allow")}
            for n in range(T):
                forecast, state = self.step(x_BLC[:, n * P : (n + 1) * P], state)
                for k, v in zip(out, (forecast, rs.last_score_B, rs.last_mode_B, rs.last_flops_B, rs.last_allowance_B)):
                    out[k].append(v.cpu() if k != "forecast" else v)
            stacked = {k: torch.stack(v, dim=1) for k, v in out.items()}
            return RoutedForecast(stacked["forecast"], stacked["scores"], stacked["modes"], stacked["flops"], stacked["allow"])
        scores_BT, modes, flops, allow, _ = self._decide_all(x_BLC)
        forecast = model(x_BLC, modes.to(x_BLC.device))
        return RoutedForecast(forecast, scores_BT, modes, flops, allow)

    __call__ = forward

    def _decide_all(self, x_BLC: torch.Tensor, state: State | None = None):
        """Every token's decision for a router that reads no surprise: scores first, then the controller in order.

        From the stream's start, or continuing `state` (its controller part advances in place).
        """
        B, T = x_BLC.shape[0], x_BLC.shape[1] // self.config.tokenizer.patch_len
        tokens_BTD = self.model.embed(x_BLC, state)
        n_B = torch.zeros(B, dtype=torch.long) if state is None else state.n_tokens_B.cpu()
        positions_BT = n_B[:, None] + torch.arange(T)
        scores_BT = self.router.scores(RouterInputs(tokens_BTD, torch.zeros(B, T, N_FEATURES), positions_BT)).detach().float().cpu()
        ctrl = ControllerState.init(B, self.budget.window if self.budget else 1) if state is None else state.parts["controller"]
        hold = (HoldState.init(B) if state is None else state.parts["hold"]) if self._holds else None
        spike = (SpikeState.init(B) if state is None else state.parts["spike"]) if self._signals else None
        rank = (RankState.init(B, self.budget.window) if state is None else state.parts["rank"]) if self._ranks else None
        signal = np.zeros((B, T)) if self._signals else None  # the features of a router that reads no surprise are zeros, as in `step`
        if self.budget is not None:
            decided = controller_run(scores_BT.double().numpy(), ctrl, self.budget, self.config, n_B, hold, signal, spike, rank)
            modes, flops, allow = (torch.from_numpy(a) for a in decided)
            return scores_BT, modes.float(), flops, allow, ctrl
        modes, flops, allow = self._decide(scores_BT, ctrl, positions_BT)
        return scores_BT, modes, flops, allow, ctrl

    def _check_state(self, state: State) -> None:
        rs, ctrl = state.parts.get("routing"), state.parts.get("controller")
        if not isinstance(rs, RoutingState) or not isinstance(ctrl, ControllerState):
            raise ValueError("a routed step needs a state with routing parts: create it with RoutedForecaster.init_state")
        window = self.budget.window if self.budget else 1
        if ctrl.excess_BW.shape[1] != window - 1:
            raise ValueError(f"state was made for a budget window of {ctrl.excess_BW.shape[1] + 1} tokens, this budget has {window}")
        if self._holds and not isinstance(state.parts.get("hold"), HoldState):
            raise ValueError(f"budget.hold = {self.budget.hold} needs a state with a hold part: create it with RoutedForecaster.init_state")
        if self._signals and not isinstance(state.parts.get("spike"), SpikeState):
            raise ValueError(f"budget.spike_feature = {self.budget.spike_feature} needs a state with a spike part: "
                             "create it with RoutedForecaster.init_state")
        if self._ranks and not isinstance(state.parts.get("rank"), RankState):
            raise ValueError("budget.threshold = 'window' needs a state with a rank part: create it with RoutedForecaster.init_state")

    @torch.no_grad()
    def prefill(
        self, x_BLC: torch.Tensor, *, state: State | None = None, capacity: int = 256, parts=None
    ) -> tuple[RoutedForecast, State]:
        """Route and consume T patches per series in one parallel pass, as T calls of `step` would.

        From `state` (updated in place and returned; its routing and controller parts continue) or
        from a new state (`capacity` and `parts` as in `init_state`). Returns the routed forecast
        of the T tokens and the state. Only for routers that read no surprise (their decisions do
        not depend on earlier forecasts); raises `ValueError` for one that does (stream those
        through `step`), for a state without routing parts, or `parts` given with a `state`.
        """
        if self.router.needs_surprise:
            raise ValueError(f"{type(self.router).__name__} reads the surprise of earlier forecasts: its decisions are sequential, stream it")
        self.model.tokenizer.check_input(x_BLC)
        if state is None:
            state = self.init_state(x_BLC.shape[0], capacity=capacity, device=x_BLC.device, parts=parts)
        elif parts is not None:
            raise ValueError("parts apply to a new state only: a given state keeps its own")
        self._check_state(state)
        self.model.check_state(state, x_BLC.shape[0])
        scores_BT, modes, flops, allow, ctrl = self._decide_all(x_BLC, state)
        forecast, state = self.model.prefill(x_BLC, modes.to(x_BLC.device), state=state)
        rs = state.parts["routing"]
        dev = rs.ema_B.device
        rs.last_score_B, rs.last_mode_B = scores_BT[:, -1].to(dev), modes[:, -1].to(dev)
        rs.last_flops_B, rs.last_allowance_B = flops[:, -1].to(dev), allow[:, -1].to(dev)
        rs.spent_B = rs.spent_B + flops.sum(1).to(dev)
        rs.allowed_B = rs.allowed_B + allow.sum(1).to(dev)
        rs.prev_forecast_BPCQ = forecast[:, -1, : rs.prev_forecast_BPCQ.shape[1]].detach().clone()
        return RoutedForecast(forecast, scores_BT, modes, flops, allow), state


def realized_over_budget(flops: np.ndarray | torch.Tensor, allowance: np.ndarray | torch.Tensor) -> float:
    """Realized FLOPs over the allowance, summed over tokens."""
    return float(np.asarray(flops, dtype=np.float64).sum() / np.asarray(allowance, dtype=np.float64).sum())
