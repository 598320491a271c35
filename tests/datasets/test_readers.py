"""Users bring CSV and Parquet: good files must land on a fixed grid with labels, bad ones must be
refused with the row and column that is wrong."""

import numpy as np
import polars as pl
import pytest

from oryx_ts.datasets import DataError, LabelWindow, read


def _csv(tmp_path, text: str, name: str = "data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_gaps_become_nan_rows_and_labels_become_windows(tmp_path):
    path = _csv(tmp_path, "\n".join([
        "timestamp,a,b,anomaly,event",
        "2024-01-01 00:00:00,1.0,10,0,",
        "2024-01-01 00:05:00,2.0,?,1,",
        "2024-01-01 00:10:00,3.0,12,1,maintenance",
        # 00:15 is absent from the file
        "2024-01-01 00:20:00,5.0,14,0,maintenance",
        "2024-01-01 00:25:00,,15,0,",
    ]))
    stream = read(path, labels=["anomaly", "event"])
    assert stream.channels == ("a", "b") and len(stream) == 6
    assert stream.step == np.timedelta64(300, "s") and stream.start == np.datetime64("2024-01-01T00:00:00")
    expected = np.array([[1, 10], [2, np.nan], [3, 12], [np.nan, np.nan], [5, 14], [np.nan, 15]], dtype=np.float32)
    assert np.array_equal(stream.values, expected, equal_nan=True)
    assert stream.labels == [LabelWindow(1, 3, "anomaly"), LabelWindow(2, 3, "maintenance"),
                             LabelWindow(4, 5, "maintenance")]


def test_parquet_with_datetime_column_and_channel_selection(tmp_path):
    ts = (np.datetime64("2024-03-01T00:00") + np.arange(10) * np.timedelta64(1, "h")).astype("datetime64[us]")
    frame = pl.DataFrame({"time": ts, "x": np.arange(10.0), "y": np.arange(10) * 2, "junk": ["s"] * 10})
    frame.write_parquet(tmp_path / "d.parquet")
    stream = read(tmp_path / "d.parquet", channels=["x", "y"])
    assert stream.channels == ("x", "y") and stream.step == np.timedelta64(3600, "s")
    assert np.array_equal(stream.values[:, 1], np.arange(10) * 2)


def test_resampling_to_a_coarser_step_averages(tmp_path):
    lines = ["timestamp,v"] + [f"2024-01-01 00:{m:02d}:00,{m}" for m in range(0, 20, 5)]
    stream = read(_csv(tmp_path, "\n".join(lines)), step="10min")
    assert np.array_equal(stream.values[:, 0], [2.5, 12.5])


def test_integer_index_and_no_timestamp(tmp_path):
    stream = read(_csv(tmp_path, "timestamp,v\n0,1\n1,2\n3,4\n"))
    assert stream.start is None and stream.timestamps is None
    assert np.array_equal(stream.values[:, 0], [1, 2, np.nan, 4], equal_nan=True)
    plain = read(_csv(tmp_path, "v,w\n1,2\n3,4\n", "plain.csv"))
    assert len(plain) == 2 and plain.channels == ("v", "w")


def test_non_numeric_value_names_row_and_column(tmp_path):
    path = _csv(tmp_path, "timestamp,a,b\n2024-01-01 00:00,1,2\n2024-01-01 00:01,1,2\n2024-01-01 00:02,3,abc\n")
    with pytest.raises(DataError, match=r"row 3, column 'b': 'abc' is not a number"):
        read(path)


def test_backwards_timestamps_name_the_row(tmp_path):
    path = _csv(tmp_path, "timestamp,a\n2024-01-01 00:00,1\n2024-01-01 00:02,1\n2024-01-01 00:01,3\n")
    with pytest.raises(DataError, match=r"row 3, column 'timestamp': timestamps go backwards"):
        read(path)


def test_duplicates_are_refused_or_merged_by_policy(tmp_path):
    path = _csv(tmp_path, "timestamp,a\n2024-01-01 00:00,1\n2024-01-01 00:01,2\n2024-01-01 00:01,4\n")
    with pytest.raises(DataError, match=r"row 3, column 'timestamp': duplicate timestamp .*--duplicates first\|last\|mean"):
        read(path)
    assert np.array_equal(read(path, duplicates="mean").values[:, 0], [1, 3])
    assert np.array_equal(read(path, duplicates="first").values[:, 0], [1, 2])
    assert np.array_equal(read(path, duplicates="last").values[:, 0], [1, 4])


def test_unparseable_and_missing_timestamps(tmp_path):
    bad = _csv(tmp_path, "timestamp,a\n2024-01-01 00:00,1\nyesterday,2\n")
    with pytest.raises(DataError, match="timestamp"):
        read(bad)
    fmt = _csv(tmp_path, "timestamp,a\n01/01/2024 00:00,1\n01/01/2024 00:01,2\n02/31/2024 00:02,3\n", "fmt.csv")
    with pytest.raises(DataError, match=r"row 3, column 'timestamp': '02/31/2024 00:02' is not a timestamp"):
        read(fmt, time_format="%m/%d/%Y %H:%M")
    hole = _csv(tmp_path, "timestamp,a\n2024-01-01 00:00,1\n,2\n", "hole.csv")
    with pytest.raises(DataError, match=r"row 2, column 'timestamp': missing timestamp"):
        read(hole)


def test_missing_columns_formats_and_files(tmp_path):
    path = _csv(tmp_path, "timestamp,a\n2024-01-01 00:00,1\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['zz'\]"):
        read(path, channels=["zz"])
    with pytest.raises(DataError, match="unknown format"):
        read(_csv(tmp_path, "x", "data.xlsx"))
    with pytest.raises(DataError, match="not a readable Parquet"):
        read(_csv(tmp_path, "not parquet", "broken.parquet"))
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="no data rows"):
        read(_csv(tmp_path, "timestamp,a\n", "empty.csv"))


def test_the_format_follows_the_suffix(tmp_path):
    tsv = _csv(tmp_path, "timestamp\ta\n2024-01-01 00:00\t1\n2024-01-01 00:01\t2\n", "data.tsv")
    assert np.array_equal(read(tsv).values[:, 0], [1, 2])
    for name in ("data.csv.bak", "data", "data.json"):
        with pytest.raises(DataError, match="unknown format"):
            read(_csv(tmp_path, "timestamp,a\n2024-01-01 00:00,1\n", name))
    parquet_named_csv = tmp_path / "really_parquet.csv"
    pl.DataFrame({"a": [1.0, 2.0]}).write_parquet(parquet_named_csv)
    with pytest.raises(DataError):
        read(parquet_named_csv)
