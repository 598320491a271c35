"""User telemetry from CSV or Parquet through polars: validated, put on a fixed grid, labelled.

`read(path, ...)` scans the file lazily (only the needed columns are loaded), then `from_frame`
checks it (timestamps present, parseable and increasing, duplicates handled by policy, channels
numeric), resamples it to a fixed step with gaps as NaN and turns label columns into windows.
Every rejection names the file, the row (1-based, counting data rows after the header) and the
column.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from oryx_ts.datasets.labels import LabelWindow, TelemetryStream, windows_from_mask

__all__ = ["DataError", "from_frame", "parse_step", "read"]

NULL_VALUES = ("", "?", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
TIMESTAMP_NAMES = ("timestamp", "time", "datetime", "date", "ds", "time_idx")
Duplicates = Literal["error", "first", "last", "mean"]

_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


class DataError(ValueError):
    """A file or frame that cannot become a stream; the message names the row and column."""


def parse_step(step: str | int | dt.timedelta | np.timedelta64) -> np.timedelta64:
    """'5min', '10m', '1h', '30s', '1d', a timedelta or a number of seconds -> timedelta64[s]."""
    if isinstance(step, np.timedelta64):
        seconds = int(step / np.timedelta64(1, "s"))
    elif isinstance(step, dt.timedelta):
        seconds = int(step.total_seconds())
    elif isinstance(step, int):
        seconds = step
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]+)\s*", str(step))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot parse step {step!r}; use e.g. '30s', '5min', '1h', '1d'")
        seconds = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"step must be positive, got {step!r}")
    return np.timedelta64(seconds, "s")


def _fail(source: str, row: int, column: str, message: str) -> DataError:
    return DataError(f"{source}: row {row + 1}, column {column!r}: {message}")


def _to_float(frame: pl.DataFrame, column: str, source: str) -> np.ndarray:
    series = frame.get_column(column)
    if series.dtype == pl.Boolean or series.dtype.is_numeric():
        return series.cast(pl.Float64).fill_null(np.nan).to_numpy()
    if series.dtype != pl.String:
        raise DataError(f"{source}: column {column!r} has type {series.dtype}, expected numbers")
    stripped = series.str.strip_chars()
    cast = stripped.cast(pl.Float64, strict=False)
    bad = (cast.is_null() & stripped.is_not_null() & ~stripped.is_in(list(NULL_VALUES))).arg_true()
    if len(bad):
        row = int(bad[0])
        raise _fail(source, row, column, f"{series[row]!r} is not a number")
    return cast.fill_null(np.nan).to_numpy()


def _timestamps(frame: pl.DataFrame, column: str, source: str, time_format: str | None) -> tuple[np.ndarray, bool]:
    """(int64 array, is_clock): microseconds since the epoch for clock columns, the integer for
    step-index columns."""
    series = frame.get_column(column)
    if series.dtype == pl.String:
        stripped = series.str.strip_chars()
        as_int = stripped.cast(pl.Int64, strict=False)
        if time_format is None and as_int.null_count() == stripped.null_count():
            series = as_int
    if series.dtype == pl.String:
        try:
            parsed = stripped.str.to_datetime(format=time_format, strict=False, time_unit="us")
        except pl.exceptions.PolarsError as err:
            first = stripped.drop_nulls().head(1).to_list()
            raise DataError(f"{source}: column {column!r}: cannot infer a timestamp format from "
                            f"{first[0] if first else None!r}; pass time_format (e.g. '%d/%m/%Y %H:%M'; "
                            "on the command line: --time-format)") from err
        bad = (parsed.is_null() & series.is_not_null()).arg_true()
        if len(bad):
            row = int(bad[0])
            raise _fail(source, row, column, f"{series[row]!r} is not a timestamp"
                        + (f" in format {time_format!r}" if time_format else ""))
        series = parsed
    elif series.dtype == pl.Date:
        series = series.cast(pl.Datetime("us"))
    nulls = series.is_null().arg_true()
    if len(nulls):
        raise _fail(source, int(nulls[0]), column, "missing timestamp")
    if isinstance(series.dtype, pl.Datetime):
        return series.dt.replace_time_zone(None).dt.cast_time_unit("us").cast(pl.Int64).to_numpy(), True
    if series.dtype.is_integer():
        return series.cast(pl.Int64).to_numpy(), False
    raise DataError(f"{source}: timestamp column {column!r} has type {series.dtype}; expected datetimes, "
                    "date strings or integer step indices")


def _label_windows(frame: pl.DataFrame, columns: Sequence[str], bucket: np.ndarray, length: int,
                   source: str) -> list[LabelWindow]:
    windows: list[LabelWindow] = []
    for column in columns:
        series = frame.get_column(column)
        numeric = series.dtype != pl.String or (
            series.str.strip_chars().cast(pl.Float64, strict=False).null_count() == series.null_count())
        if not numeric:
            kinds = series.str.strip_chars().fill_null("")
            for kind in sorted(set(kinds.unique().to_list()) - {"", "0", "normal"}):
                hit = (kinds == kind).to_numpy()
                mask = np.zeros(length, dtype=bool)
                mask[bucket[hit]] = True
                windows += windows_from_mask(mask, kind)
        else:
            flags = _to_float(frame, column, source)
            mask = np.zeros(length, dtype=bool)
            mask[bucket[np.nan_to_num(flags) != 0]] = True
            windows += windows_from_mask(mask, column)
    return sorted(windows, key=lambda w: (w.start, w.kind))


def from_frame(
    frame: pl.DataFrame,
    *,
    timestamp: str | None = None,
    channels: Sequence[str] | None = None,
    labels: str | Sequence[str] | None = None,
    step: str | int | dt.timedelta | None = None,
    duplicates: Duplicates = "error",
    time_format: str | None = None,
    name: str = "",
    source: str = "<frame>",
) -> TelemetryStream:
    """Validate a polars frame and put it on a fixed grid.

    timestamp: the clock column (datetimes, parseable strings, or integer step indices); None
        picks a column named like a timestamp, else the row order is the clock.
    channels: numeric columns to keep (default: every other column).
    labels: columns that mark labelled steps; a numeric column gives windows of its own name where
        non-zero, a string column gives windows named by its values.
    step: the grid step ('5min', '1h', seconds); default: the most common gap.
    duplicates: what to do with repeated timestamps: 'error', keep 'first'/'last', or 'mean'.
    Returns a TelemetryStream (rows with no data become NaN rows). Raises DataError naming the row
    and column of the first problem.
    """
    labels = [labels] if isinstance(labels, str) else list(labels or [])
    if timestamp is None:
        timestamp = next((c for c in frame.columns if c.lower() in TIMESTAMP_NAMES and c not in labels), None)
    missing = [c for c in [timestamp, *labels, *(channels or [])] if c is not None and c not in frame.columns]
    if missing:
        raise DataError(f"{source}: no column(s) {missing}; the file has {frame.columns}")
    if channels is None:
        channels = [c for c in frame.columns if c != timestamp and c not in labels]
    channels = list(channels)
    if not channels:
        raise DataError(f"{source}: no channel columns left after the timestamp and label columns")
    if frame.height == 0:
        raise DataError(f"{source}: no data rows")

    if timestamp is None:
        ts, clock = np.arange(frame.height, dtype=np.int64), False
    else:
        ts, clock = _timestamps(frame, timestamp, source, time_format)
    diffs = np.diff(ts)
    back = np.flatnonzero(diffs < 0)
    if len(back):
        i = int(back[0]) + 1
        raise _fail(source, i, timestamp, f"timestamps go backwards ({_show(ts[i], clock)} after "
                    f"{_show(ts[i - 1], clock)}); sort the file first")
    dup = np.flatnonzero(diffs == 0)
    if len(dup) and duplicates == "error":
        i = int(dup[0]) + 1
        raise _fail(source, i, timestamp, f"duplicate timestamp {_show(ts[i], clock)} (also row {i}); "
                    "merge repeats with duplicates='first', 'last' or 'mean' "
                    "(on the command line: --duplicates first|last|mean)")

    unit = 1_000_000 if clock else 1
    if step is None:
        positive = diffs[diffs > 0]
        if len(positive) == 0:
            step_units = unit
        else:
            values, counts = np.unique(positive, return_counts=True)
            step_units = int(values[np.argmax(counts)])
    else:
        step_units = int(parse_step(step) / np.timedelta64(1, "s")) * unit if clock else int(step)
    if step_units <= 0:
        raise DataError(f"{source}: step must be positive, got {step!r}")

    columns = np.stack([_to_float(frame, c, source) for c in channels], axis=1)
    bucket = (ts - ts[0]) // step_units
    length = int(bucket[-1]) + 1
    values = np.full((length, len(channels)), np.nan, dtype=np.float32)
    if len(bucket) < 2 or np.all(np.diff(bucket) > 0):
        values[bucket] = columns
    elif duplicates in ("first", "last"):
        order = np.arange(len(bucket)) if duplicates == "last" else np.arange(len(bucket))[::-1]
        values[bucket[order]] = columns[order]  # later writes win
    else:
        finite = np.isfinite(columns)
        for c in range(columns.shape[1]):
            total = np.bincount(bucket, weights=np.where(finite[:, c], columns[:, c], 0.0), minlength=length)
            count = np.bincount(bucket, weights=finite[:, c], minlength=length)
            with np.errstate(invalid="ignore", divide="ignore"):
                values[:, c] = total / count

    windows = _label_windows(frame, labels, bucket, length, source)
    start = np.datetime64(int(ts[0]), "us").astype("datetime64[s]") if clock else None
    step_td = np.timedelta64(step_units // unit, "s") if clock else None
    return TelemetryStream(values, windows, tuple(channels), start, step_td, name,
                           {"source": source, "rows_read": frame.height})


def _show(value: int, clock: bool) -> str:
    return str(np.datetime64(int(value), "us")) if clock else str(value)


def read(
    path: str | Path,
    *,
    timestamp: str | None = None,
    channels: Sequence[str] | None = None,
    labels: str | Sequence[str] | None = None,
    step: str | int | dt.timedelta | None = None,
    duplicates: Duplicates = "error",
    time_format: str | None = None,
    null_values: Sequence[str] = NULL_VALUES,
    separator: str = ",",
) -> TelemetryStream:
    """Read a CSV or Parquet file into a `TelemetryStream` (see `from_frame` for the arguments).

    The file is scanned lazily and only the timestamp, channel and label columns are loaded.
    A Parquet file written by `oryx_ts.datasets.to_parquet` gets its labels back.
    The format follows the suffix: `.parquet`/`.pq`, `.csv`/`.txt` (comma-separated unless
    `separator` says otherwise) or `.tsv` (tab-separated); any other suffix is refused.
    Raises FileNotFoundError, or DataError naming the row and column of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    meta: dict | None = None
    if suffix in (".parquet", ".pq"):
        try:
            kv = pl.read_parquet_metadata(path)
            lazy = pl.scan_parquet(path)
            names = lazy.collect_schema().names()
        except Exception as err:  # polars raises several error types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({err})") from err
        if "oryx_ts" in kv:
            meta = json.loads(kv["oryx_ts"])
    elif suffix in (".csv", ".txt", ".tsv"):
        if suffix == ".tsv" and separator == ",":
            separator = "\t"
        try:
            lazy = pl.scan_csv(path, separator=separator, infer_schema=False, null_values=list(null_values),
                               truncate_ragged_lines=False)
            names = lazy.collect_schema().names()
        except Exception as err:
            raise DataError(f"{path}: not a readable CSV file ({err})") from err
    else:
        raise DataError(f"{path}: unknown format {suffix or '(no suffix)'!r}; expected .csv, .tsv, .txt, .parquet or .pq")

    label_list = [labels] if isinstance(labels, str) else list(labels or [])
    if timestamp is None:
        timestamp = next((c for c in names if c.lower() in TIMESTAMP_NAMES and c not in label_list), None)
    wanted = [c for c in names if c == timestamp or c in label_list or channels is None or c in channels]
    missing = [c for c in [timestamp, *label_list, *(channels or [])] if c is not None and c not in names]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; the file has {names}")
    try:
        frame = lazy.select(wanted).collect(engine="streaming")
    except pl.exceptions.PolarsError as err:
        raise DataError(f"{path}: cannot parse ({err})") from err
    stream = from_frame(frame, timestamp=timestamp, channels=channels, labels=label_list, step=step,
                        duplicates=duplicates, time_format=time_format, name=path.stem, source=str(path))
    if meta is not None and not label_list:
        stream.labels = [LabelWindow(int(s), int(e), str(k)) for s, e, k in meta.get("labels", [])]
        stream.meta.update({k: meta[k] for k in ("seed", "config", "recurrences") if k in meta})
        stream.meta["source"] = "synthetic"
    return stream
