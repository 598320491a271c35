"""What the streams engine keeps per series and hands out: its state part, forecasts, ingest results, step records.

Legend: B series, M pending forecasts per series, Hz horizon, C channels, Q quantile levels, R rows of one micro-batch.
"""

from dataclasses import dataclass

import numpy as np
import torch

from oryx_ts.state import register_part
from oryx_ts.streams.regularizer import Rejection


@register_part
@dataclass
class ForecastState:
    """The engine's per-series forecasts and their scoring; every field has the series as leading axis."""

    served_BHzCQ: torch.Tensor  # the latest forecast, data units, adapted
    pending_frozen_BMHzCQ: torch.Tensor  # normalized units of its origin; slot j % M holds token j
    pending_served_BMHzCQ: torch.Tensor
    pending_mean_BMC: torch.Tensor  # float64, the origin's normalization
    pending_std_BMC: torch.Tensor
    pending_token_BM: torch.Tensor  # int64 origin token, -1 = empty
    pending_label_BM: torch.Tensor  # bool, origin token overlaps a labelled window
    sums_BK: torch.Tensor  # float64 running sums, columns `SUMS`


STATE_BYTES_KEPT = 256

SUMS = (
    "abs_frozen", "abs_served", "pinball_frozen", "pinball_served", "entries",
    "abs_served_in", "entries_in", "abs_served_out", "entries_out", "attention_tokens",
)


@dataclass(frozen=True)
class IngestResult:
    """What one `ingest` did: rows accepted, rows rejected (with reasons), whole patches queued."""

    accepted: int
    rejected: list[Rejection]
    patches_queued: int


@dataclass(frozen=True)
class Forecast:
    """The latest forecast of a series: quantiles over the horizon after its origin."""

    series_id: str
    token: int  # the origin token (patches consumed - 1)
    origin_timestamp: int  # timestamp of the last step the forecast has seen
    timestamps: np.ndarray  # (Hz,) int64, the steps forecast
    quantiles: tuple[float, ...]
    values: np.ndarray  # (Hz, C, Q) data units, served (adapted when adaptation is on)
    mode: float  # 1 = attention
    flops: float
    allowance: float  # NaN without a budget


@dataclass
class StepRecord:
    """One micro-batch of steps, for callers that keep per-token histories (backtests, audits).
    Its arrays belong to the receiver: no engine tensor shares their memory."""

    series_ids: list[str]
    tokens_R: np.ndarray
    served_RHzCQ: np.ndarray
    frozen_RHzCQ: np.ndarray
    modes_R: np.ndarray
    flops_R: np.ndarray
    allowance_R: np.ndarray
    state_bytes_R: np.ndarray
