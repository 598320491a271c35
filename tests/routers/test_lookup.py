"""The look-up measure says how much of an exact copy's gain inside repeats attention recovers: the copy,
the tokens it is scored on and the share must be what a hand computation gives, or the look-up target
(>= 50% of the copy's gain) measures something else."""

import math

import numpy as np
import pytest

from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.datasets.recall import RecallScenario
from oryx_ts.datasets.scenarios import SCENARIOS
from oryx_ts.evaluation.routing import copy_forecast, lookup, lookup_share, lookup_tokens
from tests.conftest import random_model

P, HZ = 2, 3


def _pairs():
    # segment 0 holds steps 0-19 (10 tokens of 2 steps), segment 1 steps 20-39
    same_segment = (LabelWindow(2, 6, "recurring_first"), LabelWindow(10, 14, "recurring_repeat"))
    across = (LabelWindow(16, 19, "recurring_first"), LabelWindow(24, 27, "recurring_repeat"))
    return [same_segment, across]


def test_lookup_tokens_are_the_repeats_tokens_that_can_see_the_earlier_play():
    owner = lookup_tokens(_pairs(), seg_tokens=10, n_seg=2, patch_len=P, warmup=0)
    # repeat [10, 14) overlaps tokens 5 and 6; repeat [24, 27) lies in segment 1, its earlier play in segment 0
    assert np.flatnonzero(owner >= 0).tolist() == [5, 6] and owner[5] == owner[6] == 0
    late = lookup_tokens(_pairs(), seg_tokens=10, n_seg=2, patch_len=P, warmup=6)
    assert np.flatnonzero(late >= 0).tolist() == [6]  # warm-up tokens are not scored


def test_copy_forecast_by_hand():
    values = np.zeros((40, 2))
    values[:, 0] = np.arange(40)
    values[2:6, 0] = [1, 3, 2, 4]
    values[10:14, 0] = [6, 8.5, 7, 9]
    values[:, 1] = 10.0
    values[10, 1] = np.nan  # channel 1's level difference from step 11 alone
    values[11, 1] = 12.0
    pairs = _pairs()
    owner = lookup_tokens(pairs, seg_tokens=10, n_seg=2, patch_len=P, warmup=0)
    fallback = np.full((20, HZ, 2), -1.0)
    copy = copy_forecast(values, pairs, owner, fallback, P)
    # token 5 has seen steps 10 and 11 of the repeat: channel 0 differs by (6 - 1 + 8.5 - 3) / 2 = 5.25 and
    # channel 1 by 12 - 10 = 2; it forecasts steps 12, 13 (in the repeat: copies of steps 4, 5) and 14 (past it)
    np.testing.assert_allclose(copy[5, :, 0], [2 + 5.25, 4 + 5.25, -1.0])
    np.testing.assert_allclose(copy[5, :, 1], [12.0, 12.0, -1.0])
    # token 6 forecasts steps 14-16, past the repeat; every other token keeps the fallback
    assert np.all(np.delete(copy, 5, axis=0) == -1.0)


def test_lookup_share_by_hand():
    assert lookup_share(0.5, 0.4, 0.3) == pytest.approx(0.5)
    assert lookup_share(0.5, 0.55, 0.3) == pytest.approx(-0.25)  # attention worse than recurrence
    assert math.isnan(lookup_share(0.5, 0.4, 0.5)) and math.isnan(lookup_share(0.5, 0.4, 0.6))


def test_lookup_on_a_program_run_stream_scores_the_three_forecasts_on_the_same_tokens():
    model = random_model(block={"rope": False})
    result = lookup(model, SCENARIOS["programs"], seed=1, seg_tokens=320, n_seg=2)
    assert result["repeats"] >= 1 and result["tokens"] >= result["repeats"]
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("rec", "att", "copy"))
    assert result["copy"] < result["rec"]  # an exact copy beats an untrained recurrence inside repeats
    assert result["share"] == pytest.approx(lookup_share(result["rec"], result["att"], result["copy"]))


def test_lookup_on_the_curriculum_copies_the_play_before_exactly():
    # plays of 4 tokens of 8 steps, no noise: inside a repeat, the copy of the play before is the stream itself
    model = random_model(block={"rope": False})
    scenario = RecallScenario({"period": 32, "repeats": 3, "noise": 0.0})
    result = lookup(model, scenario, seed=1, seg_tokens=48, n_seg=2)
    values, _ = scenario.stream(48 * 2 * 8 + 64, 4, seed=1)
    owner = lookup_tokens(scenario.repeats(len(values), 4, seed=1), 48, 2, 8)
    assert result["tokens"] == int((owner >= 0).sum()) > 0 and result["repeats"] == len(set(owner[owner >= 0].tolist()))
    assert result["copy"] < 0.5 * result["rec"]  # only horizon steps past a repeat's end take the recurrent forecast
    assert result["share"] == pytest.approx(lookup_share(result["rec"], result["att"], result["copy"]))
