"""Streaming backtests: replay streams through `streams.Engine`, exactly the code path the service runs.

Legend: T tokens (forecast origins), L raw steps, Hz horizon, C channels, Q quantile levels.

Each stream is one series of the engine, fed in chunks of raw steps on an integer clock and
flushed after every chunk, so series share micro-batches as they would in the service. Per token
the backtest keeps what the engine recorded: the served forecast (adapted when adaptation is on),
the frozen forecast, mode, FLOPs, allowance and state bytes.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from oryx_ts.model import OryxForecaster
from oryx_ts.routers import OracleRouter, RoutedForecaster
from oryx_ts.streams.adapter import AdapterConfig
from oryx_ts.streams.engine import Engine, StepRecord
from oryx_ts.streams.store import MemoryStore


@dataclass
class StreamBacktest:
    """Per-token results of one replayed stream (token n covers raw steps n P .. n P + P - 1)."""

    forecasts_THzCQ: np.ndarray  # served, data units
    frozen_THzCQ: np.ndarray  # the model's own forecast, before adaptation
    modes_T: np.ndarray
    flops_T: np.ndarray
    allowance_T: np.ndarray
    state_bytes_T: np.ndarray
    audit: dict[str, Any]


PREFILL_TOKENS = 8192  # tokens per `Engine.prefill` call of a history


def backtest_streams(
    forecaster: OryxForecaster | RoutedForecaster,
    streams: Mapping[str, np.ndarray],
    *,
    adapter: AdapterConfig | None = None,
    labels: Mapping[str, list[tuple[int, int]]] | None = None,
    chunk: int | None = None,
    max_batch: int = 16384,
    progress: bool = False,
    desc: str = "backtest",
    history: int = 0,
) -> dict[str, StreamBacktest]:
    """Replay `(L, C)` streams (NaN = missing) through one engine; returns each stream's per-token results.

    Streams are fed `chunk` raw steps at a time (default: one patch) in rounds over all streams,
    with a `flush` after each round. `adapter` defaults to adaptation off (frozen forecasts served);
    `labels` are `[start, end)` raw-step windows per stream for the audits.
    `history` raw steps at the head of every stream are replayed in parallel chunks
    (`Engine.prefill`: routers that read no surprise; the adapter learns only after it) and the rest
    is streamed; the per-token results then equal a full replay within fp32 rounding (tested).
    Raises `ValueError` for a stream of the wrong width.
    """
    engine = Engine(forecaster, MemoryStore(), adapter=adapter or AdapterConfig(enabled=False), max_batch=max_batch)
    P, C = engine.P, engine.C
    chunk = chunk or P
    records: dict[str, dict[int, tuple]] = {sid: {} for sid in streams}

    def keep(rec: StepRecord) -> None:
        for i, sid in enumerate(rec.series_ids):
            records[sid][int(rec.tokens_R[i])] = (rec.served_RHzCQ[i], rec.frozen_RHzCQ[i], rec.modes_R[i], rec.flops_R[i],
                                                  rec.allowance_R[i], rec.state_bytes_R[i])

    engine.on_step = keep
    arrays = {}
    for sid, values in streams.items():
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != C:
            raise ValueError(f"stream {sid!r} must have shape (length, {C}), got {values.shape}")
        arrays[sid] = values
        engine.add_series(sid, step=1, origin=0, labels=(labels or {}).get(sid, ()))
    longest = max((len(v) for v in arrays.values()), default=0)
    if history:
        piece = PREFILL_TOKENS * P  # rows per prefill call: progress, and bounded memory for the rows in flight
        for sid, values in arrays.items():
            for lo in tqdm(range(0, history, piece), desc=f"{desc} (prefill)", disable=not progress, leave=False):
                head = values[lo : min(history, lo + piece)]
                observed = ~np.isnan(head).all(axis=1)
                result = engine.prefill(sid, lo + np.arange(len(head))[observed], head[observed])
                if result.rejected:
                    raise ValueError(f"stream {sid!r}: {len(result.rejected)} rows rejected, first: {result.rejected[0].detail}")
    for start in tqdm(range(history, longest, chunk), desc=desc, disable=not progress, leave=False):
        for sid, values in arrays.items():
            part = values[start : start + chunk]
            if len(part):
                _ingest_all(engine, sid, start, part)
        engine.flush()
    out = {}
    for sid, values in arrays.items():
        got = records[sid]
        T = len(values) // P
        assert sorted(got) == list(range(T)), f"stream {sid!r}: tokens {sorted(got)[:5]}... recorded, expected {T}"
        cols = list(zip(*(got[n] for n in range(T)))) if T else [[]] * 6
        stack = lambda i, dtype=None: np.stack(cols[i]).astype(dtype) if T else np.zeros(0)  # noqa: E731
        out[sid] = StreamBacktest(stack(0), stack(1), stack(2, np.float32), stack(3, np.float64), stack(4, np.float64),
                                  stack(5, np.int64), engine.audit(sid))
    return out


def _ingest_all(engine: Engine, sid: str, start: int, part_LC: np.ndarray) -> None:
    """Feed raw rows; rows with every channel missing are gaps on the grid, not observations to send."""
    observed = ~np.isnan(part_LC).all(axis=1)
    ts = np.arange(start, start + len(part_LC))
    result = engine.ingest(sid, ts[observed], part_LC[observed])
    if result.rejected:
        raise ValueError(f"stream {sid!r}: {len(result.rejected)} rows rejected, first: {result.rejected[0].detail}")
    if not observed[-1]:
        engine.advance(sid, int(ts[-1]))  # trailing gaps: nothing later would release them


@torch.no_grad()
def stream_forecasts(
    model: OryxForecaster, values_LC: np.ndarray, modes_T: torch.Tensor | np.ndarray, *, progress: bool = False, desc: str = "stream"
) -> np.ndarray:
    """Forecasts `(T, Hz, C, Q)` of a single series streamed through the engine; token n runs mode `modes_T[n]`.

    `values_LC` must hold a whole number of patches.
    """
    P = model.config.tokenizer.patch_len
    T = values_LC.shape[0] // P
    if values_LC.shape[0] != T * P:
        raise ValueError(f"stream length {values_LC.shape[0]} is not a multiple of patch_len {P}")
    router = OracleRouter(np.asarray(modes_T, dtype=np.float32))
    result = backtest_streams(RoutedForecaster(model, router), {"stream": values_LC}, progress=progress, desc=desc)
    return result["stream"].forecasts_THzCQ
