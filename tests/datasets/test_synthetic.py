"""The synthetic generator is our ground truth for rare regimes: it must be reproducible, chunk-invariant,
label exactly what it injects, and stream 10M steps in bounded memory."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from oryx_ts.datasets import ANOMALY_KINDS, SyntheticConfig, generate, iter_chunks, read, to_parquet
from oryx_ts.datasets.recall import recall_stream

SHORT = dict(length=40_000, channels=8)


def _only(kind: str, rate: float, **extra) -> SyntheticConfig:
    """Config with one regime kind at `rate` and no missing values, so diffs are exact."""
    base = SyntheticConfig(missing_rate=0.0, **extra).without_regimes()
    return dataclasses.replace(base, **{f"{kind}_rate": rate})


def _pair(kind: str, rate: float, seed: int = 7):
    stream = generate(**SHORT, seed=seed, config=_only(kind, rate))
    base = generate(**SHORT, seed=seed, config=_only(kind, 0.0))
    dz = (stream.values - base.values) / stream.channel_scale  # injected effect in normalized units
    return stream, base, dz


def test_deterministic_by_seed():
    a = generate(5000, 4, seed=3)
    b = generate(5000, 4, seed=3)
    c = generate(5000, 4, seed=4)
    assert np.array_equal(a.values, b.values, equal_nan=True) and a.labels == b.labels
    assert not np.array_equal(a.values, c.values, equal_nan=True)


def test_chunking_never_changes_values():
    whole = generate(150_000, 3, seed=1, chunk=1 << 20)
    small = generate(150_000, 3, seed=1, chunk=9_999)
    labels, chunks = iter_chunks(150_000, 3, seed=1, chunk=70_001)
    joined = np.concatenate([values for _, values in chunks])
    assert np.array_equal(whole.values, small.values, equal_nan=True)
    assert np.array_equal(whole.values, joined, equal_nan=True)
    assert labels == whole.labels


def test_parquet_round_trip_keeps_values_labels_and_clock(tmp_path):
    path = to_parquet(tmp_path / "s.parquet", 30_000, 3, seed=5, chunk=4_096)
    back = read(path)
    ref = generate(30_000, 3, seed=5)
    assert np.array_equal(back.values, ref.values, equal_nan=True)
    assert back.labels == ref.labels and back.start == ref.start and back.step == ref.step
    assert back.meta["seed"] == 5 and SyntheticConfig.from_dict(back.meta["config"]) == ref.config


def test_default_stream_has_seasonality_gaps_and_every_kind():
    stream = generate(200_000, 8, seed=0)
    assert set(stream.kinds) == set(ANOMALY_KINDS) | {"regime_switch", "recurring_first", "recurring_repeat"}
    missing = np.isnan(stream.values)
    assert 0.001 < missing.mean() < 0.02 and missing.all(axis=1).any()  # whole-row outages exist
    x = np.nan_to_num(stream.values[:, 0] - np.nanmean(stream.values[:, 0]))
    day = stream.config.steps_per_day
    corr = lambda lag: np.corrcoef(x[:-lag], x[lag:])[0, 1]  # noqa: E731
    assert corr(day) > 0.5 and corr(day) > corr(day // 2) + 0.3
    groups = np.corrcoef(np.nan_to_num(stream.values).T)
    assert groups[0, 1] > groups[0, 7]  # channels 0-3 share a group, 4-7 another


def test_nothing_is_injected_outside_label_windows():
    config = SyntheticConfig(missing_rate=0.0)
    stream = generate(**SHORT, seed=2, config=config)
    base = generate(**SHORT, seed=2, config=config.without_regimes())
    outside = ~stream.label_mask()
    assert np.array_equal(stream.values[outside], base.values[outside])
    assert not np.array_equal(stream.values[~outside], base.values[~outside])


@pytest.mark.parametrize("kind,rate", [("spike", 0.003), ("level_shift", 0.05), ("variance_burst", 0.05),
                                       ("fault", 0.05), ("drift", 0.08), ("regime_switch", 0.08)])
def test_each_kind_changes_data_only_inside_its_windows(kind, rate):
    stream, _, dz = _pair(kind, rate)
    windows = [w for w in stream.labels if w.kind == kind]
    assert len(windows) >= 3 and {w.kind for w in stream.labels} == {kind}
    assert np.all(dz[~stream.label_mask(kind)] == 0)
    assert all(np.any(dz[w.start : w.end] != 0) for w in windows)


def test_spike_signature():
    stream, _, dz = _pair("spike", 0.003)
    for w in stream.labels:
        assert len(w) <= 3
        touched = np.flatnonzero(np.any(dz[w.start : w.end] != 0, axis=0))
        assert 1 <= len(touched) <= 2
        assert np.all(np.abs(dz[w.start : w.end, touched]) >= 3 - 1e-3)


def test_level_shift_signature():
    stream, _, dz = _pair("level_shift", 0.05)
    for w in stream.labels:
        part = dz[w.start : w.end]
        touched = np.flatnonzero(np.any(part != 0, axis=0))
        assert len(touched) >= 1
        assert np.ptp(part[:, touched], axis=0).max() < 1e-3  # a constant offset...
        assert np.abs(part[0, touched]).min() >= 0.8 - 1e-3  # ...of at least 0.8 units


def test_variance_burst_signature():
    stream, base, dz = _pair("variance_burst", 0.05)
    for w in stream.labels:
        touched = np.flatnonzero(np.any(dz[w.start : w.end] != 0, axis=0))
        ratio = np.std(np.diff(stream.values[w.start : w.end, touched], axis=0), axis=0) / np.std(
            np.diff(base.values[w.start : w.end, touched], axis=0), axis=0)
        assert np.all(ratio > 2.0), ratio
        assert abs(dz[w.start : w.end, touched].mean()) < 1.0


def test_fault_signature_is_several_channels_stuck():
    stream, base, _ = _pair("fault", 0.05)
    for w in stream.labels:
        stuck = np.ptp(stream.values[w.start : w.end], axis=0) == 0
        assert stuck.sum() >= 2
        assert np.all(np.ptp(base.values[w.start : w.end], axis=0) > 0)


def test_drift_signature_is_a_linear_ramp():
    stream, _, dz = _pair("drift", 0.08)
    for w in stream.labels:
        touched = np.flatnonzero(np.any(dz[w.start : w.end] != 0, axis=0))
        assert len(touched) == 1
        ramp = dz[w.start : w.end, touched[0]]
        expected = ramp[-1] * np.arange(1, len(w) + 1) / len(w)
        assert abs(ramp[-1]) >= 1.0 - 1e-3 and np.allclose(ramp, expected, atol=1e-3)


def test_regime_switch_signature_is_one_group_calmer_and_shifted():
    stream, base, dz = _pair("regime_switch", 0.08)
    for w in stream.labels:
        touched = np.flatnonzero(np.any(dz[w.start : w.end] != 0, axis=0))
        assert list(touched) in ([0, 1, 2, 3], [4, 5, 6, 7])  # exactly one channel group
        ratio = np.std(np.diff(stream.values[w.start : w.end, touched], axis=0), axis=0) / np.std(
            np.diff(base.values[w.start : w.end, touched], axis=0), axis=0)
        assert np.all(ratio < 0.75), ratio


def test_recurring_events_repeat_the_same_pattern_much_later():
    config = _only("recurring", 0.02)
    stream, _, dz = _pair("recurring", 0.02)
    assert len(stream.recurrences) >= 3
    labelled = sorted((w.start, w.end, w.kind) for w in stream.labels)
    from_pairs = sorted((w.start, w.end, w.kind) for pair in stream.recurrences for w in pair)
    assert labelled == from_pairs
    for first, repeat in stream.recurrences:
        assert repeat.start - first.end >= config.recurring_min_gap and len(first) == len(repeat)
        a, b = dz[first.start : first.end], dz[repeat.start : repeat.end]
        assert np.abs(a).max() > 1.0
        assert np.allclose(a, b, atol=1e-3)
    patterns = [dz[f.start : f.end] for f, _ in stream.recurrences]
    assert not np.allclose(patterns[0][:32], patterns[1][:32], atol=0.1)  # each pair is distinctive


def test_recurring_max_gap_bounds_the_distance_to_the_repeat():
    config = dataclasses.replace(SyntheticConfig().without_regimes(), recurring_rate=0.1, recurring_min_gap=64,
                                 recurring_max_gap=512)
    stream = generate(60_000, 2, seed=4, config=config)
    gaps = [repeat.start - first.end for first, repeat in stream.recurrences]
    assert len(gaps) >= 10 and all(64 <= g <= 512 for g in gaps), gaps
    with pytest.raises(ValueError, match="recurring_max_gap"):
        dataclasses.replace(config, recurring_max_gap=10)


def test_program_runs_repeat_several_times_and_replace_the_daily_cycle():
    base = dataclasses.replace(SyntheticConfig(missing_rate=0.0).without_regimes(), recurring_rate=0.2, recurring_repeats=3,
                               recurring_min_gap=64, recurring_max_gap=512)
    added = generate(60_000, 4, seed=5, config=base)
    replaced = generate(60_000, 4, seed=5, config=dataclasses.replace(base, recurring_replace=True))
    firsts = sorted({first for first, _ in replaced.recurrences}, key=lambda w: w.start)
    assert len(firsts) >= 10 and len(replaced.recurrences) == 3 * len(firsts)
    for first in firsts:
        plays = [first] + sorted((r for f, r in replaced.recurrences if f == first), key=lambda w: w.start)
        gaps = [b.start - a.end for a, b in zip(plays, plays[1:])]
        assert all(64 <= g <= 512 for g in gaps) and len({len(w) for w in plays}) == 1, gaps
    inside = replaced.label_mask(("recurring_first", "recurring_repeat"))
    diff = (added.values - replaced.values) / replaced.channel_scale
    assert np.array_equal(added.values[~inside], replaced.values[~inside])  # nothing changes outside the runs
    assert np.abs(diff[inside]).max() > 0.3  # inside, the daily cycle is gone from the affected channels

    def mismatch(stream):  # how far a repeat is from its first play on the run's channels, a constant offset removed
        out = []
        for first, repeat in stream.recurrences:
            run_channels = np.abs(diff[first.start : first.end]).max(0) > 0
            d = (stream.values[repeat.start : repeat.end] - stream.values[first.start : first.end]) / stream.channel_scale
            out.append(np.std(d - d.mean(0), axis=0)[run_channels].max())
        return np.median(out)

    assert mismatch(replaced) < 0.7 * mismatch(added)  # a replaced run plays back like its first play
    with pytest.raises(ValueError, match="recurring_repeats"):
        dataclasses.replace(base, recurring_repeats=0)


def test_recall_stream_repeats_each_waveform_then_moves_on():
    v = recall_stream(4096, 3, period=64, repeats=4, seed=1)
    assert v.shape == (4096, 3) and v.dtype == np.float32
    assert np.array_equal(v, recall_stream(4096, 3, period=64, repeats=4, seed=1))
    block = v[:256].reshape(4, 64, 3)
    assert np.abs(block[1:] - block[0]).mean() < 0.1  # plays of one waveform differ by the noise only
    assert np.abs(v[256:320] - v[:64]).mean() > 0.5  # the next block is a new waveform
    with pytest.raises(ValueError, match="period"):
        recall_stream(100, 3, period=0)


def test_recall_stream_with_gaps_plays_each_waveform_at_varying_distances():
    period, repeats, step, max_gap = 32, 6, 8, 96
    kw = dict(period=period, repeats=repeats, noise=0.0, seed=3, max_gap=max_gap, gap_step=step)
    v = recall_stream(20_000, 2, **kw)
    assert v.shape == (20_000, 2) and v.dtype == np.float32
    assert np.array_equal(v, recall_stream(20_000, 2, **kw))
    # without noise a play repeats its waveform exactly: group the step-aligned windows by content
    plays: dict[bytes, list[int]] = {}
    for s in range(0, 4000, step):
        plays.setdefault(v[s : s + period].tobytes(), []).append(s)
    starts = np.array(min((p for p in plays.values() if len(p) > 1), key=lambda p: p[0]))  # the first waveform
    assert starts.size == repeats and starts[0] <= max_gap
    distances = np.diff(starts)
    assert (distances >= period).all() and (distances <= period + max_gap).all()
    assert len(set(distances.tolist())) > 1  # found at varying distances
    gaps = [v[a + period : b] for a, b in zip(starts[:-1], starts[1:]) if b > a + period]
    for g in gaps:  # distractors, not the waveform
        n = min(len(g), period)
        assert np.abs(g[:n] - v[starts[0] : starts[0] + n]).mean() > 0.3
    assert gaps
    with pytest.raises(ValueError, match="max_gap"):
        recall_stream(100, 3, max_gap=-1)


def test_anomaly_coverage_can_be_set():
    config = SyntheticConfig().with_coverage(anomaly=0.03)
    assert sum(config.rate(k) for k in ANOMALY_KINDS) == pytest.approx(0.03)
    stream = generate(400_000, 4, seed=11, config=config)
    assert 0.025 < stream.label_mask(ANOMALY_KINDS).mean() < 0.035


def test_config_validates_and_round_trips_through_json():
    config = SyntheticConfig(steps_per_day=96, spike_rate=0.01)
    assert SyntheticConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="spike_rate"):
        SyntheticConfig(spike_rate=-0.1)
    with pytest.raises(ValueError, match="drift_length"):
        SyntheticConfig(drift_length=(10, 5))
    with pytest.raises(ValueError, match="divide 86400"):
        SyntheticConfig(steps_per_day=7)
    with pytest.raises(ValueError, match="unknown"):
        SyntheticConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="length"):
        generate(0)


@pytest.mark.slow
def test_ten_million_steps_stream_to_parquet_in_bounded_memory(tmp_path):
    script = textwrap.dedent(f"""
        import json, resource, time, tracemalloc
        import polars as pl
        from oryx_ts.datasets.synthetic_parquet import to_parquet
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        began = time.perf_counter()
        path = to_parquet({str(tmp_path / "big.parquet")!r}, 10_000_000, 8, seed=0, progress=False)
        seconds = time.perf_counter() - began
        peak_traced = tracemalloc.get_traced_memory()[1]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        print(json.dumps(dict(seconds=seconds, rss_growth_mb=(after - before) / 1024,
                              peak_rss_mb=after / 1024, traced_mb=peak_traced / 2**20, rows=rows)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    print(stats)
    assert stats["rows"] == 10_000_000
    # The values alone would take 10M x 8 x 4 B = 305 MiB; streaming must stay well under that.
    assert stats["traced_mb"] < 150, stats
    assert stats["rss_growth_mb"] < 300, stats
