"""Label windows and the stream container are the vocabulary every dataset source shares."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oryx_ts.datasets import LabelWindow, TelemetryStream, mask_from_windows, windows_from_mask


@given(st.lists(st.booleans(), min_size=1, max_size=200))
def test_mask_windows_round_trip(bits):
    mask = np.array(bits)
    windows = windows_from_mask(mask, "x")
    assert np.array_equal(mask_from_windows(windows, len(mask)), mask)
    assert all(a.end < b.start for a, b in zip(windows, windows[1:]))  # maximal runs never touch


def test_label_window_rejects_empty_and_negative():
    with pytest.raises(ValueError, match="start < end"):
        LabelWindow(5, 5, "spike")
    with pytest.raises(ValueError, match="start < end"):
        LabelWindow(-1, 3, "spike")


def test_slice_and_split_clip_labels_and_move_the_clock():
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    stream = TelemetryStream(values, [LabelWindow(2, 6, "a"), LabelWindow(8, 10, "b")],
                             start=np.datetime64("2024-01-01T00:00"), step=np.timedelta64(60, "s"))
    head, tail = stream.split(4)
    assert head.labels == [LabelWindow(2, 4, "a")]
    assert tail.labels == [LabelWindow(0, 2, "a"), LabelWindow(4, 6, "b")]
    assert tail.timestamps[0] == np.datetime64("2024-01-01T00:04")
    assert np.shares_memory(tail.values, values)
    assert stream.label_mask("b").sum() == 2 and stream.label_mask().sum() == 6
    with pytest.raises(ValueError, match="strictly inside"):
        stream.split(10)


def test_stream_validates_shapes_and_labels():
    with pytest.raises(ValueError, match=r"\(L, C\)"):
        TelemetryStream(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="ends after"):
        TelemetryStream(np.zeros((5, 1), dtype=np.float32), [LabelWindow(3, 6, "a")])
    with pytest.raises(ValueError, match="channel names"):
        TelemetryStream(np.zeros((5, 2), dtype=np.float32), channels=("a",))


def test_describe_counts_missing_and_coverage():
    values = np.ones((100, 2), dtype=np.float32)
    values[:10, 0] = np.nan
    stream = TelemetryStream(values, [LabelWindow(0, 25, "anomaly")], start=np.datetime64("2024-01-01"),
                             step=np.timedelta64(1, "h"))
    summary = stream.describe()
    assert summary["rows"] == 100 and summary["channels"] == 2
    assert summary["missing_share"] == pytest.approx(0.05)
    assert summary["label_coverage"] == {"anomaly": 0.25}
    assert summary["span"].startswith("2024-01-01T00:00:00 .. 2024-01-05T03:00:00")
