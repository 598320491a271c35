"""The routing scenarios are the labelled ground truth of the routing benchmarks: their windows must lie
in the stream as half-open spans of what was injected, and a seed must give one stream, always."""

import numpy as np
import pytest

from oryx_ts.datasets.labels import mask_from_windows
from oryx_ts.datasets.scenarios import EVALUATION_SEED, FRESH_SEEDS, SCENARIOS, TRAIN_SEED, VALIDATION_SEED, Scenario, labelled_stream
from oryx_ts.datasets.synthetic import ANOMALY_KINDS, KINDS

LENGTH, C = 12_000, 4
RECURRING = ("recurring_first", "recurring_repeat")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_windows_lie_inside_the_stream_sorted_by_start(name):
    length = 4 * LENGTH  # long enough to hold a regime switch
    values, windows = SCENARIOS[name].stream(length, C, seed=EVALUATION_SEED)
    assert values.shape == (length, C) and values.dtype == np.float32
    assert windows and all(0 <= w.start < w.end <= length and w.kind in KINDS for w in windows)
    assert [w.start for w in windows] == sorted(w.start for w in windows)
    kinds = {w.kind for w in windows}
    assert kinds & set(ANOMALY_KINDS) and "regime_switch" in kinds
    # only the scenarios with recurring events label them
    assert (kinds >= set(RECURRING)) == (name != "anomalies"), kinds


@pytest.mark.parametrize("name", ["programs", "daily"])
def test_recurring_windows_are_half_open_spans_of_what_was_injected(name):
    """The same seed without recurring events draws everything else the same, so the two streams
    differ only on `[start, end)` of the recurring windows (the step at `end` is outside)."""
    values, windows = SCENARIOS[name].stream(LENGTH, C, seed=VALIDATION_SEED)
    plain, plain_windows = labelled_stream(LENGTH, C, seed=VALIDATION_SEED)
    assert plain_windows == [w for w in windows if w.kind not in RECURRING]
    inside = mask_from_windows(windows, LENGTH, kind=RECURRING)
    differs = ~((values == plain) | (np.isnan(values) & np.isnan(plain))).all(axis=1)
    assert not (differs & ~inside).any(), np.flatnonzero(differs & ~inside)[:10]
    recurring = [w for w in windows if w.kind in RECURRING]
    assert recurring and all(differs[w.start : w.end].any() for w in recurring)


def test_daily_jobs_repeat_at_the_same_time_the_next_day():
    _, windows = SCENARIOS["daily"].stream(4 * LENGTH, C, seed=EVALUATION_SEED)
    starts = {w.start for w in windows if w.kind in RECURRING}
    repeats = [w for w in windows if w.kind == "recurring_repeat"]
    assert repeats and all(len(w) == 96 and w.start - 288 in starts for w in repeats)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_seed_same_stream_other_seed_other_stream(name):
    scenario = SCENARIOS[name]
    a, wa = scenario.stream(LENGTH, C, seed=FRESH_SEEDS[0])
    b, wb = scenario.stream(LENGTH, C, seed=FRESH_SEEDS[0])
    c, wc = scenario.stream(LENGTH, C, seed=FRESH_SEEDS[1])
    assert np.array_equal(a, b, equal_nan=True) and wa == wb
    assert not np.array_equal(a, c, equal_nan=True) and wa != wc


def test_training_stream_has_denser_recurring_events_and_its_own_seed():
    scenario = SCENARIOS["daily"]
    values, windows = scenario.train_stream(C, length=LENGTH)
    expected, expected_windows = labelled_stream(LENGTH, C, seed=TRAIN_SEED, recurring=scenario.train_recurring)
    assert np.array_equal(values, expected, equal_nan=True) and windows == expected_windows
    _, eval_windows = scenario.stream(LENGTH, C, seed=TRAIN_SEED)
    share = lambda ws: mask_from_windows(ws, LENGTH, kind=RECURRING).mean()  # noqa: E731
    assert share(windows) > 2 * share(eval_windows)
    assert SCENARIOS["anomalies"].train_stream(C, length=100)[0].shape == (100, C)
    assert len({TRAIN_SEED, EVALUATION_SEED, VALIDATION_SEED, *FRESH_SEEDS}) == 6  # no stream is reused for another role


def test_a_scenario_rejects_unknown_event_kinds():
    with pytest.raises(ValueError, match="events"):
        Scenario(events=("spike", "outage"), recurring={}, train_recurring={}, train_length=100)
    with pytest.raises(ValueError, match="train_length"):
        Scenario(events=("spike",), recurring={}, train_recurring={}, train_length=0)


@pytest.mark.parametrize("name", ["programs", "daily"])
def test_each_repeat_pairs_with_the_play_just_before_it_of_the_same_waveform(name):
    scenario = SCENARIOS[name]
    values, windows = scenario.stream(4 * LENGTH, C, seed=EVALUATION_SEED)
    pairs = scenario.repeats(4 * LENGTH, C, seed=EVALUATION_SEED)
    repeats = [w for w in windows if w.kind == "recurring_repeat"]
    assert [r for _, r in pairs] == repeats  # one pair per repeat window, in order
    plays = [w for w in windows if w.kind in RECURRING]
    for earlier, repeat in pairs:
        assert earlier in plays and len(earlier) == len(repeat) and earlier.end <= repeat.start
    # the previous play, not always the first: every waveform plays three or more times
    assert any(e.kind == "recurring_repeat" for e, _ in pairs)
    if name == "daily":  # a daily job adds its waveform to the stream: both plays add the same, away from other events
        plain, _ = labelled_stream(4 * LENGTH, C, seed=EVALUATION_SEED)
        others = mask_from_windows([w for w in windows if w.kind not in RECURRING], 4 * LENGTH)
        for earlier, repeat in pairs:
            clear = ~others[earlier.start : earlier.end] & ~others[repeat.start : repeat.end]
            a = (values - plain)[earlier.start : earlier.end][clear]
            b = (values - plain)[repeat.start : repeat.end][clear]
            np.testing.assert_allclose(a, b, atol=1e-4)
