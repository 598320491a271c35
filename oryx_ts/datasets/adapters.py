"""Hand the same stream, and the same split, to gluonts and pytorch-forecasting peers.

gluonts: `to_gluonts` gives a `ListDataset`, one univariate entry per channel (item_id = channel
name) or one multivariate entry of shape (C, L); missing values stay NaN, which gluonts accepts.
pytorch-forecasting: `to_long_frame` gives the long pandas frame (series, time_idx, value) with
missing steps dropped, and `to_timeseries_datasets` the training `TimeSeriesDataSet` (targets
before the split) and the validation one built from it with `from_dataset` (predictions from the
split on), the library's own pattern. `from_*` functions invert each adapter exactly; the tests
use them to prove the round trip. gluonts, pandas and pytorch-forecasting are imported lazily
(the `forecasting` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from oryx_ts.datasets.labels import TelemetryStream

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["freq_of", "from_gluonts", "from_long_frame", "from_timeseries_dataset", "to_gluonts",
           "to_long_frame", "to_timeseries_datasets"]

EPOCH = "1970-01-01 00:00:00"


def freq_of(stream: TelemetryStream, default: str = "h") -> str:
    """A pandas frequency string for the stream's step ('5min', '1h', '10s'); `default` if no clock."""
    if stream.step is None:
        return default
    seconds = int(stream.step / np.timedelta64(1, "s"))
    for unit, size in (("D", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _check_end(stream: TelemetryStream, end: int | None) -> int:
    end = len(stream) if end is None else end
    if not 0 < end <= len(stream):
        raise ValueError(f"end={end} must lie in (0, {len(stream)}]")
    return end


def to_gluonts(
    stream: TelemetryStream,
    *,
    end: int | None = None,
    multivariate: bool = False,
    freq: str | None = None,
) -> Any:
    """A gluonts `ListDataset` of steps `[0, end)`.

    Univariate (default): one entry per channel, target float32 (end,), item_id the channel name.
    multivariate=True: one entry with target float32 (C, end) (`one_dim_target=False`).
    The start is the stream's first timestamp (1970-01-01 for streams without a clock) at `freq`
    (default: derived from the step). Train on `end=split`, test on the full stream.
    """
    import pandas as pd
    from gluonts.dataset.common import ListDataset

    end = _check_end(stream, end)
    freq = freq or freq_of(stream)
    start = pd.Period(str(stream.start) if stream.start is not None else EPOCH, freq=freq)
    values = stream.values[:end]
    if multivariate:
        entries = [{"start": start, "target": np.ascontiguousarray(values.T), "item_id": stream.name or "stream"}]
    else:
        entries = [{"start": start, "target": np.ascontiguousarray(values[:, c]), "item_id": name}
                   for c, name in enumerate(stream.channels)]
    return ListDataset(entries, freq=freq, one_dim_target=not multivariate)


def from_gluonts(dataset: Any, *, multivariate: bool = False, name: str = "") -> TelemetryStream:
    """Invert `to_gluonts`: entries (one per channel, or one multivariate) back to a stream."""
    entries = list(dataset)
    if not entries:
        raise ValueError("empty gluonts dataset")
    if multivariate:
        if len(entries) != 1:
            raise ValueError(f"a multivariate stream is one entry, got {len(entries)}")
        values = np.asarray(entries[0]["target"], dtype=np.float32).T
        channels = tuple(f"ch{i}" for i in range(values.shape[1]))
    else:
        lengths = {len(e["target"]) for e in entries}
        if len(lengths) != 1:
            raise ValueError(f"entries have different lengths {sorted(lengths)}")
        values = np.stack([np.asarray(e["target"], dtype=np.float32) for e in entries], axis=1)
        channels = tuple(str(e.get("item_id", f"ch{i}")) for i, e in enumerate(entries))
    start = entries[0]["start"]
    step = np.timedelta64(int(start.freq.nanos // 1_000_000_000), "s")
    first = np.datetime64(start.to_timestamp().isoformat(), "s")
    if str(first) == EPOCH.replace(" ", "T"):
        first, step = None, None
    return TelemetryStream(values, [], channels, first, step, name)


def to_long_frame(stream: TelemetryStream, end: int | None = None) -> pd.DataFrame:
    """Long frame of steps `[0, end)`: columns series (channel name), time_idx (int64 step), value
    (float32), plus timestamp when the stream has a clock. Missing steps are dropped rows."""
    import pandas as pd

    end = _check_end(stream, end)
    values = stream.values[:end]
    L, C = values.shape
    series = np.repeat(np.array(stream.channels, dtype=object), L)
    frame = pd.DataFrame({
        "series": pd.Categorical(series, categories=list(stream.channels)),
        "time_idx": np.tile(np.arange(L, dtype=np.int64), C),
        "value": values.T.reshape(-1),
    })
    if stream.start is not None and stream.step is not None:
        frame["timestamp"] = stream.start + frame["time_idx"].to_numpy() * stream.step
    return frame[np.isfinite(frame["value"].to_numpy())].reset_index(drop=True)


def from_long_frame(frame: pd.DataFrame, *, length: int | None = None, channels: tuple[str, ...] | None = None,
                    name: str = "") -> TelemetryStream:
    """Invert `to_long_frame`: absent (series, time_idx) pairs become NaN."""
    channels = channels or tuple(frame["series"].cat.categories if hasattr(frame["series"], "cat")
                                 else sorted(frame["series"].unique()))
    index = {c: i for i, c in enumerate(channels)}
    t = frame["time_idx"].to_numpy(dtype=np.int64)
    length = int(t.max()) + 1 if length is None else length
    values = np.full((length, len(channels)), np.nan, dtype=np.float32)
    cols = np.array([index[s] for s in frame["series"].astype(str)], dtype=np.int64)
    values[t, cols] = frame["value"].to_numpy(dtype=np.float32)
    start = step = None
    if "timestamp" in frame and len(frame) > 1:
        ts = frame["timestamp"].to_numpy().astype("datetime64[s]")
        order = np.argsort(t, kind="stable")
        t_sorted, ts_sorted = t[order], ts[order]
        moved = np.flatnonzero(np.diff(t_sorted) > 0)
        if len(moved):
            i = int(moved[0])
            step = (ts_sorted[i + 1] - ts_sorted[i]) // int(t_sorted[i + 1] - t_sorted[i])
            start = ts_sorted[0] - int(t_sorted[0]) * step
    return TelemetryStream(values, [], tuple(channels), start, step, name)


def to_timeseries_datasets(
    stream: TelemetryStream,
    split: int,
    *,
    max_encoder_length: int,
    max_prediction_length: int,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """pytorch-forecasting `(train, validation)` TimeSeriesDataSets with one group per channel.

    train sees steps `[0, split)`; validation is `TimeSeriesDataSet.from_dataset(train, full,
    min_prediction_idx=split)`, so its targets start at `split` and its normalizers are the
    training ones. Missing steps are absent rows (`allow_missing_timesteps=True`). Extra keyword
    arguments go to the training TimeSeriesDataSet.
    """
    from pytorch_forecasting import TimeSeriesDataSet

    if not max_encoder_length + max_prediction_length <= split < len(stream):
        raise ValueError(f"split={split} must leave one training window "
                         f"({max_encoder_length}+{max_prediction_length} steps) and lie before {len(stream)}")
    full = to_long_frame(stream)
    train_frame = full[full["time_idx"] < split]
    options = {"time_varying_unknown_reals": ["value"], "allow_missing_timesteps": True, **kwargs}
    train = TimeSeriesDataSet(train_frame, time_idx="time_idx", target="value", group_ids=["series"],
                              max_encoder_length=max_encoder_length, max_prediction_length=max_prediction_length,
                              **options)
    validation = TimeSeriesDataSet.from_dataset(train, full, min_prediction_idx=split, stop_randomization=True)
    return train, validation


def from_timeseries_dataset(dataset: Any, *, length: int | None = None, name: str = "") -> TelemetryStream:
    """The raw targets held by a TimeSeriesDataSet, back on a (L, C) grid (absent rows are NaN)."""
    import pandas as pd

    classes = dataset.get_parameters()["categorical_encoders"]["__group_id__series"].classes_
    channels = tuple(str(c) for c in sorted(classes, key=classes.get))
    series = np.array(channels, dtype=object)[dataset.data["groups"][:, 0].numpy()]
    frame = pd.DataFrame({
        "series": pd.Categorical(np.asarray(series, dtype=object), categories=list(channels)),
        "time_idx": dataset.data["time"].numpy().astype(np.int64),
        "value": dataset.data["target"][0].numpy(),
    })
    return from_long_frame(frame, length=length, channels=channels, name=name)
