"""Peers for backtests: seasonal naive, gluonts PatchTST and DeepAR (torch), pytorch-forecasting NHiTS.

Legend: L raw steps, N forecast origins, Hz horizon, C channels, Q quantile levels.

Every peer has the same two calls:
- `fit(history_LC, *, freq, start)`: train on the rows before the test part (NaN = missing);
- `predict(values_LC, ends_N, horizon) -> (N, Hz, C, Q)`: forecasts made at rows `ends_N` (the last
  observed row of each origin), in data units, at the backtest's quantile levels.

Leakage: `predict` hands each origin only rows `<= end` (the gluonts peers get a copy cut at the
origin, NHiTS one group per origin holding the rows up to it and placeholders after), which
tests/evaluation/test_leakage.py checks by perturbing every row after an origin. The learned peers are global univariate models over the channels (one
series per channel, as `datasets.adapters` builds them) with a stated, fixed training budget
(`PeerBudget`: epochs x batches per epoch x batch size, capped by wall-clock minutes).
gluonts, pandas, lightning and pytorch-forecasting are imported lazily (the `forecasting` extra).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from oryx_ts.datasets.adapters import EPOCH, to_long_frame
from oryx_ts.datasets.labels import TelemetryStream
from oryx_ts.evaluation.metrics import seasonal_naive

__all__ = ["PEERS", "DeepARPeer", "NHiTSPeer", "PatchTSTPeer", "Peer", "PeerBudget", "SeasonalNaivePeer", "make_peer"]


@dataclass(frozen=True, kw_only=True)
class PeerBudget:
    """Training budget of a learned peer: at most `epochs` x `batches_per_epoch` batches of `batch_size`
    windows, stopped at `max_minutes` of wall clock if that comes first. No early stopping."""

    epochs: int = 10
    batches_per_epoch: int = 50
    batch_size: int = 32
    max_minutes: float = 2.5
    context: int | None = None  # encoder length in steps (default: 4 horizons)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batches_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PeerBudget.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_minutes > 0:
            raise ValueError(f"PeerBudget.max_minutes must be > 0, got {self.max_minutes}")

    def describe(self) -> str:
        return (f"<= {self.epochs} epochs x {self.batches_per_epoch} batches x {self.batch_size} windows, "
                f"capped at {self.max_minutes:g} min, no early stopping")


class Peer(Protocol):
    name: str
    quantiles: tuple[float, ...]
    info: dict[str, Any]  # what was trained and how long it took, for the report

    def fit(self, history_LC: np.ndarray, *, freq: str, start: np.datetime64 | None) -> None: ...

    def predict(self, values_LC: np.ndarray, ends_N: np.ndarray, horizon: int) -> np.ndarray: ...


def _check_ends(values_LC: np.ndarray, ends_N: np.ndarray) -> np.ndarray:
    ends = np.asarray(ends_N, dtype=np.int64)
    if ends.ndim != 1 or (len(ends) and (ends.min() < 0 or ends.max() >= len(values_LC))):
        raise ValueError(f"origins must be rows in [0, {len(values_LC)}), got {ends[:3]}...")
    return ends


@dataclass
class SeasonalNaivePeer:
    """The value one period earlier (`metrics.seasonal_naive`) as the median; the other quantiles add the
    empirical quantiles of its errors on the training rows, per channel and horizon step."""

    period: int
    quantiles: tuple[float, ...]
    name: str = "seasonal_naive"
    info: dict[str, Any] = field(default_factory=dict)
    offsets_HzCQ: np.ndarray | None = None

    def fit(self, history_LC: np.ndarray, *, freq: str = "", start=None, horizon: int | None = None) -> None:
        horizon = horizon or self.period
        began = time.perf_counter()
        L = len(history_LC)
        ends = np.arange(self.period - 1, L - 1, max(1, (L - self.period) // 4000))  # <= ~4000 origins
        from oryx_ts.evaluation.metrics import horizon_targets

        point = seasonal_naive(history_LC, ends, horizon, self.period)
        resid = horizon_targets(history_LC, ends, horizon) - point
        with np.errstate(all="ignore"):
            offsets = np.nanquantile(resid, self.quantiles, axis=0)  # (Q, Hz, C)
        self.offsets_HzCQ = np.nan_to_num(np.moveaxis(offsets, 0, -1))
        self.offsets_HzCQ[..., int(np.argmin(np.abs(np.asarray(self.quantiles) - 0.5)))] = 0.0  # the median is the naive value
        self.info = {"training": f"residual quantiles over {len(ends)} training origins", "seconds": time.perf_counter() - began}

    def predict(self, values_LC: np.ndarray, ends_N: np.ndarray, horizon: int) -> np.ndarray:
        ends = _check_ends(values_LC, ends_N)
        point = seasonal_naive(values_LC, ends, horizon, self.period)
        if self.offsets_HzCQ is None or self.offsets_HzCQ.shape[0] < horizon:
            return np.repeat(point[..., None], len(self.quantiles), axis=-1)
        return point[..., None] + self.offsets_HzCQ[None, :horizon]


def _trainer_kwargs(budget: PeerBudget, progress: bool, root: str | None = None) -> dict:
    """Lightning options for a budgeted CPU run; `root` (gluonts, which keeps its best-training-loss
    checkpoint and reloads it) holds its checkpoints, else checkpointing is off."""
    seconds = max(1, int(budget.max_minutes * 60))
    kwargs = {"max_epochs": budget.epochs, "max_time": {"seconds": seconds}, "accelerator": "cpu", "devices": 1,
              "enable_progress_bar": progress, "enable_model_summary": False, "logger": False}
    return kwargs | ({"default_root_dir": root} if root else {"enable_checkpointing": False})


def _gluonts_start(start: np.datetime64 | None, freq: str):
    import pandas as pd

    return pd.Period(str(start) if start is not None else EPOCH, freq=freq)


@dataclass
class _GluonTSPeer:
    """A gluonts torch estimator trained on one univariate entry per channel; predicts from copies cut at each origin."""

    horizon: int
    quantiles: tuple[float, ...]
    budget: PeerBudget = field(default_factory=PeerBudget)
    progress: bool = False
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    predictor: Any = None
    freq: str = "1h"
    start: Any = None
    past: int = 0
    sampled: bool = False  # forecasts are sample paths (DeepAR)

    def _estimator(self, context: int):
        raise NotImplementedError

    def _kwargs(self) -> dict:
        import tempfile

        self._workdir = tempfile.TemporaryDirectory(prefix=f"oryx_{self.name}_")
        return _trainer_kwargs(self.budget, self.progress, self._workdir.name)

    def fit(self, history_LC: np.ndarray, *, freq: str, start: np.datetime64 | None) -> None:
        import lightning.pytorch as pl
        from gluonts.dataset.common import ListDataset

        pl.seed_everything(self.budget.seed, workers=False, verbose=False)
        self.freq, self.start = freq, _gluonts_start(start, freq)
        context = self.budget.context or 4 * self.horizon
        estimator = self._estimator(context)
        data = ListDataset([{"start": self.start, "target": np.ascontiguousarray(history_LC[:, c], dtype=np.float32)}
                            for c in range(history_LC.shape[1])], freq=freq)
        began = time.perf_counter()
        self.predictor = estimator.train(data, cache_data=True)
        self._workdir.cleanup()
        self.past = int(getattr(self.predictor.prediction_net.model, "_past_length", context))
        self.info = {"training": self.budget.describe(), "context": context, "seconds": time.perf_counter() - began,
                     **asdict(self.budget)}

    def predict(self, values_LC: np.ndarray, ends_N: np.ndarray, horizon: int) -> np.ndarray:
        import torch
        from gluonts.dataset.common import ListDataset
        from tqdm.auto import tqdm

        if self.predictor is None:
            raise ValueError(f"{self.name}: fit before predict")
        if horizon > self.horizon:
            raise ValueError(f"{self.name} was trained for {self.horizon} steps, asked for {horizon}")
        ends = _check_ends(values_LC, ends_N)
        C, Q = values_LC.shape[1], len(self.quantiles)

        def entries(e: int) -> list[dict]:  # only rows <= the origin: nothing after it exists in the entry
            begin = max(0, e + 1 - self.past)
            return [{"start": self.start + begin, "target": np.ascontiguousarray(values_LC[begin : e + 1, c], dtype=np.float32)}
                    for c in range(C)]

        # sampling peers draw from one generator whose consumption depends on the values (rejection
        # sampling), so each origin is predicted alone from its own seed; the others batch all origins
        groups = [[int(e)] for e in ends] if self.sampled else [[int(e) for e in ends]]
        out = []
        for group in tqdm(groups, desc=f"{self.name} predict", disable=not self.progress or len(groups) == 1, leave=False):
            torch.manual_seed(self.budget.seed + group[0])
            data = ListDataset([x for e in group for x in entries(e)], freq=self.freq)
            for f in self.predictor.predict(data):
                out.append(np.stack([f.quantile(q)[:horizon] for q in self.quantiles], axis=-1))
        return np.moveaxis(np.stack(out).reshape(len(ends), C, horizon, Q), 1, 2).astype(np.float64)


@dataclass
class PatchTSTPeer(_GluonTSPeer):
    """gluonts' torch PatchTST (Student-t output, its default), patches of 16 steps with stride 8."""

    name: str = "patchtst"

    def _estimator(self, context: int):
        from gluonts.torch.model.patch_tst import PatchTSTEstimator

        b = self.budget
        return PatchTSTEstimator(prediction_length=self.horizon, context_length=context, patch_len=16, stride=8,
                                 batch_size=b.batch_size, num_batches_per_epoch=b.batches_per_epoch,
                                 trainer_kwargs=self._kwargs())


@dataclass
class DeepARPeer(_GluonTSPeer):
    """gluonts' torch DeepAR (Student-t output, 2 LSTM layers of 40), 100 sample paths per forecast."""

    name: str = "deepar"
    sampled: bool = True

    def _estimator(self, context: int):
        from gluonts.torch.model.deepar import DeepAREstimator

        b = self.budget
        return DeepAREstimator(freq=self.freq, prediction_length=self.horizon, context_length=context,
                               batch_size=b.batch_size, num_batches_per_epoch=b.batches_per_epoch,
                               trainer_kwargs=self._kwargs())


@dataclass
class NHiTSPeer:
    """pytorch-forecasting's NHiTS with a quantile loss at the backtest's levels; one group per channel
    (`datasets.adapters.to_timeseries_datasets`' layout), encoder of `context` steps, the target only."""

    horizon: int
    quantiles: tuple[float, ...]
    budget: PeerBudget = field(default_factory=PeerBudget)
    progress: bool = False
    name: str = "nhits"
    info: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    training: Any = None
    context: int = 0
    channels: tuple[str, ...] = ()

    def _stream(self, values_LC: np.ndarray) -> TelemetryStream:
        C = values_LC.shape[1]
        self.channels = self.channels or tuple(f"ch{c}" for c in range(C))
        return TelemetryStream(np.asarray(values_LC, dtype=np.float32), [], self.channels)

    def fit(self, history_LC: np.ndarray, *, freq: str = "", start=None) -> None:
        import lightning.pytorch as pl
        from pytorch_forecasting import NHiTS, TimeSeriesDataSet
        from pytorch_forecasting.data.encoders import EncoderNormalizer
        from pytorch_forecasting.metrics import QuantileLoss

        b = self.budget
        pl.seed_everything(b.seed, workers=False, verbose=False)
        context = b.context or 4 * self.horizon
        frame = to_long_frame(self._stream(history_LC))
        self.training = TimeSeriesDataSet(
            frame, time_idx="time_idx", target="value", group_ids=["series"], max_encoder_length=context,
            min_encoder_length=context, max_prediction_length=self.horizon, min_prediction_length=self.horizon,
            time_varying_unknown_reals=["value"], allow_missing_timesteps=True, target_normalizer=EncoderNormalizer())
        self.context = context
        self.model = NHiTS.from_dataset(self.training, loss=QuantileLoss(quantiles=list(self.quantiles)), learning_rate=1e-3,
                                        log_interval=-1)
        loader = self.training.to_dataloader(train=True, batch_size=b.batch_size, num_workers=0)
        trainer = pl.Trainer(limit_train_batches=b.batches_per_epoch, gradient_clip_val=0.1, **_trainer_kwargs(b, self.progress))
        began = time.perf_counter()
        trainer.fit(self.model, train_dataloaders=loader)
        self.info = {"training": b.describe(), "context": context, "seconds": time.perf_counter() - began, **asdict(b)}

    def predict(self, values_LC: np.ndarray, ends_N: np.ndarray, horizon: int) -> np.ndarray:
        import pandas as pd
        from pytorch_forecasting import TimeSeriesDataSet

        if self.model is None:
            raise ValueError("nhits: fit before predict")
        if horizon > self.horizon:
            raise ValueError(f"nhits was trained for {self.horizon} steps, asked for {horizon}")
        ends = _check_ends(values_LC, ends_N)
        C, Q, ctx, H = values_LC.shape[1], len(self.quantiles), self.context, self.horizon
        # per channel (the training groups), origin i owns time_idx block [i B, (i + 1) B), B = ctx + H:
        # its `ctx` rows up to the origin (missing ones carried forward, as the library would, and
        # back-filled at the start), then H zero placeholders where the predictions go. The window
        # predicted for origin i spans exactly its block, so no row after an origin is ever read.
        B = ctx + H
        windows = np.zeros((len(ends), B, C), dtype=np.float32)
        for i, e in enumerate(ends):
            begin = max(0, int(e) + 1 - ctx)
            enc = pd.DataFrame(values_LC[begin : e + 1]).ffill().bfill().fillna(0.0).to_numpy(np.float32)
            windows[i, ctx - len(enc) : ctx] = enc
            windows[i, : ctx - len(enc)] = enc[0]
        frame = pd.DataFrame({
            "series": pd.Categorical(np.repeat(np.array(self.channels, dtype=object), len(ends) * B), categories=list(self.channels)),
            "time_idx": np.tile(np.arange(len(ends) * B, dtype=np.int64), C),
            "value": np.moveaxis(windows, 2, 0).reshape(-1),
        })
        data = TimeSeriesDataSet.from_dataset(self.training, frame, predict=False, stop_randomization=True)
        firsts = set((np.arange(len(ends)) * B + ctx).tolist())
        data = data.filter(lambda idx: idx["time_idx_first_prediction"].isin(firsts))
        loader = data.to_dataloader(train=False, batch_size=256, num_workers=0)
        pred = self.model.predict(loader, mode="quantiles", return_index=True,
                                  trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": self.progress, "logger": False})
        q = pred.output.cpu().numpy()
        out = np.full((len(ends), horizon, C, Q), np.nan)
        col = {name: c for c, name in enumerate(self.channels)}
        for k, (name, first) in enumerate(zip(pred.index["series"].astype(str), pred.index["time_idx"].to_numpy())):
            out[(int(first) - ctx) // B, :, col[name]] = q[k, :horizon]
        return out


PEERS = ("seasonal_naive", "nhits", "patchtst", "deepar")


def make_peer(name: str, *, horizon: int, quantiles: tuple[float, ...], period: int, budget: PeerBudget,
              progress: bool = False) -> Peer:
    """A peer by name (one of `PEERS`); raises `ValueError` for another name."""
    if name == "seasonal_naive":
        return SeasonalNaivePeer(period=period, quantiles=quantiles)
    kinds = {"nhits": NHiTSPeer, "patchtst": PatchTSTPeer, "deepar": DeepARPeer}
    if name not in kinds:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return kinds[name](horizon=horizon, quantiles=quantiles, budget=budget, progress=progress)


def freq_string(step_seconds: int | None) -> str:
    """A pandas frequency for a step in seconds ('5min', '1h'); '1h' for index-only streams."""
    if step_seconds is None:
        return "1h"
    for unit, size in (("D", 86400), ("h", 3600), ("min", 60)):
        if step_seconds % size == 0:
            return f"{step_seconds // size}{unit}"
    return f"{step_seconds}s"

