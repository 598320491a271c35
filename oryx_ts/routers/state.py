"""What routing keeps per series between tokens: a part of the streaming `State`.

Legend: B series, Pf forecast steps inside the next patch, C channels, Q quantiles.

`RoutingState` holds the forecast the last token made for the next patch (the surprise of the
next token), the running surprise mean (its trend), the last token's score, mode, FLOPs and
allowance, and the FLOPs spent and allowed so far. The budget controller's state is a part of its
own (`budget.ControllerState`). Both are registered state parts, so `State` selects, scatters
and serializes them with everything else.
"""

from dataclasses import dataclass

import torch

from oryx_ts.state import register_part


@register_part
@dataclass
class RoutingState:
    """Per-series routing state; every field has the series as its leading axis."""

    prev_forecast_BPCQ: torch.Tensor  # data units, the first Pf horizon steps of the last forecast
    ema_B: torch.Tensor  # float64, running mean of surprise feature 0
    last_score_B: torch.Tensor
    last_mode_B: torch.Tensor
    last_flops_B: torch.Tensor  # float64
    last_allowance_B: torch.Tensor  # float64; NaN without a budget
    spent_B: torch.Tensor  # float64, FLOPs spent since the start of the stream
    allowed_B: torch.Tensor  # float64, allowance summed since the start of the stream

    @classmethod
    def allocate(cls, batch_size: int, forecast_shape: tuple[int, int, int], device=None) -> "RoutingState":
        """Empty routing state; `forecast_shape` is (Pf, C, Q)."""
        f64 = lambda: torch.zeros(batch_size, dtype=torch.float64, device=device)  # noqa: E731
        f32 = lambda: torch.zeros(batch_size, device=device)  # noqa: E731
        return cls(
            prev_forecast_BPCQ=torch.zeros(batch_size, *forecast_shape, device=device),
            ema_B=f64(), last_score_B=f32(), last_mode_B=f32(), last_flops_B=f64(), last_allowance_B=f64(),
            spent_B=f64(), allowed_B=f64(),
        )
