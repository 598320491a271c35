"""`recall_stream` is the curriculum that teaches attention to look the past up: a play must repeat
exactly where it says it does (whole blocks, after distractor gaps, or on a subset of the channels)
and nowhere else, or the curriculum teaches something other than recall."""

import numpy as np
import pytest

from oryx_ts.datasets.recall import RecallScenario, recall_plays, recall_stream

C, PERIOD = 4, 32


def _plays(values: np.ndarray, repeats: int) -> list[np.ndarray]:
    return [values[i * PERIOD : (i + 1) * PERIOD] for i in range(repeats)]


def test_back_to_back_plays_repeat_on_every_channel():
    values = recall_stream(PERIOD * 3 * 2, C, period=PERIOD, repeats=3, noise=0.0, seed=1)
    first, second, third = _plays(values, 3)
    assert np.array_equal(first, second) and np.array_equal(first, third)
    assert not np.allclose(values[: 3 * PERIOD], values[3 * PERIOD :])  # the next block is another waveform


def test_partial_repeats_keep_at_least_half_the_channels_never_all():
    values = recall_stream(PERIOD * 2 * 40, C, period=PERIOD, repeats=2, noise=0.0, seed=2, partial=1.0)
    kept_counts = set()
    for b in range(40):
        a, c = _plays(values[b * 2 * PERIOD :], 2)
        same = np.all(a == c, axis=0)
        kept_counts.add(int(same.sum()))
        # a channel that does not repeat carries a fresh walk in each play
        assert all(not np.allclose(a[:, ch], c[:, ch]) for ch in np.flatnonzero(~same))
    assert kept_counts == {2, 3}  # of 4 channels: at least half, never all


def test_partial_share_of_blocks_and_the_default_stream_unchanged():
    full = recall_stream(PERIOD * 2 * 200, C, period=PERIOD, repeats=2, noise=0.0, seed=3, partial=0.5)
    partial_blocks = sum(not np.array_equal(*_plays(full[b * 2 * PERIOD :], 2)) for b in range(200))
    assert 70 <= partial_blocks <= 130  # about half
    kwargs = dict(period=PERIOD, repeats=2, seed=3, max_gap=16)
    assert np.array_equal(recall_stream(5000, C, **kwargs), recall_stream(5000, C, **kwargs, partial=0.0))
    assert np.array_equal(recall_stream(500, 1, period=PERIOD, seed=4), recall_stream(500, 1, period=PERIOD, seed=4, partial=1.0))


def test_partial_repeats_with_distractor_gaps_still_repeat_on_the_kept_channels():
    values = recall_stream(20_000, C, period=PERIOD, repeats=4, noise=0.0, seed=5, max_gap=48, gap_step=8, partial=1.0)
    # the first block's first play starts after a gap of a multiple of 8 steps; find its later plays by their kept channels
    for gap in range(0, 49, 8):
        first = values[gap : gap + PERIOD]
        later = [s for s in range(gap + PERIOD, gap + 5 * (PERIOD + 48), 8)
                 if (np.all(values[s : s + PERIOD] == first, axis=0)).sum() >= 2]
        if len(later) == 3:
            break
    else:
        pytest.fail("no first play with three later plays on its kept channels")


@pytest.mark.parametrize("kwargs", [dict(), dict(max_gap=48), dict(max_gap=48, partial=0.5), dict(partial=1.0)])
def test_recall_plays_is_the_same_stream_with_its_plays_where_it_says(kwargs):
    length = 7000
    values, plays = recall_plays(length, C, period=PERIOD, repeats=3, seed=7, noise=0.0, **kwargs)
    assert np.array_equal(values, recall_stream(length, C, period=PERIOD, repeats=3, seed=7, noise=0.0, **kwargs))
    assert np.array_equal(recall_stream(length, C, period=PERIOD, repeats=3, seed=7, **kwargs),
                          recall_plays(length, C, period=PERIOD, repeats=3, seed=7, **kwargs)[0])  # with noise too
    flat = [w for block in plays for w in block]
    assert all(len(w) == PERIOD and w.end <= length and w.start % 8 == 0 for w in flat)
    assert [w.start for w in flat] == sorted(w.start for w in flat)  # in stream order, never overlapping
    assert all(a.end <= b.start for a, b in zip(flat, flat[1:]))
    assert all(block[0].kind == "recurring_first" and all(w.kind == "recurring_repeat" for w in block[1:]) for block in plays)
    for block in plays:  # every later play repeats the first one on at least half the channels, and nothing else does
        first = values[block[0].start : block[0].end]
        for w in block[1:]:
            assert (np.all(values[w.start : w.end] == first, axis=0)).sum() >= C // 2
    if "max_gap" not in kwargs:  # back to back: the plays tile the stream up to its last whole play
        assert sum(len(w) for w in flat) == length // PERIOD * PERIOD


def test_recall_scenario_pairs_each_repeat_with_the_play_before_it():
    scenario = RecallScenario({"period": PERIOD, "repeats": 3, "max_gap": 24, "noise": 0.0})
    values, windows = scenario.stream(5000, C, seed=3)
    pairs = scenario.repeats(5000, C, seed=3)
    assert len(pairs) == sum(w.kind == "recurring_repeat" for w in windows) > 0
    for earlier, repeat in pairs:
        assert earlier.end <= repeat.start and len(earlier) == len(repeat) == PERIOD
        assert np.array_equal(values[earlier.start : earlier.end], values[repeat.start : repeat.end])
    assert [p[1].start for p in pairs] == sorted(p[1].start for p in pairs)


def test_arguments_are_checked():
    for bad in (dict(partial=-0.1), dict(partial=1.5), dict(max_gap=-1), dict(period=0)):
        with pytest.raises(ValueError):
            recall_stream(100, C, **bad)
        with pytest.raises(ValueError):
            recall_plays(100, C, **bad)
