"""`Engine`: the one online runtime for the service and for backtests.

Legend: B series (rows of the pool), M pending forecasts per series, P patch length, Hz horizon,
C channels, Q quantile levels, R rows of one micro-batch.

Data flow per series: `ingest` → `Regularizer` (fixed grid, gaps = NaN, late/duplicate policy,
rejections with reasons) → patch buffer → a queue of whole patches. `flush` steps every series
with a queued patch, one patch per series per round, in micro-batches across series:
`State.select` → mature targets → `RoutedForecaster.step` → adapter → `State.scatter`.

All per-series tensors live in one pooled `State` (a row per series; rows are recycled when a
series is removed), with the engine's own parts: `ForecastState` (the served forecast and the
last M frozen/served forecasts still maturing, plus running error sums) and the adapter's
`AdapterState`. Host-side per series: the regularizer, the partial patch, queued patches, labels.

Matured targets: the forecast made at token j covers the Hz steps after patch j. When patch n is
stepped, the entries of forecasts j = n-M .. n-1 that fall in patch n mature: they are scored
(frozen and served forecasts, normalized by their own origin's statistics) and fed to the
adapter, once, before the model consumes patch n. A value is therefore never used before it was
ingested, and partial horizons count. Targets mature a whole patch at a time, when the engine
acts on them.
"""

import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from oryx_ts.config import OryxConfig
from oryx_ts.model import OryxForecaster
from oryx_ts.routers import NoneRouter, RoutedForecaster
from oryx_ts.state import State, register_part
from oryx_ts.streams.adapter import Adapter, AdapterConfig, AdapterState
from oryx_ts.streams.regularizer import Regularizer, RegularizerPolicy
from oryx_ts.streams.records import SUMS, STATE_BYTES_KEPT, Forecast, ForecastState, IngestResult, StepRecord
from oryx_ts.streams.store import MemoryStore, StateStore
from oryx_ts.streams import windows as label_windows

register_part(AdapterState)


@dataclass
class _Series:
    series_id: str
    row: int
    regularizer: Regularizer
    labels: list[tuple[int, int]]  # [start, end) timestamps
    buffer_LC: np.ndarray  # partial patch, < P rows
    first_index: int | None = None  # grid index of the series' first step (token 0 starts there)
    queue: deque = field(default_factory=deque)  # whole patches (P, C) float32, not yet stepped
    rejected: Counter = field(default_factory=Counter)
    windows_recalled: set = field(default_factory=set)
    windows_seen: set = field(default_factory=set)
    # (token, bytes) every `state_bytes_every` tokens, the last STATE_BYTES_KEPT samples (bounded memory)
    state_bytes: deque = field(default_factory=lambda: deque(maxlen=STATE_BYTES_KEPT))
    windows: tuple | None = None  # the labels as arrays, once the grid is known (`windows.label_arrays`)


class Engine:
    """Many series, each on its own clock, forecast after every patch; see the module docstring.

    forecaster: an `OryxForecaster` (all-recurrent) or a `RoutedForecaster` (router and budget).
    store: where `snapshot` writes and `restore` reads (default: in memory).
    adapter: online adaptation settings (`AdapterConfig(enabled=False)` turns it off).
    policy: the regularizer's late/duplicate policy for every series.
    max_batch: series per micro-batch. capacity: KV slots per series before growing (retention `all`).
    on_step: called with a `StepRecord` after each micro-batch.
    compile: run the forecaster's step and the target bookkeeping through `torch.compile` (a C++
        compiler on CPU; the first step of each batch size compiles for tens of seconds, later ones
        run about 3x faster for small batches, where the eager step is dominated by op overhead).
    """

    def __init__(
        self,
        forecaster: OryxForecaster | RoutedForecaster,
        store: StateStore | None = None,
        *,
        adapter: AdapterConfig | None = None,
        policy: RegularizerPolicy | None = None,
        max_batch: int = 16384,
        capacity: int = 64,
        on_step: Callable[[StepRecord], None] | None = None,
        state_bytes_every: int = 1024,
        compile: bool = False,
    ):
        if isinstance(forecaster, OryxForecaster):
            forecaster = RoutedForecaster(forecaster, NoneRouter())
        if not isinstance(forecaster, RoutedForecaster):
            raise TypeError(f"forecaster must be an OryxForecaster or a RoutedForecaster, got {type(forecaster).__name__}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.forecaster = forecaster
        self.model = forecaster.model
        self.config = forecaster.config
        self.store = store if store is not None else MemoryStore()
        self.policy = policy or RegularizerPolicy()
        self.max_batch = max_batch
        self.capacity = capacity
        self.on_step = on_step
        self.state_bytes_every = state_bytes_every
        c = self.config
        self.P, self.Hz, self.C = c.tokenizer.patch_len, c.head.horizon, c.tokenizer.channels
        self.Q = len(c.head.quantiles)
        self.M = math.ceil(self.Hz / self.P)
        self.adapter = Adapter(adapter or AdapterConfig(), self.Hz, self.C, c.head.quantiles)
        self.device = next(self.model.parameters()).device
        self._quantiles_f32 = torch.tensor(c.head.quantiles, dtype=torch.float32, device=self.device)
        h = np.arange(self.Hz)
        self._h_patch = torch.as_tensor(h // self.P, device=self.device)  # which later patch holds entry h
        self._h_step = torch.as_tensor(h % self.P, device=self.device)  # and which step of it
        if compile:
            forecaster.compile_step()
        self._mature_fn = torch.compile(self._mature, dynamic=False) if compile else self._mature
        self._blank = self._allocate(1)
        self.pool = self._allocate(0)
        self.series: dict[str, _Series] = {}
        self._free_rows: list[int] = []

    # --- series -------------------------------------------------------------------------------

    def _allocate(self, n: int) -> State:
        M, Hz, C, Q, dev = self.M, self.Hz, self.C, self.Q, self.device

        def forecast_part(b: int, device) -> ForecastState:
            return ForecastState(
                served_BHzCQ=torch.full((b, Hz, C, Q), float("nan"), device=device),
                pending_frozen_BMHzCQ=torch.zeros(b, M, Hz, C, Q, device=device),
                pending_served_BMHzCQ=torch.zeros(b, M, Hz, C, Q, device=device),
                pending_mean_BMC=torch.zeros(b, M, C, dtype=torch.float64, device=device),
                pending_std_BMC=torch.ones(b, M, C, dtype=torch.float64, device=device),
                pending_token_BM=torch.full((b, M), -1, dtype=torch.long, device=device),
                pending_label_BM=torch.zeros(b, M, dtype=torch.bool, device=device),
                sums_BK=torch.zeros(b, len(SUMS), dtype=torch.float64, device=device),
            )

        parts = self._parts = {"forecast": forecast_part, "adapter": lambda b, device: self.adapter.init_state(b, device)}
        if n == 0:
            return State.concat([self.forecaster.init_state(1, capacity=self.capacity, device=dev, parts=parts)]).select([])
        return self.forecaster.init_state(n, capacity=self.capacity, device=dev, parts=parts)

    def add_series(
        self,
        series_id: str,
        *,
        step: int | np.timedelta64 | None = None,
        origin: int | np.datetime64 | None = None,
        labels: Iterable[tuple[int, int]] = (),
    ) -> None:
        """Register a series (its grid `step` and `origin` are inferred from its first rows when not given).

        `labels`: `[start, end)` timestamp windows of a regime the router should not miss (audits).
        Raises `ValueError` for an id already in use.
        """
        if not isinstance(series_id, str) or not series_id:
            raise ValueError(f"series id must be a non-empty string, got {series_id!r}")
        if series_id in self.series:
            raise ValueError(f"series {series_id!r} already exists")
        reg = Regularizer(self.C, step=step, origin=origin, policy=self.policy)
        if not self._free_rows:
            grow = max(1, self.pool.batch_size)
            first = self.pool.batch_size
            self.pool = State.concat([self.pool, self._blank.select(torch.zeros(grow, dtype=torch.long))])
            self._free_rows = list(range(first + grow - 1, first - 1, -1))
        row = self._free_rows.pop()
        self.pool.scatter([row], self._blank)
        self.series[series_id] = _Series(series_id, row, reg, sorted((int(a), int(b)) for a, b in labels),
                                         np.empty((0, self.C), dtype=np.float32))

    def remove_series(self, series_id: str) -> None:
        """Forget a series and everything it holds; its row is reused. Raises `KeyError` for an unknown id."""
        s = self._get(series_id)
        del self.series[series_id]
        self._free_rows.append(s.row)

    def _get(self, series_id: str) -> _Series:
        try:
            return self.series[series_id]
        except KeyError:
            raise KeyError(f"unknown series {series_id!r}") from None

    # --- ingest and flush ---------------------------------------------------------------------

    def ingest(self, series_id: str, timestamps: Any, values: Any) -> IngestResult:
        """Regularize rows of one series and queue the whole patches they complete.

        Rejected rows (late, duplicate, off the grid, wrong width, not finite, empty) are listed
        with reasons and change nothing. Raises `KeyError` for an unknown series and `ValueError`
        for a batch that cannot be read at all (nothing is accepted then).
        """
        s = self._get(series_id)
        pushed = s.regularizer.push(timestamps, values)
        for r in pushed.rejected:
            s.rejected[r.reason] += 1
        return IngestResult(pushed.accepted, pushed.rejected, self._buffer(s, pushed))

    def advance(self, series_id: str, timestamp: int) -> int:
        """Declare that nothing more will arrive up to `timestamp`: the grid up to it is released (gaps as NaN).

        A heartbeat for series whose last steps are missing; returns patches queued. Raises
        `ValueError` when the series has no grid yet or `timestamp` is off it.
        """
        s = self._get(series_id)
        return self._buffer(s, s.regularizer.advance(timestamp))

    @torch.no_grad()
    def prefill(self, series_id: str, timestamps: Any, values: Any, *, chunk_tokens: int = 2048) -> IngestResult:
        """Consume a long stretch of one series in parallel chunks instead of patch by patch.

        The rows are regularized as by `ingest`; the whole patches they complete go through
        `RoutedForecaster.prefill` in chunks of at most `chunk_tokens` tokens, each continuing the
        series' state (so any length runs in memory bounded by the chunk and the retention), and
        their forecasts are scored and recorded as a flush would. The state, forecasts, scores and
        audits then equal those of ingesting and flushing the same rows, within fp32 rounding,
        except that the adapter does not learn during a prefill (it serves as it stands: the
        identity on a new series). The series may already hold tokens. For routers that read no
        surprise; raises `ValueError` for one that does, with patches still queued (flush first),
        or for `chunk_tokens < 1`.
        """
        s = self._get(series_id)
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if s.queue:
            raise ValueError(f"{series_id!r} has {len(s.queue)} patches queued: flush before a prefill")
        if self.forecaster.router.needs_surprise:
            raise ValueError(f"{type(self.forecaster.router).__name__} decides from earlier forecasts: ingest and flush instead")
        pushed = s.regularizer.push(timestamps, values)
        for r in pushed.rejected:
            s.rejected[r.reason] += 1
        rows_LC = pushed.released_LC
        if len(rows_LC) and s.first_index is None:
            s.first_index = pushed.first_index
        rows_LC = np.concatenate([s.buffer_LC, rows_LC]) if len(s.buffer_LC) else rows_LC
        T = len(rows_LC) // self.P
        s.buffer_LC = rows_LC[T * self.P :].copy()
        if T:
            sub = self.pool.select([s.row])
            for t0 in range(0, T, chunk_tokens):
                self._prefill_chunk(s, sub, rows_LC[t0 * self.P : min(T, t0 + chunk_tokens) * self.P])
            self.pool.scatter([s.row], sub)
        return IngestResult(pushed.accepted, pushed.rejected, 0)

    def _prefill_chunk(self, s: _Series, sub: State, rows_LC: np.ndarray) -> None:
        """One chunk of `prefill` for the single-series state `sub` (updated in place)."""
        P, M, dev = self.P, self.M, self.device
        x = torch.from_numpy(np.ascontiguousarray(rows_LC))[None].to(dev)
        T, n0 = len(rows_LC) // P, int(sub.n_tokens_B[0])
        tokens = n0 + np.arange(T)
        mean, std = self.model.statistics(x, sub)  # (1, T, C) fp64, each token's normalization
        bytes0 = int(sub.nbytes_B()[0])
        out, sub = self.forecaster.prefill(x, state=sub)
        bytes1 = int(sub.nbytes_B()[0])
        mean_f, std_f = mean[0].float()[:, None, :, None], std[0].float()[:, None, :, None]
        frozen = (out.forecast[0] - mean_f) / std_f  # (T, Hz, C, Q)
        ad = sub.parts["adapter"]
        served_norm = self.adapter.apply(type(ad)(**{k: t.expand(T, *t.shape[1:]) for k, t in vars(ad).items()}), frozen)
        if self.adapter.config.enabled:
            served = (served_norm.double() * std[0][:, None, :, None] + mean[0][:, None, :, None]).float()
        else:
            served = out.forecast[0]
        labelled = torch.as_tensor(label_windows.labelled([s] * T, tokens, self.P), device=dev)
        fc: ForecastState = sub.parts["forecast"]
        # the origins whose targets can lie in this chunk: the M pending before it, then the chunk's own
        j_prev = torch.arange(n0 - M, n0, device=dev)
        slot = j_prev % M
        ok = torch.cat([(j_prev >= 0) & (fc.pending_token_BM[0, slot] == j_prev), labelled.new_ones(T)])
        frozen_x = torch.cat([fc.pending_frozen_BMHzCQ[0, slot], frozen])
        served_x = torch.cat([fc.pending_served_BMHzCQ[0, slot], served_norm])
        mean_x, std_x = torch.cat([fc.pending_mean_BMC[0, slot], mean[0]]), torch.cat([fc.pending_std_BMC[0, slot], std[0]])
        label_x = torch.cat([fc.pending_label_BM[0, slot], labelled])
        # origin i's horizon step h is step (i + 1 - M) * P + h of the chunk; NaN outside it
        nan = lambda n: x.new_full((n, self.C), float("nan"))  # noqa: E731
        windows = torch.cat([nan(M * P), x[0], nan(self.Hz)])[P:].unfold(0, self.Hz, P)[: M + T].transpose(1, 2)
        target = (windows.double() - mean_x[:, None]) / std_x[:, None]
        new = ok[:, None, None] & ~torch.isnan(target)
        w, t0 = new.float(), torch.where(new, target, 0.0).float()
        both = torch.where(new[None, ..., None], torch.stack([frozen_x, served_x]), 0.0)
        abs_X = (both[..., self.config.head.median_index] - t0).abs() * w
        diff = t0[..., None] - both
        q = self._quantiles_f32
        pin_X = (torch.maximum(q * diff, (q - 1) * diff).mean(-1) * w).sum((1, 2, 3)).double()
        entries, err_in_I = w.sum().double(), abs_X[1].sum((1, 2)).double() * label_x
        n_in = (w.sum((1, 2)).double() * label_x).sum()
        abs_X = abs_X.sum((1, 2, 3)).double()
        sums = [abs_X[0], abs_X[1], pin_X[0], pin_X[1], entries, err_in_I.sum(), n_in, abs_X[1] - err_in_I.sum(), entries - n_in,
                out.modes_BT.sum().double()]
        fc.sums_BK[0] += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev) for v in sums])
        for j in range(max(0, T - M), T):
            k = (n0 + j) % M
            fc.pending_frozen_BMHzCQ[0, k], fc.pending_served_BMHzCQ[0, k] = frozen[j], served_norm[j]
            fc.pending_mean_BMC[0, k], fc.pending_std_BMC[0, k] = mean[0, j], std[0, j]
            fc.pending_token_BM[0, k], fc.pending_label_BM[0, k] = n0 + j, labelled[j]
        fc.served_BHzCQ = served[-1:].clone()
        label_windows.recall([s] * T, tokens, out.modes_BT[0].numpy(), self.P)
        # state bytes after each token: constant under bounded retention, linear in the tokens under `all`
        nbytes = bytes0 + (bytes1 - bytes0) * (np.arange(T) + 1) // T
        s.state_bytes.extend((int(n), int(nbytes[n - n0])) for n in tokens[tokens % self.state_bytes_every == 0])
        if self.on_step is not None:
            self.on_step(StepRecord([s.series_id] * T, tokens, served.cpu().numpy(), out.forecast[0].cpu().numpy(),
                                    out.modes_BT[0].numpy(), out.flops_BT[0].numpy(), out.allowance_BT[0].numpy(), nbytes))

    def drain(self, series_id: str) -> int:
        """End of a series' stream: release the rows its regularizer holds open; returns patches queued."""
        s = self._get(series_id)
        return self._buffer(s, s.regularizer.drain())

    def _buffer(self, s: _Series, pushed) -> int:
        rows_LC = pushed.released_LC
        if not len(rows_LC):
            return 0
        if s.first_index is None:
            s.first_index = pushed.first_index
        rows = np.concatenate([s.buffer_LC, rows_LC]) if len(s.buffer_LC) else rows_LC
        whole = len(rows) // self.P
        for k in range(whole):
            s.queue.append(rows[k * self.P : (k + 1) * self.P])
        s.buffer_LC = rows[whole * self.P :].copy()
        return whole

    @property
    def queued(self) -> int:
        """Whole patches waiting for `flush`."""
        return sum(len(s.queue) for s in self.series.values())

    def flush(self) -> int:
        """Step every queued patch (one per series per round, micro-batches across series); returns patches stepped."""
        stepped = 0
        while True:
            ready = sorted((s for s in self.series.values() if s.queue), key=lambda s: s.row)
            if not ready:
                return stepped
            for i in range(0, len(ready), self.max_batch):
                batch = ready[i : i + self.max_batch]
                self._step(batch, np.stack([s.queue.popleft() for s in batch]))
                stepped += len(batch)

    @torch.no_grad()
    def _step(self, batch: list[_Series], patches_RPC: np.ndarray) -> None:
        rows = torch.tensor([s.row for s in batch], dtype=torch.long, device=self.device)
        # every row of the pool in order (one series, or all series at once): step the pool itself, no copies
        whole = len(batch) == self.pool.batch_size and all(s.row == i for i, s in enumerate(batch))
        sub = self.pool if whole else self.pool.select(rows)
        patch = torch.from_numpy(patches_RPC).to(self.device)
        fc: ForecastState = sub.parts["forecast"]
        n_R = sub.n_tokens_B
        self._mature_fn(sub, fc, patch, n_R)

        forecast_RHzCQ, sub = self.forecaster.step(patch, sub)
        mean_RC, std_RC = self.model.normalization(sub)
        mean_f, std_f = mean_RC.float()[:, None, :, None], std_RC.float()[:, None, :, None]
        frozen = (forecast_RHzCQ - mean_f) / std_f
        served_norm = self.adapter.apply(sub.parts["adapter"], frozen)
        if self.adapter.config.enabled:
            served = (served_norm.double() * std_RC[:, None, :, None] + mean_RC[:, None, :, None]).float()
        else:
            served = forecast_RHzCQ  # the model's own forecast, without a round trip through normalized units
        slot = n_R % self.M
        r = torch.arange(len(batch), device=self.device)
        fc.pending_frozen_BMHzCQ[r, slot] = frozen
        fc.pending_served_BMHzCQ[r, slot] = served_norm
        fc.pending_mean_BMC[r, slot] = mean_RC
        fc.pending_std_BMC[r, slot] = std_RC
        fc.pending_token_BM[r, slot] = n_R
        fc.pending_label_BM[r, slot] = torch.as_tensor(label_windows.labelled(batch, n_R.cpu().numpy(), self.P), device=self.device)
        fc.served_BHzCQ = served
        routing = sub.parts["routing"]
        fc.sums_BK[:, SUMS.index("attention_tokens")] += routing.last_mode_B.double()
        label_windows.recall(batch, n_R.cpu().numpy(), routing.last_mode_B.cpu().numpy(), self.P)
        if not whole:
            self.pool.scatter(rows, sub)

        tokens = n_R.cpu().numpy()
        sample = tokens % self.state_bytes_every == 0
        nbytes = sub.nbytes_B().numpy() if sample.any() or self.on_step else None
        for i, (s, n, keep) in enumerate(zip(batch, tokens, sample)):
            if keep:
                s.state_bytes.append((int(n), int(nbytes[i])))
        if self.on_step is not None:
            # copies: on the CPU `served` is the pool's served forecast, which later writes change in place
            self.on_step(StepRecord(
                [s.series_id for s in batch], tokens, served.cpu().numpy().copy(), forecast_RHzCQ.cpu().numpy().copy(),
                routing.last_mode_B.cpu().numpy(), routing.last_flops_B.cpu().numpy(),
                routing.last_allowance_B.cpu().numpy(), nbytes,
            ))

    def _mature(self, sub: State, fc: ForecastState, patch_RPC: torch.Tensor, n_R: torch.Tensor) -> None:
        """Score the entries of pending forecasts that patch n completes, then let the adapter learn from them.

        Patch n holds horizon step h of exactly one forecast, the one made at token j = n - 1 - h // P,
        so the matured entries form one (R, Hz, C) grid gathered from the pending slots.
        """
        R = patch_RPC.shape[0]
        j_RH = n_R[:, None] - 1 - self._h_patch[None, :]
        slot_RH = j_RH % self.M
        r_RH = torch.arange(R, device=self.device)[:, None].expand(R, self.Hz)
        h_RH = torch.arange(self.Hz, device=self.device)[None, :].expand(R, self.Hz)
        valid_RH = (j_RH >= 0) & (fc.pending_token_BM[r_RH, slot_RH] == j_RH)
        mean_RHC, std_RHC = fc.pending_mean_BMC[r_RH, slot_RH], fc.pending_std_BMC[r_RH, slot_RH]
        target = (patch_RPC[:, self._h_step].double() - mean_RHC) / std_RHC
        new_RHC = valid_RH[..., None] & ~torch.isnan(target)
        target = torch.where(new_RHC, target, float("nan")).float()
        frozen = fc.pending_frozen_BMHzCQ[r_RH, slot_RH, h_RH]  # (R, Hz, C, Q): step h of its own forecast
        served = fc.pending_served_BMHzCQ[r_RH, slot_RH, h_RH]
        self.adapter.update(sub.parts["adapter"], frozen[:, None], target[:, None], new_RHC[:, None])

        med = self.config.head.median_index
        adapting = self.adapter.config.enabled
        w = new_RHC.float()
        t0 = torch.where(new_RHC, target, 0.0)
        both = torch.stack([frozen, served]) if adapting else frozen[None]  # served = frozen without adaptation
        both = torch.where(new_RHC[None, ..., None], both, 0.0)
        abs_XRHC = (both[..., med] - t0).abs() * w
        diff = t0[..., None] - both
        q = self._quantiles_f32
        pin_XR = (torch.maximum(q * diff, (q - 1) * diff).mean(-1) * w).sum((2, 3)).double()
        abs_XR = abs_XRHC.sum((2, 3)).double()
        err_served = abs_XRHC[-1]
        entries = w.sum((1, 2)).double()
        if bool(fc.pending_label_BM.any()):
            lab_RH1 = fc.pending_label_BM[r_RH, slot_RH].float()[..., None]
            err_in, n_in = (err_served * lab_RH1).sum((1, 2)).double(), (w * lab_RH1).sum((1, 2)).double()
        else:
            err_in = n_in = torch.zeros_like(entries)
        sums = torch.stack([
            abs_XR[0], abs_XR[-1], pin_XR[0], pin_XR[-1], entries,
            err_in, n_in, abs_XR[-1] - err_in, entries - n_in,
        ], dim=1)
        fc.sums_BK[:, : sums.shape[1]] += sums

    # --- reading ------------------------------------------------------------------------------

    def forecast(self, series_id: str) -> Forecast:
        """The latest forecast of a series; raises `KeyError` (unknown) or `ValueError` (no whole patch yet)."""
        s = self._get(series_id)
        r = s.row  # read the few fields a forecast needs, not a copy of the series' whole state
        n = int(self.pool.n_tokens_B[r]) - 1
        if n < 0:
            need = self.P - len(s.buffer_LC) - sum(len(p) for p in s.queue)
            raise ValueError(f"series {series_id!r} has no forecast yet: {need} more step(s) complete its first patch (then flush)")
        reg = s.regularizer
        i0 = s.first_index or 0
        origin = reg.timestamp_of(i0 + (n + 1) * self.P - 1)
        routing = self.pool.parts["routing"]
        return Forecast(
            series_id=series_id, token=n, origin_timestamp=origin,
            timestamps=reg.timestamp_of(i0 + (n + 1) * self.P) + reg.step * np.arange(self.Hz, dtype=np.int64),
            quantiles=tuple(self.config.head.quantiles),
            values=self.pool.parts["forecast"].served_BHzCQ[r].cpu().numpy().copy(),
            mode=float(routing.last_mode_B[r]), flops=float(routing.last_flops_B[r]),
            allowance=float(routing.last_allowance_B[r]),
        )

    def audit(self, series_id: str) -> dict[str, Any]:
        """What a series has cost and how well it forecast: state bytes, FLOPs against the allowance,
        attention rate, errors (normalized units) of the frozen and served forecasts, adapter gain
        and rollbacks, labelled-window recall and error, rejected rows by reason."""
        s = self._get(series_id)
        row = self.pool.select([s.row])
        sums = dict(zip(SUMS, row.parts["forecast"].sums_BK[0].tolist()))
        routing, ad = row.parts["routing"], row.parts["adapter"]
        n = int(row.n_tokens_B[0])
        ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {
            "series_id": series_id,
            "tokens": n,
            "state_bytes": int(row.nbytes_B()[0]),
            "state_bytes_history": list(s.state_bytes),
            "flops_spent": float(routing.spent_B[0]),
            "flops_allowed": float(routing.allowed_B[0]),
            "realized_over_allowance": ratio(float(routing.spent_B[0]), float(routing.allowed_B[0])),
            "attention_rate": ratio(sums["attention_tokens"], n),
            "matured_entries": int(sums["entries"]),
            "mae_frozen": ratio(sums["abs_frozen"], sums["entries"]),
            "mae_served": ratio(sums["abs_served"], sums["entries"]),
            "crps_frozen": 2 * ratio(sums["pinball_frozen"], sums["entries"]),
            "crps_served": 2 * ratio(sums["pinball_served"], sums["entries"]),
            "adaptation_gain": 1 - ratio(sums["pinball_served"], sums["pinball_frozen"]),
            "adapter_rollbacks": int(ad.rollbacks_B[0]),
            "labelled_windows": len(s.labels),
            "window_recall": ratio(len(s.windows_recalled), len(s.windows_seen)),
            "windows_seen": len(s.windows_seen),
            "windows_recalled": len(s.windows_recalled),
            "mae_in_windows": ratio(sums["abs_served_in"], sums["entries_in"]),
            "mae_outside_windows": ratio(sums["abs_served_out"], sums["entries_out"]),
            "rejected": dict(s.rejected),
            "queued_patches": len(s.queue),
        }

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Flush, then write every series' state (pooled tensors, regularizers, partial patches) to the store."""
        self.flush()
        ids = sorted(self.series)
        rows = [self.series[i].row for i in ids]
        pooled = self.pool.select(rows) if ids else self.pool.select([])
        tensors = {f"state.{k}": v for k, v in pooled.tensors().items()}
        meta = []
        for k, sid in enumerate(ids):
            s = self.series[sid]
            reg = s.regularizer.state_dict()
            tensors[f"series.{k}.pending_LC"] = torch.from_numpy(reg.pop("pending_LC"))
            tensors[f"series.{k}.observed_L"] = torch.from_numpy(reg.pop("observed_L"))
            tensors[f"series.{k}.buffer_LC"] = torch.from_numpy(s.buffer_LC.copy())
            meta.append({
                "id": sid, "first_index": s.first_index, "regularizer": reg, "labels": s.labels, "rejected": dict(s.rejected),
                "recalled": sorted(s.windows_recalled), "seen": sorted(s.windows_seen), "state_bytes": list(s.state_bytes),
            })
        self.store.write(tensors, {"format": "oryx_ts.engine/1", "layout": pooled.layout(), "series": meta,
                                   "config": self.config.to_dict()})

    def restore(self) -> int:
        """Replace every series with the store's snapshot; returns how many series it holds (0: none stored).

        Raises `ValueError` for a corrupt snapshot or one written for another model configuration.
        """
        got = self.store.read()
        if got is None:
            return 0
        tensors, index = got
        if index.get("format") != "oryx_ts.engine/1":
            raise ValueError(f"not an engine snapshot (format {index.get('format')!r})")
        if OryxConfig.from_dict(index.get("config", {})) != self.config:
            raise ValueError("the snapshot was written for another model configuration")
        state_t = {k[len("state."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("state.")}
        pooled = State.from_tensors(state_t, index["layout"], source="engine snapshot")
        series = {}
        try:
            for k, m in enumerate(index["series"]):
                reg = {**m["regularizer"], "pending_LC": tensors[f"series.{k}.pending_LC"].numpy(),
                       "observed_L": tensors[f"series.{k}.observed_L"].numpy()}
                s = _Series(m["id"], k, Regularizer.from_state_dict(reg), [tuple(w) for w in m["labels"]],
                            tensors[f"series.{k}.buffer_LC"].numpy().copy())
                s.first_index = m["first_index"]
                s.rejected.update(m["rejected"])
                s.windows_recalled, s.windows_seen = set(m["recalled"]), set(m["seen"])
                s.state_bytes.extend(tuple(x) for x in m["state_bytes"])
                series[s.series_id] = s
        except KeyError as e:
            raise ValueError(f"engine snapshot lacks {e}") from e
        if pooled.batch_size != len(series):
            raise ValueError(f"engine snapshot holds {pooled.batch_size} states for {len(series)} series")
        self.pool, self.series, self._free_rows = pooled, series, []
        return len(series)
