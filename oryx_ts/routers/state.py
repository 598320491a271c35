"""`RoutedState`: the streaming `State` plus what routing needs between tokens, serializable with it.

Legend: B series, W budget window, Pf forecast steps inside the next patch, C channels, Q quantiles.

Routing keeps: the forecast the last token made for the next patch (surprise of the next token),
the running surprise mean (its trend), the budget controller's past excess and threshold, the
last token's score, mode, FLOPs and allowance, and the FLOPs spent and allowed so far.
"""

from dataclasses import dataclass, fields

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from oryx_ts.routers.budget import Budget, ControllerState
from oryx_ts.state import State

_ROUTING = ("prev_forecast_BPCQ", "ema_B", *ControllerState.FIELDS, "last_score_B", "last_mode_B", "last_flops_B",
            "last_allowance_B", "spent_B", "allowed_B")


@dataclass
class RoutedState(State):
    """A `State` that also carries router and budget state; build it with `model.init_state(B, budget=...)`."""

    prev_forecast_BPCQ: torch.Tensor | None = None  # data units, the first Pf horizon steps
    ema_B: torch.Tensor | None = None  # float64
    controller: ControllerState | None = None
    last_score_B: torch.Tensor | None = None
    last_mode_B: torch.Tensor | None = None
    last_flops_B: torch.Tensor | None = None  # float64
    last_allowance_B: torch.Tensor | None = None  # float64; NaN without a budget
    spent_B: torch.Tensor | None = None  # float64, FLOPs spent since the start of the stream
    allowed_B: torch.Tensor | None = None  # float64, allowance summed since the start of the stream

    @classmethod
    def from_state(cls, state: State, *, forecast_shape: tuple[int, int, int], budget: Budget | None) -> "RoutedState":
        """Wrap a fresh `State` with empty routing state; `forecast_shape` is (Pf, C, Q)."""
        B, device = state.batch_size, state.norm_stats_B3C.device
        f64 = lambda: torch.zeros(B, dtype=torch.float64, device=device)  # noqa: E731
        return cls(
            **{f.name: getattr(state, f.name) for f in fields(State)},
            prev_forecast_BPCQ=torch.zeros(B, *forecast_shape, device=device),
            ema_B=f64(), controller=ControllerState.init(B, budget.window if budget else 1, device),
            last_score_B=torch.zeros(B, device=device), last_mode_B=torch.zeros(B, device=device),
            last_flops_B=f64(), last_allowance_B=f64(), spent_B=f64(), allowed_B=f64(),
        )

    def _routing_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in _ROUTING:
            t = getattr(self.controller, name) if name in ControllerState.FIELDS else getattr(self, name)
            out[f"routing.{name}"] = t.contiguous()
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().to_tensors(), **self._routing_tensors()}

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self._routing_tensors().values())

    def clone(self) -> "RoutedState":
        base = State.clone(self)
        t = {k.split(".", 1)[1]: v.clone() for k, v in self._routing_tensors().items()}
        return self._build(base, t)

    @classmethod
    def _build(cls, base: State, t: dict[str, torch.Tensor]) -> "RoutedState":
        return cls(
            **{f.name: getattr(base, f.name) for f in fields(State)},
            controller=ControllerState(**{f: t.pop(f) for f in ControllerState.FIELDS}), **t,
        )

    @classmethod
    def load(cls, path, *, capacity: int | None = None) -> "RoutedState":
        """Read a routed state written by `save`; raises `ValueError` for a corrupt file or one without routing state."""
        base = State.load(path, capacity=capacity)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read state file {path}: {e}") from e
        missing = [n for n in _ROUTING if f"routing.{n}" not in tensors]
        if missing:
            raise ValueError(f"state file {path} holds no routing state (missing {missing[:3]}); load it with State.load")
        return cls._build(base, {n: tensors[f"routing.{n}"] for n in _ROUTING})

