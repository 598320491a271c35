"""Sources are the engine's only way in for recorded data, so each must deliver every row once, in
order per series, with int64 timestamps and float32 values, read files in bounded memory, and
refuse what it cannot convert with a message that names the problem.

Legend: n rows in a batch, L rows of a series, C channels.
"""

import datetime as dt
import json
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from oryx_ts.datasets.readers import DataError
from oryx_ts.streams.sources import Observations, from_arrays, from_file, from_iterator, interleave


def _collect(batches) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Concatenate batches per series, checking types on the way."""
    parts: dict[str, list[Observations]] = {}
    for obs in batches:
        assert isinstance(obs, Observations)
        assert obs.timestamps.dtype == np.int64 and obs.values.dtype == np.float32
        parts.setdefault(obs.series_id, []).append(obs)
    return {sid: (np.concatenate([o.timestamps for o in ps]), np.concatenate([o.values for o in ps]))
            for sid, ps in parts.items()}


# --- arrays ---------------------------------------------------------------------------------------

def test_from_arrays_chunks_one_series_and_numbers_its_rows():
    values = np.arange(14, dtype=np.float64).reshape(7, 2)
    batches = list(from_arrays(values, series_id="s", start=100, step=10, chunk=3))
    assert [len(b) for b in batches] == [3, 3, 1] and {b.series_id for b in batches} == {"s"}
    ts, vals = _collect(batches)["s"]
    assert ts.tolist() == list(range(100, 170, 10)) and np.array_equal(vals, values.astype(np.float32))
    assert len(list(from_arrays(values))) == 1


def test_from_arrays_takes_datetime_start_and_step_or_given_timestamps_as_ns():
    start = np.datetime64("2024-01-01T00:00:00")
    (obs,) = from_arrays(np.ones((3, 1)), start=start, step=np.timedelta64(1, "m"))
    base = start.astype("datetime64[ns]").astype(np.int64)
    assert obs.timestamps.tolist() == [base, base + 60 * 10**9, base + 120 * 10**9]
    given = start + np.array([0, 7, 9], dtype="timedelta64[s]")
    (obs,) = from_arrays(np.ones((3, 1)), timestamps=given)
    assert obs.timestamps.tolist() == given.astype("datetime64[ns]").astype(np.int64).tolist()


def test_from_arrays_random_order_is_seeded_and_keeps_each_series_in_order():
    table = {f"s{k}": np.arange(10 * (k + 1), dtype=np.float32).reshape(-1, 1) for k in range(5)}
    runs = [[(o.series_id, int(o.timestamps[0])) for o in from_arrays(table, chunk=4, order="random", seed=s)]
            for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    sequential = [(o.series_id, int(o.timestamps[0])) for o in from_arrays(table, chunk=4)]
    assert sorted(runs[0]) == sorted(sequential) and runs[0] != sequential
    for sid in table:
        starts = [t for s, t in runs[0] if s == sid]
        assert starts == sorted(starts)
    got = _collect(from_arrays(table, chunk=4, order="random", seed=3))
    assert all(np.array_equal(got[sid][1], table[sid]) for sid in table)


def test_interleave_exhausts_every_source_in_its_own_order():
    sources = [from_arrays(np.zeros((n, 1)), series_id=str(n), chunk=1) for n in (1, 5, 9)]
    out = [(o.series_id, int(o.timestamps[0])) for o in interleave(sources, seed=7)]
    assert len(out) == 15
    for sid in ("1", "5", "9"):
        assert [t for s, t in out if s == sid] == list(range(int(sid)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(values=np.ones(5)), "numeric \\(L, C\\)"),
    (dict(values=np.ones((5, 1)), chunk=0), "chunk must be"),
    (dict(values=np.ones((5, 1)), timestamps=np.arange(4)), "4 timestamps for 5 rows"),
    (dict(values=np.ones((5, 1)), timestamps=np.arange(5) + 0.5), "not an integer"),
    (dict(values=np.ones((5, 1)), order="shuffled"), "order must be"),
    (dict(values=np.ones((5, 1)), step=0), "step must be positive"),
    (dict(values={"a": np.ones((2, 1))}, timestamps={"b": np.arange(2)}), "unknown series \\['b'\\]"),
    (dict(values={"a": np.ones((2, 1))}, timestamps=np.arange(2)), "must be a mapping"),
])
def test_from_arrays_refuses_what_does_not_fit_before_yielding(kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_arrays(**kwargs)


# --- iterators ------------------------------------------------------------------------------------

def test_from_iterator_converts_and_passes_non_finite_values_to_the_regularizer():
    items = [("a", [1, 2], [[1.0, np.inf], [np.nan, 2.0]]),
             ("b", np.array(["2024-01-01T00:00"], dtype="datetime64[m]"), np.array([[3]], dtype=np.int16)),
             ("a", np.array([3.0]), [[5.0, 6.0]])]
    out = list(from_iterator(iter(items)))
    assert [o.series_id for o in out] == ["a", "b", "a"]
    assert out[0].timestamps.tolist() == [1, 2] and np.isinf(out[0].values[0, 1]) and np.isnan(out[0].values[1, 0])
    assert out[1].timestamps[0] == np.datetime64("2024-01-01T00:00", "ns").astype(np.int64)
    assert out[2].timestamps.tolist() == [3] and out[2].values.dtype == np.float32


@pytest.mark.parametrize("item, message", [
    (["a", [1], [[1.0]]], "expected a \\(series_id, timestamps, values\\) tuple"),
    (("a", [1]), "expected a"),
    ((7, [1], [[1.0]]), "series_id must be a str"),
    (("a", [1, 2], [[1.0]]), "2 timestamps for 1 rows"),
    (("a", [1], [1.0]), "must be 2-D"),
    (("a", [1, 2], [[1.0], [1.0, 2.0]]), "not a rectangular"),
    (("a", [1.5], [[1.0]]), "not an integer"),
    (("a", ["x"], [[1.0]]), "integers or datetime64"),
    (("a", [1], [["x"]]), "must be numbers"),
])
def test_from_iterator_names_the_item_and_what_is_wrong(item, message):
    it = from_iterator([("ok", [0], [[0.0]]), item])
    assert next(it).series_id == "ok"
    with pytest.raises(ValueError, match=message) as err:
        next(it)
    assert "item 1" in str(err.value)


def test_observations_refuse_other_dtypes_and_shapes():
    with pytest.raises(ValueError, match="int64"):
        Observations("a", np.arange(2, dtype=np.int32), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="float32"):
        Observations("a", np.arange(2), np.zeros((3, 1), np.float32))


# --- files ----------------------------------------------------------------------------------------

def _frame(n: int, seed: int = 0, extra: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ts = np.datetime64("2024-01-01T00:00:00", "ns") + np.arange(n) * np.timedelta64(1, "s")
    return pl.DataFrame({"time": ts, "host": np.array(["h0", "h1", "h2"])[rng.integers(0, 3, n)],
                         "cpu": rng.normal(size=n).round(3), "mem": rng.normal(size=n).round(3),
                         **{f"c{k}": rng.normal(size=n) for k in range(extra)}})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_from_file_splits_by_series_in_blocks_and_gives_every_row_once(tmp_path, suffix):
    frame = _frame(1000)
    path = tmp_path / f"data{suffix}"
    frame.write_csv(path) if suffix == ".csv" else frame.write_parquet(path, row_group_size=128)
    batches = list(from_file(path, timestamp="time", series="host", chunk_rows=97))
    assert max(len(b) for b in batches) <= 97 and sum(len(b) for b in batches) == 1000
    got = _collect(batches)
    assert sorted(got) == ["h0", "h1", "h2"]
    for sid, (ts, vals) in got.items():
        part = frame.filter(pl.col("host") == sid)
        assert ts.tolist() == part["time"].cast(pl.Int64).to_list()  # ns since the epoch
        assert np.array_equal(vals, part.select("cpu", "mem").to_numpy().astype(np.float32))


def test_from_file_without_series_names_the_stream_after_the_file_and_selects_channels(tmp_path):
    path = tmp_path / "plant.csv"
    path.write_text("step,a,b,c\n0,1,2,3\n1,?,5,6\n2,7,,inf\n")
    (obs,) = from_file(path, timestamp="step", channels=["c", "a"])
    assert obs.series_id == "plant" and obs.timestamps.tolist() == [0, 1, 2]
    assert np.array_equal(obs.values, np.array([[3, 1], [6, np.nan], [np.inf, 7]], np.float32), equal_nan=True)
    (obs,) = from_file(path, timestamp="step")
    assert obs.values.shape == (3, 3)


def test_from_file_completes_quoted_fields_that_span_lines_across_blocks(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('t,name,v\n0,"a\nb",1\n1,"c",2\n2,"a\nb",3\n')
    batches = list(from_file(path, timestamp="t", series="name", chunk_rows=1))
    assert [(b.series_id, b.timestamps.tolist()) for b in batches] == [("a\nb", [0]), ("c", [1]), ("a\nb", [2])]


def test_from_file_parquet_dates_and_zoned_datetimes_become_utc_ns(tmp_path):
    frame = pl.DataFrame({
        "day": [dt.date(2024, 1, 1), dt.date(2024, 1, 2)],
        "zoned": pl.Series(np.array(["2024-01-01T12:00", "2024-01-01T13:00"], dtype="datetime64[us]"))
        .dt.replace_time_zone("Europe/Paris"),
        "v": [1.0, 2.0]})
    path = tmp_path / "z.parquet"
    frame.write_parquet(path)
    (obs,) = from_file(path, timestamp="day", channels=["v"])
    assert obs.timestamps.tolist() == [np.datetime64(d, "ns").astype(np.int64) for d in ("2024-01-01", "2024-01-02")]
    (obs,) = from_file(path, timestamp="zoned", channels=["v"])
    assert obs.timestamps[0] == np.datetime64("2024-01-01T11:00", "ns").astype(np.int64)  # 12:00 in Paris


def test_from_file_refuses_unknown_columns_and_suffixes_naming_what_exists(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("time,a\n0,1\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['x'\]; the file has \['time', 'a'\]"):
        from_file(path, timestamp="time", channels=["x"])
    with pytest.raises(ValueError, match=r"no column\(s\) \['host'\]"):
        from_file(path, timestamp="time", series="host")
    other = tmp_path / "d.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match=r"unknown suffix '.json'; expected one of .csv, .parquet"):
        from_file(other, timestamp="time")
    with pytest.raises(FileNotFoundError):
        from_file(tmp_path / "missing.parquet", timestamp="time")
    with pytest.raises(ValueError, match="chunk_rows"):
        from_file(path, timestamp="time", chunk_rows=0)


def test_from_file_names_the_block_and_column_of_a_bad_value(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("t,v\n" + "".join(f"{i},{i}\n" for i in range(5)) + "5,oops\n")
    it = from_file(path, timestamp="t", chunk_rows=4)
    assert len(next(it)) == 4
    with pytest.raises(DataError, match=r"data rows 5\.\.6\]: row 2, column 'v': 'oops' is not a number"):
        next(it)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from oryx_ts.streams.sources import from_file

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    small, big, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for obs in from_file(small, timestamp="time", series="host", chunk_rows=chunk):
        pass  # polars sets itself up (threads, buffers) on the first blocks: not part of the file's cost
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak, which importing oryx_ts (torch) set far higher
    start = status("VmRSS:")
    rows = biggest = 0
    for obs in from_file(big, timestamp="time", series="host", chunk_rows=chunk):
        rows += len(obs)
        biggest = max(biggest, len(obs))
    print(json.dumps({"rows": rows, "biggest": biggest, "growth": status("VmHWM:") - start}))
""")


@pytest.mark.slow
def test_from_file_memory_stays_far_below_the_file_size(tmp_path):
    """Peak RSS while reading a ~50 MB CSV or ~100 MB (decoded) Parquet file grows by a small
    fraction of the data's size; reading the whole file at once would grow it by about that size."""
    env = {"OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for suffix, rows, extra in ((".csv", 400_000, 4), (".parquet", 300_000, 40)):
        frame = _frame(rows, extra=extra)
        small, big = tmp_path / f"small{suffix}", tmp_path / f"big{suffix}"
        if suffix == ".csv":
            frame.head(3 * 4096).write_csv(small)
            frame.write_csv(big)
            size = big.stat().st_size
        else:
            frame.head(3 * 4096).write_parquet(small, row_group_size=8192)
            frame.write_parquet(big, row_group_size=8192)
            size = frame.estimated_size()
        del frame
        assert 45e6 < size < 150e6, size
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(small), str(big), "4096"],
                             capture_output=True, text=True, env=env, check=True, timeout=300)
        probe = json.loads(out.stdout)
        assert probe["rows"] == rows and probe["biggest"] <= 4096
        grew = f"{big.name}: peak RSS grew {probe['growth'] / 1e6:.1f} MB for {size / 1e6:.0f} MB of data"
        assert probe["growth"] < size / 5, grew
