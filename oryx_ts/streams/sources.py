"""Where observations come from: arrays in memory, CSV/Parquet replay, and plain iterators.

Every source yields `Observations` batches, one series per batch: `series_id`, `timestamps`
(n,) int64 and `values` (n, C) float32, rows in the order they were stored. Sources only convert
and check types and shapes; which rows are acceptable (finite, on the grid, in time) is the
regularizer's decision, so NaN and inf values pass through unchanged.

Timestamps: integers stay as they are; datetimes (numpy datetime64, polars Datetime/Date, or date
strings in a CSV) become int64 nanoseconds since the epoch (UTC for zoned columns).

Files are read in blocks of at most `chunk_rows` rows and never held whole: Parquet by sliced lazy
scans (polars reads only the row groups under each slice), CSV by reading byte ranges that end
after a record and parsing each with polars (polars 2.1's CSV scan, batched or streaming, reads the
whole file into memory first), with the null markers and the number and timestamp parsing of
`oryx_ts.datasets.readers`. Memory therefore grows with `chunk_rows`, not with the file.

Shape legend: n rows in a batch, L rows of a series, C channels.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from oryx_ts.datasets.readers import NULL_VALUES, _timestamps, _to_float

__all__ = ["Observations", "from_arrays", "from_file", "from_iterator", "interleave"]

Order = Literal["sequential", "random"]
SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class Observations:
    """One batch of one series: timestamps (n,) int64 and values (n, C) float32.
    Raises ValueError when the types or shapes are not exactly these."""

    series_id: str
    timestamps: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.series_id, str):
            raise ValueError(f"series_id must be a str, got {self.series_id!r}")
        ts, vals = self.timestamps, self.values
        if not isinstance(ts, np.ndarray) or ts.dtype != np.int64 or ts.ndim != 1:
            raise ValueError(f"timestamps must be an int64 array (n,), got {getattr(ts, 'dtype', type(ts))} "
                             f"{getattr(ts, 'shape', '')}")
        if not isinstance(vals, np.ndarray) or vals.dtype != np.float32 or vals.ndim != 2 or len(vals) != len(ts):
            raise ValueError(f"values must be a float32 array ({len(ts)}, C), got {getattr(vals, 'dtype', type(vals))} "
                             f"{getattr(vals, 'shape', '')}")

    def __len__(self) -> int:
        return len(self.timestamps)


def _int64_timestamps(timestamps: Any, where: str) -> np.ndarray:
    """Integers, integer-valued floats or datetime64 (-> ns) as an int64 (n,) array."""
    raw = np.asarray(timestamps)
    if raw.ndim != 1:
        raise ValueError(f"{where}: timestamps must be 1-D, got shape {raw.shape}")
    if raw.dtype.kind == "M":
        ns = raw.astype("datetime64[ns]")
        if np.isnat(ns).any():
            raise ValueError(f"{where}: timestamp {int(np.flatnonzero(np.isnat(ns))[0])} is NaT")
        return ns.view(np.int64).copy()
    if raw.dtype.kind in "iu":
        if raw.dtype == np.uint64 and len(raw) and raw.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{where}: timestamp {raw.max()} does not fit in int64")
        return raw.astype(np.int64)
    if raw.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(raw) & (raw == np.floor(raw)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: timestamp {i} is {raw[i]}, not an integer")
        return raw.astype(np.int64)
    raise ValueError(f"{where}: timestamps must be integers or datetime64, got {raw.dtype}")


def _float32_values(values: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except ValueError as err:  # ragged rows
        raise ValueError(f"{where}: values are not a rectangular (n, C) array ({err})") from err
    if arr.ndim != 2:
        raise ValueError(f"{where}: values must be 2-D (n, C), got shape {arr.shape}; reshape one channel to (n, 1)")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{where}: values must be numbers, got {arr.dtype}")
    with np.errstate(over="ignore"):
        return arr.astype(np.float32)


def _scalar_time(value: Any, name: str) -> int:
    if isinstance(value, np.datetime64):
        return int(value.astype("datetime64[ns]").view(np.int64))
    if isinstance(value, np.timedelta64):
        return int(value.astype("timedelta64[ns]").view(np.int64))
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, datetime64 or timedelta64, got {value!r}")
    return int(value)


def interleave(sources: Iterable[Iterable[Observations]], *, seed: int = 0) -> Iterator[Observations]:
    """Batches from several sources in a seeded random order: each step takes the next batch of a
    source drawn uniformly among those not yet exhausted, so every source keeps its own order."""
    rng = np.random.default_rng(seed)
    live = [iter(s) for s in sources]
    while live:
        k = int(rng.integers(len(live)))
        try:
            yield next(live[k])
        except StopIteration:
            live.pop(k)


def from_arrays(
    values: np.ndarray | Mapping[str, np.ndarray],
    *,
    series_id: str = "series",
    timestamps: np.ndarray | Mapping[str, np.ndarray] | None = None,
    start: int | np.datetime64 = 0,
    step: int | np.timedelta64 = 1,
    chunk: int | None = None,
    order: Order = "sequential",
    seed: int = 0,
) -> Iterator[Observations]:
    """Replay arrays held in memory.

    values: (L, C) for one series named `series_id`, or a mapping series_id -> (L_i, C_i).
    timestamps: (L,) per series (a mapping for many); None numbers the rows start + k * step
        (datetime64/timedelta64 start/step give ns). chunk: rows per batch (None: one batch).
    order: "sequential" yields the series one after another in the mapping's order; "random"
        interleaves their chunks in a seeded random order (`interleave`), each series in order.
    Raises ValueError for shapes, dtypes or arguments that do not fit, before yielding anything.
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    if order not in ("sequential", "random"):
        raise ValueError(f"order must be 'sequential' or 'random', got {order!r}")
    start_i, step_i = _scalar_time(start, "start"), _scalar_time(step, "step")
    if step_i <= 0:
        raise ValueError(f"step must be positive, got {step!r}")
    many = isinstance(values, Mapping)
    table = dict(values) if many else {series_id: values}
    if many and timestamps is not None and not isinstance(timestamps, Mapping):
        raise ValueError("values is a mapping of series, so timestamps must be a mapping too (or None)")
    if not many and isinstance(timestamps, Mapping):
        raise ValueError("timestamps is a mapping but values is a single array")
    if timestamps is not None and set(timestamps if many else ()) - set(table):
        raise ValueError(f"timestamps for unknown series {sorted(set(timestamps) - set(table))}")
    series: list[tuple[str, np.ndarray, np.ndarray]] = []
    for sid, vals in table.items():
        where = f"series {sid!r}"
        if not isinstance(sid, str):
            raise ValueError(f"series ids must be str, got {sid!r}")
        arr = np.asarray(vals)
        if arr.ndim != 2 or arr.dtype.kind not in "biuf":
            raise ValueError(f"{where}: values must be a numeric (L, C) array, got {arr.dtype} {arr.shape}")
        ts = timestamps.get(sid) if many and timestamps is not None else (None if many else timestamps)
        if ts is None:
            ts_L = start_i + step_i * np.arange(len(arr), dtype=np.int64)
        else:
            ts_L = _int64_timestamps(ts, where)
            if len(ts_L) != len(arr):
                raise ValueError(f"{where}: {len(ts_L)} timestamps for {len(arr)} rows")
        series.append((sid, ts_L, arr))

    def chunks(sid: str, ts_L: np.ndarray, arr: np.ndarray) -> Iterator[Observations]:
        size = chunk or max(len(arr), 1)
        for a in range(0, len(arr), size):
            with np.errstate(over="ignore"):
                yield Observations(sid, ts_L[a:a + size].copy(), arr[a:a + size].astype(np.float32))

    per_series = [chunks(*s) for s in series]
    return interleave(per_series, seed=seed) if order == "random" else itertools.chain.from_iterable(per_series)


def from_iterator(it: Iterable[tuple[str, Any, Any]]) -> Iterator[Observations]:
    """Check and convert `(series_id, timestamps, values)` tuples as they come.

    timestamps: (n,) integers, integer-valued floats or datetime64 (-> ns); values: (n, C)
    numbers. Yields Observations; raises ValueError naming the item's position and what is wrong
    when an item is not such a tuple (already yielded items stay valid).
    """
    for k, item in enumerate(it):
        if isinstance(item, Observations):
            yield item
            continue
        if not isinstance(item, tuple) or len(item) != 3:
            raise ValueError(f"item {k}: expected a (series_id, timestamps, values) tuple, got {type(item).__name__}")
        sid, ts, vals = item
        if not isinstance(sid, str):
            raise ValueError(f"item {k}: series_id must be a str, got {sid!r}")
        where = f"item {k} (series {sid!r})"
        ts_n, vals_nC = _int64_timestamps(ts, where), _float32_values(vals, where)
        if len(ts_n) != len(vals_nC):
            raise ValueError(f"{where}: {len(ts_n)} timestamps for {len(vals_nC)} rows of values")
        yield Observations(sid, ts_n, vals_nC)


def _record_ends(buf: bytes) -> np.ndarray:
    """Offsets of the newlines in `buf` that end a record: those outside double quotes."""
    bytes_B = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(bytes_B == ord("\n"))
    if b'"' in buf:
        quotes = np.flatnonzero(bytes_B == ord('"'))
        ends = ends[np.searchsorted(quotes, ends) % 2 == 0]
    return ends


def _csv_blocks(path: Path, columns: list[str], chunk_rows: int) -> Iterator[pl.DataFrame]:
    """Blocks of at most chunk_rows records, parsed as string columns. The file is read in byte
    ranges sized from the mean record length so far (not line by line: a Python object per line
    would cost more memory than the block), and each block ends after a record."""
    with path.open("rb") as f:
        header = f.readline()
        buf, eof, per_row = b"", False, max(len(header), 16)
        while buf or not eof:
            ends = _record_ends(buf)
            while len(ends) < chunk_rows and not eof:
                more = f.read(int((chunk_rows - len(ends)) * per_row * 1.1) + 4096)
                eof = not more
                buf += more
                ends = _record_ends(buf)
            cut = int(ends[chunk_rows - 1]) + 1 if len(ends) >= chunk_rows else len(buf)
            block, buf = buf[:cut], buf[cut:]
            per_row = max(1.0, len(block) / max(1, min(len(ends), chunk_rows)))
            if block and not block.isspace():
                yield pl.read_csv(io.BytesIO(header + block), infer_schema=False, columns=columns,
                                  null_values=list(NULL_VALUES), truncate_ragged_lines=False)


def _parquet_blocks(path: Path, columns: list[str], chunk_rows: int) -> Iterator[pl.DataFrame]:
    """Blocks of at most chunk_rows rows, one sliced scan each: polars reads only the row groups
    under the slice. (`collect_batches` runs ahead of a slow consumer and buffers what it read.)"""
    lazy = pl.scan_parquet(path).select(columns)
    offset = 0
    while (frame := lazy.slice(offset, chunk_rows).collect()).height:
        yield frame
        offset += frame.height


def _block_timestamps(frame: pl.DataFrame, column: str, source: str) -> np.ndarray:
    col = frame.get_column(column)
    if col.dtype == pl.Date:
        col = col.cast(pl.Datetime("ns"))
    if isinstance(col.dtype, pl.Datetime):
        if col.null_count():
            row = int(col.is_null().arg_true()[0]) + 1
            raise ValueError(f"{source}: row {row}, column {column!r}: missing timestamp")
        # the physical value of a zoned Datetime is already UTC
        return col.dt.cast_time_unit("ns").cast(pl.Int64).to_numpy().astype(np.int64, copy=False)
    ts, clock = _timestamps(frame, column, source, None)
    return ts.astype(np.int64, copy=False) * (1000 if clock else 1)  # readers gives microseconds


def from_file(
    path: str | Path,
    *,
    timestamp: str,
    series: str | None = None,
    channels: list[str] | None = None,
    chunk_rows: int = 65536,
) -> Iterator[Observations]:
    """Replay a CSV or Parquet file in blocks of at most `chunk_rows` rows, never the whole file.

    timestamp: the clock column (integers, datetimes or date strings; datetimes become int64 ns).
    series: a column whose values (as str) split each block into per-series batches, in order of
        first appearance within the block; None yields everything as the series named after the
        file's stem. channels: the value columns (default: every other column).
    Raises FileNotFoundError, or ValueError (before yielding) for a suffix other than .csv or
    .parquet or for columns the file does not have (the message lists those it has); a value
    that is not a number or a missing timestamp raises readers.DataError (a ValueError) naming the
    rows of the block and the column when its block is read.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown suffix {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if suffix == ".csv":
        with path.open("rb") as f:
            names = pl.read_csv(io.BytesIO(f.readline()), infer_schema=False).columns
    else:
        names = pl.scan_parquet(path).collect_schema().names()
    missing = [c for c in [timestamp, series, *(channels or [])] if c is not None and c not in names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the file has {names}")
    if channels is None:
        channels = [c for c in names if c not in (timestamp, series)]
    if not channels or timestamp in channels or (series is not None and series in channels):
        raise ValueError(f"{path}: channels {channels} must be non-empty and exclude the timestamp and series "
                         f"columns; the file has {names}")
    wanted = list(dict.fromkeys([timestamp, *([series] if series else []), *channels]))
    blocks = _csv_blocks(path, wanted, chunk_rows) if suffix == ".csv" else _parquet_blocks(path, wanted, chunk_rows)

    def batches() -> Iterator[Observations]:
        offset = 0
        for frame in blocks:
            source = f"{path} [data rows {offset + 1}..{offset + frame.height}]"
            offset += frame.height
            ts_n = _block_timestamps(frame, timestamp, source)
            vals_nC = np.stack([_to_float(frame, c, source) for c in channels], axis=1).astype(np.float32)
            if series is None:
                yield Observations(path.stem, ts_n, vals_nC)
                continue
            ids = frame.get_column(series)
            if ids.null_count():
                raise ValueError(f"{source}: row {int(ids.is_null().arg_true()[0]) + 1}, column {series!r}: "
                                 "missing series id")
            # integer codes from polars: numpy's unique over an object array of strings is slow
            ids = ids.cast(pl.String)
            code_n = ids.rank("dense").to_numpy().astype(np.int64) - 1
            _, first = np.unique(code_n, return_index=True)
            by_group = np.argsort(code_n, kind="stable")
            bounds = np.cumsum(np.bincount(code_n, minlength=len(first)))
            names = ids.gather(first).to_list()
            for g in np.argsort(first, kind="stable").tolist():
                rows = by_group[(bounds[g - 1] if g else 0):bounds[g]]
                yield Observations(names[g], ts_n[rows], vals_nC[rows])

    return batches()
