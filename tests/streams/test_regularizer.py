"""The regularizer decides which observations reach the model, so every rule it states (grid, gaps,
late and duplicate rows, malformed values, snapshots) must hold row by row, on random streams
checked against an independent reference, and fast enough for the engine's hot path.

Legend: n rows pushed, L grid rows, C channels.
"""

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oryx_ts.streams.regularizer import PushResult, Regularizer, RegularizerPolicy, Rejection

NAN = float("nan")
REASONS = {"late", "duplicate", "off_grid", "wrong_width", "not_finite", "empty_row", "bad_timestamp", "too_far"}


def _reasons(result: PushResult) -> dict[int, str]:
    return {r.index: r.reason for r in result.rejected}


def _same_state(a: Regularizer, b: Regularizer) -> bool:
    da, db = a.state_dict(), b.state_dict()
    arrays = ("pending_LC", "observed_L")
    return ({k: v for k, v in da.items() if k not in arrays} == {k: v for k, v in db.items() if k not in arrays}
            and all(da[k].dtype == db[k].dtype and da[k].tobytes() == db[k].tobytes() for k in arrays))


# --- the grid -------------------------------------------------------------------------------------

def test_gaps_become_nan_rows_released_at_once_with_tolerance_0():
    reg = Regularizer(2, step=10)
    res = reg.push([100, 110, 140], [[1, 2], [3, 4], [5, NAN]])
    assert res.accepted == 3 and res.rejected == [] and res.first_index == 0
    expected = [[1, 2], [3, 4], [NAN, NAN], [NAN, NAN], [5, NAN]]
    assert res.released_LC.dtype == np.float32
    assert np.array_equal(res.released_LC, np.array(expected, dtype=np.float32), equal_nan=True)
    assert (reg.origin, reg.step, reg.next_index, reg.newest_index, reg.pending) == (100, 10, 5, 4, 0)
    assert reg.timestamp_of(4) == 140
    res = reg.push([150], [[7, 8]])
    assert res.first_index == 5 and res.released_LC.tolist() == [[7, 8]]


@pytest.mark.parametrize("tolerance", [0, 3])
def test_a_row_past_max_gap_is_too_far_with_every_later_row_of_its_push_and_changes_nothing(tolerance):
    reg = Regularizer(1, step=1, policy=RegularizerPolicy(tolerance=tolerance, max_gap=5))
    assert reg.push([0, 1, 2], [[0], [1], [2]]).accepted == 3
    before = copy.deepcopy(reg)
    for one in ([8], [10**15]):  # the one-row fast path and a far-future stamp
        res = reg.push(one, [[9]])
        assert res.accepted == 0 and _reasons(res) == {0: "too_far"} and len(res.released_LC) == 0
        assert "max_gap=5" in res.rejected[0].detail and "grid index 2" in res.rejected[0].detail
        assert _same_state(reg, before)
    # a backfill may span more than max_gap steps as long as no single gap is over it
    res = reg.push([3, 7, 12, 13, 30, 31], [[3], [7], [12], [13], [30], [31]])
    assert res.accepted == 4 and _reasons(res) == {4: "too_far", 5: "too_far"}
    assert reg.newest_index == 13
    assert reg.push([18], [[18]]).accepted == 1  # exactly max_gap steps after the newest is accepted
    with pytest.raises(ValueError, match="max_gap"):
        RegularizerPolicy(max_gap=0)


def test_explicit_origin_sets_the_phase_without_releasing_gaps_back_to_it():
    reg = Regularizer(1, step=300, origin=0)
    res = reg.push([3000, 3300], [[1], [2]])
    assert res.first_index == 10 and res.released_LC.tolist() == [[1], [2]]
    assert _reasons(reg.push([3350], [[3]])) == {0: "off_grid"}


def test_rows_out_of_order_within_a_push_are_sorted_and_keep_their_batch_index():
    reg = Regularizer(1, step=1)
    res = reg.push([3, 1, 2, 1], [[30], [10], [20], [11]])
    assert res.released_LC.ravel().tolist() == [10, 20, 30]
    assert res.rejected[0].index == 3 and res.rejected[0].timestamp == 1


def test_tolerance_holds_steps_open_for_late_rows():
    reg = Regularizer(1, step=1, policy=RegularizerPolicy(tolerance=2))
    assert reg.push([0], [[0]]).released_LC.shape == (0, 1)
    res = reg.push([3], [[3]])  # index 0 is now 3 steps behind: released; 1 and 2 stay open
    assert res.released_LC.ravel().tolist() == [0] and reg.pending == 3
    res = reg.push([2], [[2]])  # 1 step behind the newest: fills its gap
    assert res.accepted == 1 and res.released_LC.shape == (0, 1)
    res = reg.push([5], [[5]])
    assert np.array_equal(res.released_LC.ravel(), [NAN, 2], equal_nan=True) and res.first_index == 1
    late = reg.push([1], [[1]])
    assert _reasons(late) == {0: "late"} and "already released" in late.rejected[0].detail
    tail = reg.drain()
    assert tail.first_index == 3 and np.array_equal(tail.released_LC.ravel(), [3, NAN, 5], equal_nan=True)
    assert reg.pending == 0 and reg.next_index == 6


@pytest.mark.parametrize("policy, kept, reason", [("reject", 1.0, "duplicate"), ("first", 1.0, "duplicate"),
                                                  ("last", 2.0, None)])
def test_duplicates_of_an_open_step_follow_the_policy(policy, kept, reason):
    reg = Regularizer(1, step=1, policy=RegularizerPolicy(tolerance=1, duplicates=policy))
    first = reg.push([0, 1], [[0], [1]])
    second = reg.push([1], [[2]])
    assert first.accepted == 2
    assert _reasons(second) == ({0: reason} if reason else {})
    assert second.accepted == (0 if reason else 1)
    assert reg.drain().released_LC.ravel().tolist() == [0, kept]  # tolerance 1: index 0 is open too
    # a duplicate of a released step is late whatever the policy
    assert _reasons(reg.push([1], [[3]])) == {0: "late"}


@pytest.mark.parametrize("policy", ["reject", "first", "last"])
def test_with_tolerance_0_a_repeat_in_one_push_is_late_as_if_pushed_alone(policy):
    batched = Regularizer(1, step=1, policy=RegularizerPolicy(duplicates=policy))
    alone = Regularizer(1, step=1, policy=RegularizerPolicy(duplicates=policy))
    res = batched.push([0, 1, 1], [[0], [1], [2]])
    assert _reasons(res) == {2: "late"} and res.released_LC.ravel().tolist() == [0, 1]
    assert [_reasons(alone.push([t], [[v]])) for t, v in [(0, 0), (1, 1), (1, 2)]] == [{}, {}, {0: "late"}]
    assert _same_state(batched, alone)


def test_duplicates_last_takes_the_last_of_a_push_and_counts_every_row():
    reg = Regularizer(1, step=1, policy=RegularizerPolicy(tolerance=3, duplicates="last"))
    res = reg.push([0, 1, 1, 1], [[0], [1], [2], [3]])
    assert res.accepted == 4 and res.rejected == []
    assert reg.drain().released_LC.ravel().tolist() == [0, 3]


# --- what gets rejected ---------------------------------------------------------------------------

@pytest.mark.parametrize("timestamp, row, reason, named", [
    (2.5, [1.0, 2.0], "bad_timestamp", "2.5"),
    (NAN, [1.0, 2.0], "bad_timestamp", "nan"),
    (None, [1.0, 2.0], "bad_timestamp", "None"),
    ("7", [1.0, 2.0], "bad_timestamp", "'7'"),
    (7, [1.0], "wrong_width", "1 values, expected 2"),
    (7, [1.0, 2.0, 3.0], "wrong_width", "3 values, expected 2"),
    (7, 5.0, "wrong_width", "float"),
    (7, [1.0, float("inf")], "not_finite", "inf"),
    (7, [-float("inf"), 1.0], "not_finite", "-inf"),
    (7, [1e39, 1.0], "not_finite", "overflows float32"),
    (7, [1.0, "x"], "not_finite", "'x'"),
    (7, [1.0, None], "not_finite", "None"),
    (7, [NAN, NAN], "empty_row", "NaN"),
    (9, [1.0, 2.0], "off_grid", "remainder 1"),
    (4, [1.0, 2.0], "late", "already released"),
    (6, [1.0, 2.0], "late", "already released"),
], ids=lambda v: repr(v)[:20])
def test_each_rejection_has_its_reason_a_detail_naming_the_value_and_changes_no_state(timestamp, row, reason, named):
    reg = Regularizer(2, step=2)
    reg.push([4, 6], [[0.0, 0.0], [1.0, 1.0]])
    before = reg.state_dict()
    good = [[9.0, 9.0]]
    res = reg.push([timestamp, 10], [row] + good)  # the good row proves the batch was still read
    assert res.accepted == 1 and len(res.rejected) == 1
    rej = res.rejected[0]
    assert isinstance(rej, Rejection) and rej.index == 0 and rej.reason == reason
    assert named in rej.detail, rej.detail
    assert rej.timestamp == (None if reason == "bad_timestamp" else timestamp)
    if isinstance(row, list):  # the same row alone changes nothing at all
        again = Regularizer.from_state_dict(before)
        assert _reasons(again.push([timestamp], [row])) == {0: reason}
        assert _same_state(again, Regularizer.from_state_dict(before))


@pytest.mark.parametrize("timestamps, values, message", [
    ([1, 2], [[1.0, 2.0]], "2 timestamps but 1 rows"),
    ([1, 2], [1.0, 2.0], "must be 2-D"),
    ([1], np.ones((1, 2, 1)), "must be 2-D"),
    ([[1], [2]], [[1.0, 2.0], [1.0, 2.0]], "timestamps must be 1-D"),
    (5, [[1.0, 2.0]], "timestamps must be 1-D"),
    ([True], [[1.0, 2.0]], "integers or datetime64"),
    (np.array(["2024-01-01"], dtype="datetime64[ns]"), [[1.0, 2.0]], "integer timestamps"),
    ([1], 3.0, "must be 2-D"),
])
def test_a_malformed_batch_raises_before_changing_anything(timestamps, values, message):
    reg = Regularizer(2, step=1, policy=RegularizerPolicy(tolerance=2))
    reg.push([0, 1], [[0.0, 0.0], [1.0, 1.0]])
    before = Regularizer.from_state_dict(reg.state_dict())
    with pytest.raises(ValueError, match=message):
        reg.push(timestamps, values)
    assert _same_state(reg, before)


def test_a_whole_array_of_the_wrong_width_is_rejected_row_by_row():
    reg = Regularizer(3, step=1)
    res = reg.push(np.arange(4), np.ones((4, 2)))
    assert res.accepted == 0 and [r.reason for r in res.rejected] == ["wrong_width"] * 4
    assert reg.newest_index is None and reg.origin is None


def test_ragged_and_mixed_lists_are_sorted_out_row_by_row():
    reg = Regularizer(2, step=1)
    res = reg.push([0, 1, 2, 3], [[1, 2], [3], (4, 5), np.array([6.0, 7.0])])
    assert _reasons(res) == {1: "wrong_width"}
    assert np.array_equal(res.released_LC, [[1, 2], [NAN, NAN], [4, 5], [6, 7]], equal_nan=True)


def test_an_empty_push_is_a_no_op():
    reg = Regularizer(2, step=1)
    for ts, vals in [([], []), (np.zeros(0, np.int64), np.zeros((0, 2)))]:
        res = reg.push(ts, vals)
        assert res.accepted == 0 and res.rejected == [] and res.released_LC.shape == (0, 2)
    assert reg.newest_index is None


def test_advance_releases_the_grid_up_to_a_heartbeat():
    reg = Regularizer(1, step=1, policy=RegularizerPolicy(tolerance=3))
    reg.push([0, 1], [[0], [1]])
    res = reg.advance(4)
    assert res.first_index == 0 and np.array_equal(res.released_LC.ravel(), [0, 1, NAN, NAN, NAN], equal_nan=True)
    assert reg.next_index == 5 and reg.pending == 0
    assert _reasons(reg.push([3], [[3]])) == {0: "late"}
    assert reg.advance(2).released_LC.shape == (0, 1)
    with pytest.raises(ValueError, match="off the grid"):
        Regularizer(1, step=2, origin=0).advance(3)
    with pytest.raises(ValueError, match="not known yet"):
        Regularizer(1).advance(3)


def test_advance_before_any_row_starts_the_stream_after_it_without_releasing_gaps():
    reg = Regularizer(1, step=60, origin=0)
    res = reg.advance(1_700_000_040)
    assert res.released_LC.shape == (0, 1) and reg.next_index == 1_700_000_040 // 60 + 1
    assert _reasons(reg.push([1_700_000_040], [[1]])) == {0: "late"}
    assert reg.push([1_700_000_100], [[2]]).released_LC.tolist() == [[2]]


# --- step inference, datetimes --------------------------------------------------------------------

def test_an_inferred_step_holds_rows_until_a_second_timestamp_then_is_the_smallest_difference():
    reg = Regularizer(1, policy=RegularizerPolicy(duplicates="last"))
    res = reg.push([100], [[1]])
    assert res.accepted == 1 and res.released_LC.shape == (0, 1) and reg.step is None and reg.pending == 1
    assert reg.push([100], [[2]]).accepted == 1  # still open: the policy applies
    res = reg.push([130, 110, 90], [[4], [3], [0]])
    assert reg.step == 10 and reg.origin == 100
    assert _reasons(res) == {2: "late"} and "before the origin" in res.rejected[0].detail
    assert np.array_equal(res.released_LC.ravel(), [2, 3, NAN, 4], equal_nan=True)
    assert _reasons(reg.push([145], [[5]])) == {0: "off_grid"}


def test_an_inferred_step_from_one_push_gives_what_the_given_step_gives():
    ts = [50, 20, 30, 60, 40, 30]
    vals = [[float(t)] for t in ts]
    inferred, given = Regularizer(1), Regularizer(1, step=10)
    a, b = inferred.push(ts, vals), given.push(ts, vals)
    assert inferred.step == 10 and inferred.origin == 20
    assert a.released_LC.tobytes() == b.released_LC.tobytes() and a.rejected == b.rejected


def test_origin_without_step_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="needs an explicit step"):
        Regularizer(1, origin=5)
    with pytest.raises(ValueError, match="step must be"):
        Regularizer(1, step=0)
    with pytest.raises(ValueError, match="channels"):
        Regularizer(0, step=1)
    with pytest.raises(ValueError, match="tolerance"):
        RegularizerPolicy(tolerance=-1)
    with pytest.raises(ValueError, match="duplicates"):
        RegularizerPolicy(duplicates="mean")


def test_datetime64_stamps_become_nanoseconds_on_a_nanosecond_grid():
    start = np.datetime64("2024-01-01T00:00:00")
    ts = start + np.array([0, 5, 15], dtype="timedelta64[m]")
    reg = Regularizer(1, step=np.timedelta64(5, "m"))
    res = reg.push(ts, [[1], [2], [4]])
    assert reg.step == 300 * 10**9 and reg.origin == start.astype("datetime64[ns]").astype(np.int64)
    assert np.array_equal(res.released_LC.ravel(), [1, 2, NAN, 4], equal_nan=True)
    assert np.datetime64(reg.timestamp_of(3), "ns") == ts[2]
    assert _reasons(reg.push(np.array(["NaT"], dtype="datetime64[s]"), [[1]])) == {0: "bad_timestamp"}
    with pytest.raises(ValueError, match="datetime64 timestamps"):
        reg.push([20], [[1]])


def test_an_inferred_step_on_datetimes_is_in_nanoseconds():
    ts = np.array(["2024-01-01T00:00", "2024-01-01T01:00"], dtype="datetime64[s]")
    reg = Regularizer(1)
    reg.push(ts, [[1], [2]])
    assert reg.step == 3600 * 10**9


# --- snapshots ------------------------------------------------------------------------------------

def test_state_dict_is_json_metadata_plus_arrays_and_restore_validates():
    reg = Regularizer(2, step=1, policy=RegularizerPolicy(tolerance=3))
    reg.push([0, 2], [[1, 2], [3, 4]])
    d = reg.state_dict()
    meta = {k: v for k, v in d.items() if not isinstance(v, np.ndarray)}
    assert json.loads(json.dumps(meta)) == meta
    assert d["pending_LC"].shape == (3, 2) and d["observed_L"].tolist() == [True, False, True]
    bad = dict(d, pending_LC=d["pending_LC"][:1])
    with pytest.raises(ValueError, match="do not match"):
        Regularizer.from_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        Regularizer.from_state_dict({k: v for k, v in d.items() if k != "origin"})
    with pytest.raises(ValueError, match="version"):
        Regularizer.from_state_dict(dict(d, version=99))


def test_snapshot_arrays_do_not_alias_the_live_state():
    reg = Regularizer(1, step=1, policy=RegularizerPolicy(tolerance=2, duplicates="last"))
    reg.push([0, 1], [[0], [1]])
    d = reg.state_dict()
    frozen = copy.deepcopy(d)
    reg.push([1, 2], [[5], [6]])
    assert d["pending_LC"].tobytes() == frozen["pending_LC"].tobytes()


# --- the randomized stream against an independent reference ---------------------------------------

def _random_stream(rng: np.random.Generator, channels: int, step: int, t0: int) -> list[tuple[object, object]]:
    """(timestamp, row) in arrival order: gaps, duplicates, displaced (late or out of order) rows
    and junk of every kind."""
    rows: list[tuple[object, object]] = []
    for k in range(int(rng.integers(20, 120))):
        if rng.random() < 0.2:
            continue
        for _ in range(1 + (rng.random() < 0.1)):
            vals = rng.normal(size=channels).round(2).tolist()
            vals = [NAN if rng.random() < 0.2 else v for v in vals]
            rows.append((t0 + k * step, vals))
        if rng.random() < 0.12:
            t = t0 + k * step
            junk = [(t + 0.5, [1.0] * channels), (NAN, [1.0] * channels), (None, [1.0] * channels),
                    (t, [1.0] * (channels + 1)), (t, [1.0] * (channels - 1)),
                    (t, [float("inf")] + [0.0] * (channels - 1)),
                    (t, ["x"] * channels), (t, [NAN] * channels), (t, [1e39] * channels)]
            if step > 1:
                junk.append((t + 1, [2.0] * channels))
            rows.append(junk[int(rng.integers(len(junk)))])
    for _ in range(len(rows) // 8):  # displace some rows later in arrival order
        i = int(rng.integers(len(rows)))
        j = min(len(rows) - 1, i + int(rng.integers(1, 12)))
        rows.insert(j, rows.pop(i))
    return rows


def _split(rng: np.random.Generator, rows: list) -> list[list]:
    out, i = [], 0
    while i < len(rows):
        n = int(rng.choice([1, 1, 2, 3, 5, 8, 20]))
        out.append(rows[i:i + n])
        i += n
    return out


def _as_batch(rng: np.random.Generator, batch: list, channels: int) -> tuple[object, object]:
    """The batch as lists, or as numpy arrays when every row can be one (both input paths)."""
    ts = [t for t, _ in batch]
    vals = [v for _, v in batch]
    clean = all(isinstance(v, list) and len(v) == channels and all(isinstance(x, float) for x in v) for v in vals)
    if clean and rng.random() < 0.5:
        ints = all(isinstance(t, int) for t in ts)
        return (np.asarray(ts, dtype=np.int64 if ints else np.float64), np.asarray(vals, dtype=np.float64))
    return ts, vals


class Reference:
    """Row-at-a-time restatement of the documented rules, in plain Python (a given step)."""

    def __init__(self, channels: int, step: int, tolerance: int, duplicates: str):
        self.c, self.step, self.tol, self.dup = channels, step, tolerance, duplicates
        self.origin = self.next = self.newest = None
        self.open: dict[int, list[float]] = {}
        self.released: list[tuple[int, list[float] | None]] = []

    def _content(self, t, row) -> str | None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t != int(t):
            return "bad_timestamp"
        if not isinstance(row, (list, tuple)) or len(row) != self.c:
            return "wrong_width"
        if not all(isinstance(v, (int, float)) and not math.isinf(v) and abs(v) < 3.4e38 or
                   isinstance(v, float) and math.isnan(v) for v in row):
            return "not_finite"
        if all(math.isnan(v) for v in row):
            return "empty_row"
        return None

    def push(self, batch: list) -> tuple[int, dict[int, str]]:
        reasons = {i: r for i, (t, row) in enumerate(batch) if (r := self._content(t, row))}
        good = sorted((i for i in range(len(batch)) if i not in reasons), key=lambda i: int(batch[i][0]))
        if self.origin is None and good:
            self.origin = int(batch[good[0]][0])
        accepted = 0
        for i in good:
            t, row = int(batch[i][0]), batch[i][1]
            if (t - self.origin) % self.step:
                reasons[i] = "off_grid"
                continue
            k = (t - self.origin) // self.step
            if self.next is None:
                self.next, self.newest = k, k - 1
            if k < self.next:
                reasons[i] = "late"
                continue
            if k in self.open and self.dup != "last":
                reasons[i] = "duplicate"
                continue
            self.open[k] = [float(np.float32(v)) for v in row]
            self.newest = max(self.newest, k)
            accepted += 1
            self._release(self.newest + 1 if self.tol == 0 else self.newest - self.tol)
        return accepted, reasons

    def _release(self, upto: int) -> None:
        while self.next < upto:
            self.released.append((self.next, self.open.pop(self.next, None)))
            self.next += 1

    def drain(self) -> None:
        if self.next is not None:
            self._release(self.newest + 1)


def _grid(parts: list[PushResult], channels: int) -> tuple[int, np.ndarray]:
    """Concatenate released blocks, checking that each starts where the previous one ended."""
    parts = [p for p in parts if len(p.released_LC)]
    if not parts:
        return 0, np.zeros((0, channels), np.float32)
    for a, b in zip(parts, parts[1:]):
        assert b.first_index == a.first_index + len(a.released_LC)
    return parts[0].first_index, np.concatenate([p.released_LC for p in parts])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), channels=st.integers(1, 3), step=st.sampled_from([1, 3, 10]),
       tolerance=st.sampled_from([0, 0, 1, 2, 5]), duplicates=st.sampled_from(["reject", "first", "last"]))
def test_random_streams_match_the_reference_and_survive_a_snapshot(seed, channels, step, tolerance, duplicates):
    rng = np.random.default_rng(seed)
    batches = _split(rng, _random_stream(rng, channels, step, t0=int(rng.integers(-1000, 1000))))
    policy = RegularizerPolicy(tolerance=tolerance, duplicates=duplicates)
    reg, ref = Regularizer(channels, step=step, policy=policy), Reference(channels, step, tolerance, duplicates)
    cut = int(rng.integers(len(batches) + 1))
    results, restored_results, restored = [], [], None
    accepted_rows: list[tuple[int, list[float]]] = []
    for b, batch in enumerate(batches):
        if b == cut:
            d = reg.state_dict()
            meta = json.loads(json.dumps({k: v for k, v in d.items() if not isinstance(v, np.ndarray)}))
            restored = Regularizer.from_state_dict({**meta, "pending_LC": d["pending_LC"].copy(),
                                                    "observed_L": d["observed_L"].copy()})
        ts, vals = _as_batch(rng, batch, channels)
        res = reg.push(ts, vals)
        ref_accepted, ref_reasons = ref.push(batch)
        assert res.accepted + len(res.rejected) == len(batch)
        assert all(r.reason in REASONS and r.detail for r in res.rejected)
        assert _reasons(res) == ref_reasons and res.accepted == ref_accepted
        accepted_rows += [(batch[i][0], batch[i][1]) for i in range(len(batch)) if i not in ref_reasons]
        results.append(res)
        if restored is not None:
            restored_results.append(restored.push(ts, vals))
    if restored is None:  # the cut fell after the last push
        restored = Regularizer.from_state_dict(reg.state_dict())
    results.append(reg.drain())
    ref.drain()
    restored_results.append(restored.drain())

    first, grid_LC = _grid(results, channels)
    expected = np.array([row if row is not None else [NAN] * channels for _, row in ref.released],
                        dtype=np.float32).reshape(-1, channels)
    assert grid_LC.tobytes() == expected.tobytes()
    assert (first if len(grid_LC) else None) == (ref.released[0][0] if ref.released else None)

    # Every accepted row appears once at its grid index (under "last": the last one for an index).
    by_index: dict[int, list[list[float]]] = {}
    for t, row in accepted_rows:
        by_index.setdefault((int(t) - reg.origin) // step, []).append(row)
    for k, rows in by_index.items():
        assert duplicates == "last" or len(rows) == 1
        assert np.array_equal(grid_LC[k - first], np.array(rows[-1], dtype=np.float32), equal_nan=True)
    assert set(np.flatnonzero(~np.isnan(grid_LC).all(axis=1)) + first) == set(by_index)

    # A restore mid-stream continues exactly as the uninterrupted run did.
    tail = results[cut:]
    assert len(tail) == len(restored_results)
    for a, b in zip(tail, restored_results):
        assert (a.accepted, a.rejected, a.first_index) == (b.accepted, b.rejected, b.first_index)
        assert a.released_LC.tobytes() == b.released_LC.tobytes()


@pytest.mark.parametrize("tolerance", [0, 2])
def test_pushing_in_order_rows_one_at_a_time_equals_one_push(tolerance):
    """The scalar fast path for single rows must agree with the vectorized path."""
    rng = np.random.default_rng(tolerance)
    policy = RegularizerPolicy(tolerance=tolerance, duplicates="last")
    ts = np.sort(rng.choice(400, size=250, replace=True))
    vals = rng.normal(size=(250, 3)).astype(np.float32)
    vals[rng.random((250, 3)) < 0.3] = np.nan
    one, many = Regularizer(3, step=1, policy=policy), Regularizer(3, step=1, policy=policy)
    parts_many = [many.push(ts, vals), many.drain()]
    parts_one = [one.push([int(t)], v[None]) for t, v in zip(ts, vals)] + [one.drain()]
    assert sum(p.accepted for p in parts_one) == sum(p.accepted for p in parts_many)
    reasons = [sorted(r.reason for p in parts for r in p.rejected) for parts in (parts_one, parts_many)]
    assert reasons[0] == reasons[1]
    a, b = _grid(parts_one, 3), _grid(parts_many, 3)
    assert a[0] == b[0] and a[1].tobytes() == b[1].tobytes()


# --- large and tiny pushes (their timings are in benchmarks/streams.py, not here) -------------------

def test_a_million_in_order_rows_are_placed_in_one_push():
    ts = np.arange(1_000_000, dtype=np.int64) * 5
    vals = np.random.default_rng(0).normal(size=(1_000_000, 4))
    reg = Regularizer(4, step=5, policy=RegularizerPolicy(tolerance=4))
    res = reg.push(ts, vals)
    assert res.accepted == 1_000_000 and len(res.released_LC) == 1_000_000 - 5  # 4 behind the newest, and the newest
    np.testing.assert_array_equal(res.released_LC, vals[: len(res.released_LC)].astype(np.float32))


@pytest.mark.parametrize("tolerance", [0, 3])
def test_one_row_pushes_release_in_order(tolerance):
    reg = Regularizer(4, step=1, policy=RegularizerPolicy(tolerance=tolerance))
    row = [[1.0, 2.0, NAN, 4.0]]
    reg.push([0], row)
    for t in range(1, 10_001):
        reg.push([t], row)
    assert reg.next_index == (10_001 if tolerance == 0 else 10_000 - tolerance)
