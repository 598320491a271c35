"""Per-series regularization: raw observations onto a fixed time grid, released in grid order.

A `Regularizer` owns one series. `push(timestamps, values)` checks each row, puts the accepted
ones on the grid `origin + k * step` and releases the grid rows that can no longer change as one
float32 block (NaN = gap or missing channel). Every rejected row comes back with a reason and a
detail; a rejected row changes no state, and a batch that cannot be read at all raises ValueError
before anything changes. `state_dict` / `from_state_dict` snapshot and restore it bit for bit.

Rules, in the order they are checked for each row:
1. bad_timestamp: not an integer (an integer-valued float is one) or a NaT/NaN.
2. wrong_width: not `channels` values.
3. not_finite: a value that is +-inf, overflows float32, or is not a number.
4. empty_row: every value NaN (NaN alone only marks a missing channel).
5. off_grid: `(t - origin) % step != 0`.
6. late: its grid index was already released (`index < next_index`), including a second value
   for a released step and any row before the start of the stream.
7. duplicate: a second value for a grid step still open, under `duplicates="reject"` or
   `"first"` (both keep the value already there); under `"last"` the new value replaces it and
   both rows count as accepted.

A push is equivalent to pushing its rows one at a time in timestamp order (a stable sort, so
equal timestamps keep their order in the batch), except that a push that infers the step takes it
from all of its timestamps at once; `Rejection.index` is the row's position in the batch as given.

Grid and release:
- Timestamps are int64 in any unit, or numpy datetime64 (converted to int64 nanoseconds, so `step`
  and `origin` are then in ns; `step` may be given as a timedelta64 and `origin` as a datetime64).
  One regularizer never mixes the two kinds.
- `origin` defaults to the first accepted timestamp (the smallest acceptable one of the first push
  that accepts anything). The stream starts at the first accepted row: `next_index` begins at its
  grid index, so an explicit origin sets the grid's phase without releasing gaps back to it.
- `step=None` infers the step: rows are held (accepted, not released) while only one distinct
  timestamp has been seen; once a second appears, step = the smallest positive difference among
  the distinct timestamps seen so far at or after the origin (rows before the origin are late).
  Later rows off that grid are rejected as off_grid. An explicit origin needs an explicit step,
  since an inferred step could put an already accepted row off the grid.
- With `tolerance = 0` a row is released as soon as it is accepted, with the gaps before it. With
  `tolerance = k > 0` the k grid steps behind the newest accepted index stay open: a row arriving
  up to k steps behind the newest fills its gap; rows (and gaps) more than k steps behind are
  released. The newest row is held only because rows behind it are open.

Shape legend: n rows pushed, L grid rows, C channels.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from oryx_ts.streams.rows import (
    _BAD_TS, _DUP, _EMPTY, _FAR, _LATE, _NOT_FINITE, _OFF_GRID, _OK, _REASONS, _STATE_VERSION, _WIDTH,
    Duplicates, Reason, _as_int, _as_slice, _finite_detail, _parse_timestamps, _parse_values,
)

__all__ = ["PushResult", "Reason", "Regularizer", "RegularizerPolicy", "Rejection"]


@dataclass(frozen=True)
class Rejection:
    """One refused row: its position in the pushed batch, its timestamp (int64, ns for datetimes;
    None when it could not be read), the reason and a sentence naming the offending value."""

    index: int
    timestamp: int | None
    reason: Reason
    detail: str


@dataclass(frozen=True, kw_only=True)
class RegularizerPolicy:
    """How late and repeated rows are handled.

    tolerance: grid steps held open behind the newest accepted index; a late row within them fills
        its gap. 0 releases every row as soon as it is accepted.
    duplicates: a second value for a grid step still open is rejected ("reject"; "first" does the
        same: the first value stays and the new row is rejected as "duplicate") or replaces the
        first ("last"). A second value for a step already released is always "late".
    max_gap: a row more than this many grid steps after the newest accepted one is rejected as
        "too_far" (and so is every later row of its push), because the gap would be released as that
        many missing rows; None accepts any gap. A service sets it so that one far-future
        timestamp cannot make the engine step millions of empty patches.
    """

    tolerance: int = 0
    duplicates: Duplicates = "reject"
    max_gap: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, numbers.Integral) or self.tolerance < 0:
            raise ValueError(f"tolerance must be an integer >= 0, got {self.tolerance!r}")
        if self.duplicates not in get_args(Duplicates):
            raise ValueError(f"duplicates must be one of {get_args(Duplicates)}, got {self.duplicates!r}")
        if self.max_gap is not None and (isinstance(self.max_gap, bool) or not isinstance(self.max_gap, numbers.Integral)
                                         or self.max_gap < 1):
            raise ValueError(f"max_gap must be an integer >= 1 or None, got {self.max_gap!r}")


@dataclass
class PushResult:
    """What one push (or drain) did: rows accepted, rows rejected (in batch order), and the grid
    rows it released, `released_LC` (R, C) float32 in grid order starting at grid index
    `first_index` (when nothing is released, R = 0 and first_index = next_index)."""

    accepted: int
    rejected: list[Rejection]
    released_LC: np.ndarray
    first_index: int


class Regularizer:
    """One series' observations onto a fixed grid (see the module docstring for the rules).

    channels: values per row (C). step: grid step (int, or timedelta64 for datetime stamps); None
    infers it. origin: a timestamp on the grid (int or datetime64); None takes the first accepted
    one, and an explicit origin needs an explicit step. policy: tolerance and duplicates.
    Raises ValueError for a channels/step/origin/policy that cannot work.
    """

    def __init__(self, channels: int, *, step: int | np.timedelta64 | None = None,
                 origin: int | np.datetime64 | None = None, policy: RegularizerPolicy = RegularizerPolicy()):
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if not isinstance(policy, RegularizerPolicy):
            raise ValueError(f"policy must be a RegularizerPolicy, got {type(policy).__name__}")
        self.channels = int(channels)
        self.policy = policy
        self._datetime: bool | None = None
        self._step: int | None = None
        self._origin: int | None = None
        if step is not None:
            self._step, clock = _as_int(step, "step", positive=True)
            if self._step <= 0:
                raise ValueError(f"step must be > 0, got {step!r}")
            self._datetime = True if clock else None
        if origin is not None:
            if step is None:
                raise ValueError(f"origin={origin!r} needs an explicit step: an inferred step could put "
                                 "already accepted rows off the grid")
            self._origin, clock = _as_int(origin, "origin")
            if clock or self._datetime:
                self._datetime = True
        self._started = False
        self._next = 0
        self._newest = -1
        self._pending_LC = np.empty((0, self.channels), dtype=np.float32)
        self._observed_L = np.zeros(0, dtype=bool)

    @property
    def step(self) -> int | None:
        """Grid step (ns for datetime stamps); None until inferred."""
        return self._step

    @property
    def origin(self) -> int | None:
        """Timestamp of grid index 0; None until the first row is accepted (unless given)."""
        return self._origin

    @property
    def next_index(self) -> int:
        """Grid index of the next row to release."""
        return self._next

    @property
    def newest_index(self) -> int | None:
        """Grid index of the newest accepted row; None before any."""
        return self._newest if self._started else None

    @property
    def pending(self) -> int:
        """Grid rows accepted or gapped but not yet released (next_index..newest_index)."""
        return self._newest - self._next + 1

    def timestamp_of(self, index: int) -> int:
        """The timestamp of grid index `index` (int64; ns for datetime stamps).
        Raises ValueError while the origin, or the step for an index other than 0, is unknown."""
        if self._origin is None or (self._step is None and index != 0):
            raise ValueError(f"grid index {index} has no timestamp yet: origin={self._origin}, step={self._step}")
        return self._origin + int(index) * (self._step or 0)

    def push(self, timestamps: Any, values: Any) -> PushResult:
        """Check, place and release one batch of rows.

        timestamps: (n,) ints, integer-valued floats or datetime64. values: (n, C) numbers, as an
        array or a list of rows (rows of another width or holding non-numbers are rejected one by
        one). Returns a PushResult; rejected rows change nothing.
        Raises ValueError, before changing any state, when the batch cannot be read: timestamps not
        1-D, values not 2-D, lengths that differ, or datetimes fed to an integer stream (or back).
        """
        one = self._push_one(timestamps, values)
        if one is not None:
            return one
        ts_n, ts_ok_n, is_datetime, raw_ts = _parse_timestamps(timestamps)
        n = len(ts_n)
        vals_nC, code_n, details, source_nC = _parse_values(values, n, self.channels)
        if is_datetime is not None and self._datetime is not None and is_datetime != self._datetime:
            have = "datetime64" if self._datetime else "integer"
            raise ValueError(f"this stream has {have} timestamps, got {raw_ts.dtype} ({raw_ts[:3]!r}...)")
        code_n[~ts_ok_n] = _BAD_TS
        unchecked = code_n == _OK
        if unchecked.any():
            with np.errstate(invalid="ignore"):
                code_n[unchecked & np.isinf(vals_nC).any(axis=1)] = _NOT_FINITE
                code_n[(code_n == _OK) & np.isnan(vals_nC).all(axis=1)] = _EMPTY
        return self._place(ts_n, vals_nC, code_n, details, raw_ts, source_nC, is_datetime)

    def _push_one(self, timestamps: Any, values: Any) -> PushResult | None:
        """The common single-row case (an integer stamp on the grid, at or after next_index, a new
        value with at least one finite channel) in scalar Python; None hands the row to the general
        path, which gives the same result for it and handles everything else."""
        if (not self._started or self._step is None or self._datetime
                or not (isinstance(timestamps, (list, tuple)) or getattr(timestamps, "ndim", 0) == 1)
                or not isinstance(values, (list, tuple, np.ndarray)) or len(timestamps) != 1 or len(values) != 1):
            return None
        t = timestamps[0]
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            return None
        row = values[0]
        if isinstance(values, np.ndarray):
            if values.ndim != 2 or values.dtype.kind not in "biuf" or values.shape[1] != self.channels:
                return None
            with np.errstate(over="ignore"):
                row_C = row.astype(np.float32)
        elif isinstance(row, (list, tuple)) and len(row) == self.channels and all(
                type(v) is float or type(v) is int for v in row):
            with np.errstate(over="ignore"):
                row_C = np.array(row, dtype=np.float32)
        else:
            return None
        finite_C = np.isfinite(row_C)
        if not finite_C.all() and (not finite_C.any() or np.isinf(row_C).any()):
            return None
        k, off = divmod(int(t) - self._origin, self._step)
        next_, newest, tol = self._next, self._newest, self.policy.tolerance
        if off or k < next_ or (self.policy.max_gap is not None and k - newest > self.policy.max_gap):
            return None
        if k <= newest:
            if self._observed_L[k - next_] and self.policy.duplicates != "last":
                return None
            pending_LC, observed_L = self._pending_LC.copy(), self._observed_L.copy()
            pending_LC[k - next_], observed_L[k - next_] = row_C, True
            self._pending_LC, self._observed_L = pending_LC, observed_L
            return PushResult(1, [], np.empty((0, self.channels), dtype=np.float32), next_)
        n_old = newest - next_ + 1
        if tol == 0 and k == next_:
            window_LC, observed_L = row_C.reshape(1, -1), np.ones(1, dtype=bool)
        else:
            window_LC = np.full((k - next_ + 1, self.channels), np.nan, dtype=np.float32)
            observed_L = np.zeros(k - next_ + 1, dtype=bool)
            window_LC[:n_old], observed_L[:n_old] = self._pending_LC, self._observed_L
            window_LC[-1], observed_L[-1] = row_C, True
        released = max(0, k + 1 - next_ if tol == 0 else k - tol - next_)
        self._newest, self._next = k, next_ + released
        self._pending_LC = window_LC[released:].copy() if released else window_LC
        self._observed_L = observed_L[released:].copy() if released else observed_L
        return PushResult(1, [], window_LC[:released], next_)

    def _place(self, ts_n: np.ndarray, vals_nC: np.ndarray, code_n: np.ndarray, details: dict[int, str],
               raw_ts: np.ndarray, source_nC: np.ndarray | None, is_datetime: bool | None) -> PushResult:
        step, origin, started, tol = self._step, self._origin, self._started, self.policy.tolerance
        next_, newest = self._next, self._newest
        cand = np.flatnonzero(code_n == _OK)
        t_c = ts_n[cand]
        idx_c = np.zeros(len(cand), dtype=np.int64)
        why: dict[int, str] = {}
        if len(cand) and step is None:
            early = t_c < origin if origin is not None else np.zeros(len(cand), dtype=bool)
            known = np.asarray([] if origin is None else [origin], dtype=np.int64)
            seen = np.unique(np.concatenate([t_c[~early], known]))
            if origin is None:
                origin = int(seen[0])
            if len(seen) >= 2:
                step = int(np.diff(seen).min())
            code_n[cand[early]] = _LATE
            why.update(dict.fromkeys(cand[early].tolist(), f"before the origin {origin}"))
        if len(cand) and step is not None:
            if origin is None:
                origin = int(t_c.min())
            # Distances from the origin beyond 2**62 would overflow the int64 arithmetic below.
            if int(t_c.min()) - origin <= -2**62 or int(t_c.max()) - origin >= 2**62:
                far = np.abs(t_c.astype(np.float64) - float(origin)) >= 2.0**62
                idx_c, off_c = np.divmod(np.where(far, origin, t_c) - origin, step)
                bad = far | (off_c != 0)
            else:
                idx_c, off_c = np.divmod(t_c - origin, step)
                bad = off_c != 0
            code_n[cand[bad]] = _OFF_GRID
        keep = code_n[cand] == _OK
        cand, idx_c = cand[keep], idx_c[keep]
        if len(cand) and not started:
            next_ = int(idx_c.min())
            newest = next_ - 1
        late = idx_c < next_
        code_n[cand[late]] = _LATE
        cand, idx_c = cand[~late], idx_c[~late]
        if len(idx_c) > 1 and not np.all(idx_c[1:] >= idx_c[:-1]):
            order = np.argsort(idx_c, kind="stable")
            cand, idx_c = cand[order], idx_c[order]
        max_gap = self.policy.max_gap
        if max_gap is not None and len(idx_c):
            over = np.flatnonzero(np.diff(idx_c, prepend=newest) > max_gap)
            if len(over):  # the first row past the gap, and every row after it (measured from it, they follow it)
                j = int(over[0])
                code_n[cand[j:]] = _FAR
                after = int(idx_c[j - 1]) if j else newest
                why.update(dict.fromkeys(cand[j:].tolist(), f"more than max_gap={max_gap} grid steps after grid index "
                                                            f"{after}, the newest accepted before it"))
                cand, idx_c = cand[:j], idx_c[:j]

        n_old = newest - next_ + 1
        if tol == 0 and len(cand) > 1:
            # Tolerance 0 releases a row as soon as it is accepted, so a repeat later in the same
            # push is late, as it would be pushed alone. While the step is still unknown (index 0
            # when this push infers it) nothing was released and the duplicates policy applies.
            repeat = np.zeros(len(cand), dtype=bool)
            repeat[1:] = idx_c[1:] == idx_c[:-1]
            if self._step is None:
                repeat &= idx_c != 0
            if repeat.any():
                code_n[cand[repeat]] = _LATE
                why.update(dict.fromkeys(cand[repeat].tolist(), "a repeat of a grid index this push released "
                                                                "as soon as its first row was accepted (tolerance 0)"))
                cand, idx_c = cand[~repeat], idx_c[~repeat]
        if self.policy.duplicates == "last":
            accepted = len(cand)
            last = np.ones(len(cand), dtype=bool)
            last[:-1] = idx_c[1:] != idx_c[:-1]
            cand_w, idx_w = cand[last], idx_c[last]
        else:
            dup = np.zeros(len(cand), dtype=bool)
            dup[1:] = idx_c[1:] == idx_c[:-1]
            inside = idx_c <= newest
            if inside.any():
                dup[inside] |= self._observed_L[idx_c[inside] - next_]
            code_n[cand[dup]] = _DUP
            cand_w, idx_w = cand[~dup], idx_c[~dup]
            accepted = len(cand_w)

        if accepted:
            newest = max(newest, int(idx_w[-1]))
        if step is None:
            cutoff = next_
        else:
            cutoff = max(next_, newest + 1 if tol == 0 else newest - tol)
        width = newest - next_ + 1
        # Slices instead of fancy indexing where rows are in order and contiguous: the common big push.
        rows = _as_slice(cand_w) if accepted else None
        at = _as_slice(idx_w - next_) if accepted else None
        rows_nC = vals_nC[rows if rows is not None else cand_w] if accepted else None
        if accepted and n_old == 0 and at is not None and at == slice(0, width):
            window_LC, observed_L = rows_nC, np.ones(width, dtype=bool)
        else:
            if accepted and width == n_old:  # a copy, so that state changes only at the commit below
                window_LC, observed_L = self._pending_LC.copy(), self._observed_L.copy()
            elif accepted:
                window_LC = np.full((width, self.channels), np.nan, dtype=np.float32)
                observed_L = np.zeros(width, dtype=bool)
                window_LC[:n_old] = self._pending_LC
                observed_L[:n_old] = self._observed_L
            else:
                window_LC, observed_L = self._pending_LC, self._observed_L
            if accepted:
                window_LC[at if at is not None else idx_w - next_] = rows_nC
                observed_L[at if at is not None else idx_w - next_] = True

        rejected = self._rejections(code_n, ts_n, vals_nC, details, why, raw_ts, source_nC, origin, step, next_)
        released = cutoff - next_
        result = PushResult(accepted, rejected, window_LC[:released], next_)
        if accepted:
            self._started = True
            if self._datetime is None:
                self._datetime = is_datetime
            self._origin, self._step = origin, step
            self._newest = newest
        self._next = cutoff
        self._pending_LC = window_LC[released:].copy() if released else window_LC
        self._observed_L = observed_L[released:].copy() if released else observed_L
        return result

    def _rejections(self, code_n: np.ndarray, ts_n: np.ndarray, vals_nC: np.ndarray, details: dict[int, str],
                    why: dict[int, str], raw_ts: np.ndarray, source_nC: np.ndarray | None, origin: int | None,
                    step: int | None, next_: int) -> list[Rejection]:
        out = []
        for i in np.flatnonzero(code_n).tolist():
            code = int(code_n[i])
            t = int(ts_n[i]) if code != _BAD_TS else None
            if i in details and code in (_WIDTH, _NOT_FINITE):
                detail = details[i]
            elif code == _BAD_TS:
                v = raw_ts[i]
                detail = f"timestamp {v.item() if isinstance(v, np.generic) else v!r} is not an integer or datetime64"
            elif code == _NOT_FINITE:
                detail = _finite_detail(vals_nC[i], None if source_nC is None else source_nC[i])
            elif code == _EMPTY:
                detail = f"every one of the {self.channels} values is NaN"
            elif code == _OFF_GRID:
                detail = f"timestamp {t} is off the grid {origin} + k * {step} (remainder {(t - origin) % step})"
            elif code == _FAR:
                detail = f"timestamp {t} is {why[i]}"
            elif code == _LATE:
                detail = why.get(i) or (f"timestamp {t} is grid index {(t - origin) // step if step else 0}, "
                                        f"already released (next index {next_})")
            else:
                k = (t - origin) // step if step else 0
                detail = (f"grid index {k} (timestamp {t}) already has a value; "
                          f"duplicates={self.policy.duplicates!r} keeps the first")
            out.append(Rejection(i, t, _REASONS[code], detail))
        return out

    def advance(self, timestamp: int) -> PushResult:
        """Nothing more will arrive up to `timestamp`: release every grid row up to it (gaps as NaN).

        Rows after it stay pending. A timestamp before the next row to release changes nothing.
        Before the first accepted row (an explicit origin and step) the stream starts after
        `timestamp`: nothing is released and rows up to it become late.
        Raises ValueError while the grid is unknown or when `timestamp` is off the grid.
        """
        if self._origin is None or self._step is None:
            raise ValueError(f"cannot advance to {timestamp!r}: the grid is not known yet "
                             f"(origin={self._origin}, step={self._step})")
        t, _ = _as_int(timestamp, "timestamp")
        k, off = divmod(t - self._origin, self._step)
        if off:
            raise ValueError(f"timestamp {t} is off the grid (origin {self._origin}, step {self._step})")
        first = self._next
        if not self._started:  # releasing gaps back to an explicit origin could mean years of NaN rows
            self._started, self._next, self._newest = True, k + 1, k
            return PushResult(0, [], np.empty((0, self.channels), dtype=np.float32), k + 1)
        if k < self._next:
            return PushResult(0, [], np.empty((0, self.channels), dtype=np.float32), first)
        if k > self._newest:
            extra = k - self._newest
            gaps_LC = np.full((extra, self.channels), np.nan, dtype=np.float32)
            self._pending_LC = np.concatenate([self._pending_LC, gaps_LC])
            self._observed_L = np.concatenate([self._observed_L, np.zeros(extra, dtype=bool)])
            self._newest = k
            self._started = True
        cut = k - self._next + 1
        released_LC = self._pending_LC[:cut].copy()
        self._pending_LC, self._observed_L = self._pending_LC[cut:].copy(), self._observed_L[cut:].copy()
        self._next = k + 1
        return PushResult(0, [], released_LC, first)

    def drain(self) -> PushResult:
        """End of stream: release every pending row (gaps as NaN); later pushes continue after them."""
        first = self._next
        released_LC = self._pending_LC
        self._next = self._newest + 1
        self._pending_LC = np.empty((0, self.channels), dtype=np.float32)
        self._observed_L = np.zeros(0, dtype=bool)
        return PushResult(0, [], released_LC, first)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot: JSON-able metadata plus two numpy arrays, `pending_LC` (float32, pending
        rows) and `observed_L` (bool, which of them hold a value). Arrays are copies."""
        return {
            "version": _STATE_VERSION,
            "channels": self.channels,
            "step": self._step,
            "origin": self._origin,
            "datetime": self._datetime,
            "policy": {"tolerance": int(self.policy.tolerance), "duplicates": self.policy.duplicates},
            "started": self._started,
            "next_index": self._next,
            "newest_index": self._newest,
            "pending_LC": self._pending_LC.copy(),
            "observed_L": self._observed_L.copy(),
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> Regularizer:
        """Restore a `state_dict` exactly; raises ValueError for a missing key, another version or
        arrays whose shape or dtype do not match the metadata."""
        keys = {"version", "channels", "step", "origin", "datetime", "policy", "started", "next_index",
                "newest_index", "pending_LC", "observed_L"}
        if not isinstance(d, dict) or keys - set(d):
            missing = sorted(keys - set(d)) if isinstance(d, dict) else d
            raise ValueError(f"not a Regularizer state: missing {missing!r}")
        if d["version"] != _STATE_VERSION:
            raise ValueError(f"Regularizer state version {d['version']!r}, expected {_STATE_VERSION}")
        self = cls(d["channels"], policy=RegularizerPolicy(**d["policy"]))
        pending = int(d["newest_index"]) - int(d["next_index"]) + 1
        pending_LC, observed_L = np.asarray(d["pending_LC"]), np.asarray(d["observed_L"])
        if (pending < 0 or pending_LC.dtype != np.float32 or pending_LC.shape != (pending, self.channels)
                or observed_L.dtype != bool or observed_L.shape != (pending,)):
            raise ValueError(f"Regularizer state arrays {pending_LC.dtype}{pending_LC.shape} and "
                             f"{observed_L.dtype}{observed_L.shape} do not match {pending} pending rows of "
                             f"{self.channels} channels")
        if d["step"] is not None and int(d["step"]) <= 0:
            raise ValueError(f"Regularizer state has step {d['step']!r}")
        self._step = None if d["step"] is None else int(d["step"])
        self._origin = None if d["origin"] is None else int(d["origin"])
        self._datetime = None if d["datetime"] is None else bool(d["datetime"])
        self._started = bool(d["started"])
        self._next, self._newest = int(d["next_index"]), int(d["newest_index"])
        self._pending_LC, self._observed_L = pending_LC.copy(), observed_L.copy()
        return self
