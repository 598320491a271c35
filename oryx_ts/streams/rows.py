"""Reading one pushed batch of rows for `regularizer.Regularizer`: timestamps, values, and their rejection codes.

Shape legend: n rows pushed, C channels.
"""

from __future__ import annotations

import datetime as dt
import numbers
from typing import Any, Literal

import numpy as np

Reason = Literal["late", "duplicate", "off_grid", "wrong_width", "not_finite", "empty_row", "bad_timestamp", "too_far"]
Duplicates = Literal["reject", "first", "last"]

# Row codes while a push is classified; 0 = still acceptable. The order is the precedence order.
_OK, _BAD_TS, _WIDTH, _NOT_FINITE, _EMPTY, _OFF_GRID, _LATE, _DUP, _FAR = range(9)
_REASONS: tuple[Reason | None, ...] = (None, "bad_timestamp", "wrong_width", "not_finite", "empty_row",
                                       "off_grid", "late", "duplicate", "too_far")
_NS = np.dtype("datetime64[ns]")
_INT64_MAX = np.iinfo(np.int64).max
_STATE_VERSION = 1


def _parse_timestamps(timestamps: Any) -> tuple[np.ndarray, np.ndarray, bool | None, np.ndarray]:
    """-> (int64 (n,) with 0 where unreadable, readable mask (n,), whether they are datetimes
    (None when none is readable), the array as given for details)."""
    raw = timestamps if isinstance(timestamps, np.ndarray) else np.asarray(timestamps)
    if raw.ndim != 1:
        raise ValueError(f"timestamps must be 1-D, got shape {raw.shape}")
    kind = raw.dtype.kind
    if kind == "M":
        as_ns = raw.astype(_NS)
        ok = ~np.isnat(as_ns)
        return as_ns.view(np.int64), ok, True if ok.any() else None, raw
    if kind in "iu":
        if kind == "u" and raw.dtype.itemsize == 8:
            ok = raw <= _INT64_MAX
            return np.where(ok, raw, 0).astype(np.int64), ok, False, raw
        return raw.astype(np.int64, copy=False), np.ones(len(raw), dtype=bool), False if len(raw) else None, raw
    if kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(raw) & (raw == np.floor(raw)) & (np.abs(raw) < 2.0**63)
        return np.where(ok, raw, 0).astype(np.int64), ok, False if ok.any() else None, raw
    if kind in "bmc":
        raise ValueError(f"timestamps must be integers or datetime64, got an array of {raw.dtype}")
    # Objects and strings: element by element (the slow path, for hand-built lists).
    ts = np.zeros(len(raw), dtype=np.int64)
    ok = np.zeros(len(raw), dtype=bool)
    kinds: set[bool] = set()
    # numpy turns a list mixing strings and numbers into strings: read the elements as given.
    items = list(timestamps) if isinstance(timestamps, (list, tuple)) else raw.tolist()
    for i, v in enumerate(items):
        value, is_dt = _scalar_timestamp(v)
        if value is not None:
            ts[i], ok[i] = value, True
            kinds.add(is_dt)
    if len(kinds) > 1:
        raise ValueError("timestamps mix integers and datetimes in one batch")
    return ts, ok, (kinds.pop() if kinds else None), raw


def _scalar_timestamp(v: Any) -> tuple[int | None, bool]:
    if isinstance(v, (bool, np.bool_)):
        return None, False
    if isinstance(v, (int, np.integer)):
        return (int(v), False) if -_INT64_MAX - 1 <= v <= _INT64_MAX else (None, False)
    if isinstance(v, (float, np.floating)):
        ok = np.isfinite(v) and v == np.floor(v) and abs(v) < 2.0**63
        return (int(v), False) if ok else (None, False)
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        v = v.astimezone(dt.timezone.utc).replace(tzinfo=None)
    if isinstance(v, (np.datetime64, dt.date)):
        t = np.datetime64(v, "ns")
        return (None, True) if np.isnat(t) else (int(t.view(np.int64)), True)
    return None, False


def _is_number(v: Any) -> bool:
    return isinstance(v, (numbers.Real, np.bool_)) and not isinstance(v, np.timedelta64)


def _parse_values(values: Any, n: int, channels: int) -> tuple[np.ndarray, np.ndarray, dict[int, str], Any]:
    """-> (float32 (n, C) with NaN in unreadable rows, codes (n,) int8 with wrong_width and
    not_finite set, details of the rows refused here, the numeric array or None for details)."""
    arr: np.ndarray | None
    if isinstance(values, np.ndarray):
        arr = values
    else:
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError):  # ragged rows: sorted out row by row below
            arr = None
    codes = np.zeros(n, dtype=np.int8)
    if arr is not None and n == 0 and arr.size == 0:
        return np.empty((0, channels), dtype=np.float32), codes, {}, None
    if arr is not None and arr.dtype.kind in "biuf":
        if arr.ndim != 2:
            raise ValueError(f"values must be 2-D (rows, {channels} channels), got shape {arr.shape}")
        if len(arr) != n:
            raise ValueError(f"{n} timestamps but {len(arr)} rows of values")
        if arr.shape[1] != channels:
            codes[:] = _WIDTH
            detail = f"{arr.shape[1]} values, expected {channels}"
            return np.full((n, channels), np.nan, dtype=np.float32), codes, dict.fromkeys(range(n), detail), None
        with np.errstate(over="ignore"):
            return arr.astype(np.float32), codes, {}, arr
    if arr is not None and arr.ndim != 2 and arr.dtype != object:
        raise ValueError(f"values must be 2-D (rows, {channels} channels), got shape {arr.shape}")
    if isinstance(values, (list, tuple)):  # as given: numpy would have turned mixed rows into strings
        rows = list(values)
    elif arr is not None and arr.ndim in (1, 2):
        rows = list(arr)
    else:
        raise ValueError(f"values must be a 2-D array or a sequence of rows, got {type(values).__name__}")
    if len(rows) != n:
        raise ValueError(f"{n} timestamps but {len(rows)} rows of values")
    out = np.full((n, channels), np.nan, dtype=np.float32)
    details: dict[int, str] = {}
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            codes[i] = _WIDTH
            details[i] = f"row is {type(row).__name__} {row!r}, expected a sequence of {channels} values"
        elif len(row) != channels:
            codes[i], details[i] = _WIDTH, f"{len(row)} values, expected {channels}"
        else:
            bad = next((j for j, v in enumerate(row) if not _is_number(v)), None)
            if bad is not None:
                v = row[bad].item() if isinstance(row[bad], np.generic) else row[bad]
                codes[i], details[i] = _NOT_FINITE, f"channel {bad} is {v!r}, not a number"
            else:
                with np.errstate(over="ignore"):
                    out[i] = np.asarray([float(v) for v in row], dtype=np.float64).astype(np.float32)
    return out, codes, details, None


def _as_slice(positions: np.ndarray) -> slice | None:
    """The slice equal to `positions` when they are a, a+1, ..., b; None otherwise."""
    a, b = int(positions[0]), int(positions[-1])
    if b - a + 1 != len(positions) or not (positions[1:] > positions[:-1]).all():
        return None
    return slice(a, b + 1)


def _finite_detail(row_C: np.ndarray, source_C: np.ndarray | None) -> str:
    j = int(np.flatnonzero(np.isinf(row_C))[0])
    if source_C is not None and np.isfinite(source_C[j]):
        return f"channel {j} is {source_C[j].item()!r}, which overflows float32"
    return f"channel {j} is {row_C[j]}, expected a finite number or NaN"


def _as_int(value: Any, name: str, *, positive: bool = False) -> tuple[int, bool]:
    """An int, timedelta64 or datetime64 argument -> (int64 value, whether it is a clock value)."""
    if isinstance(value, np.timedelta64):
        return int(value.astype("timedelta64[ns]").view(np.int64)), True
    if isinstance(value, np.datetime64):
        return int(value.astype(_NS).view(np.int64)), True
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{' > 0' if positive else ''}, got {value!r}")
    return int(value), False
