"""`make demo` is the first thing a newcomer runs: a shortened demo must go end to end and write its outputs."""

import numpy as np

from oryx_ts.cli import main
from oryx_ts.demo import demo_stream


def test_demo_stream_has_labelled_anomalies_that_stand_out():
    stream = demo_stream(8_000, 4, seed=5, n_anomalies=6)
    assert stream.values.shape == (8_000, 4)
    assert len(stream.anomalies) == 6
    inside = np.zeros(8_000, dtype=bool)
    for a, b in stream.anomalies:
        inside[a:b] = True
    # each window shifts at least one channel by several standard deviations of the noise
    diffs = np.abs(np.diff(np.nan_to_num(stream.values), axis=0)).max(1)
    jumps = {a for a, _ in stream.anomalies if diffs[a - 1] > 3 * np.median(diffs)}
    assert len(jumps) >= 4
    assert np.isnan(stream.values).any()


def test_short_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "10", "--length", "8000", "--quiet"]) == 0
    out = capsys.readouterr().out
    for row in ("oryx 1-in-4", "all-recurrent", "all-attention", "seasonal naive"):
        assert row in out
    assert (tmp_path / "forecast.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "model.safetensors").is_file()
