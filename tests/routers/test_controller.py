"""The budget controller's promise (never over budget on any sliding window, yet spending it and saving it for spikes) must hold for any score stream."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oryx_ts.config import preset
from oryx_ts.flops import mode_costs
from oryx_ts.routers import BudgetConfig, ControllerState, HoldState, allowance, controller_step, window_sums
from oryx_ts.routers.budget import RankState, SpikeState, controller_run

CONFIG = preset("debug")


def run(scores_BT: np.ndarray, budget: BudgetConfig, n0: int = 0, signal_BT: np.ndarray | None = None):
    scores_BT = np.atleast_2d(scores_BT)
    B, T = scores_BT.shape
    st_, hold, spike, rank = ControllerState.init(B, budget.window), HoldState.init(B), SpikeState.init(B), RankState.init(B, budget.window)
    signal_BT = np.zeros((B, T)) if signal_BT is None else np.atleast_2d(signal_BT)
    out = [controller_step(torch.as_tensor(scores_BT[:, n]), st_, budget, CONFIG, n0 + n, hold, torch.as_tensor(signal_BT[:, n]), spike, rank)
           for n in range(T)]
    modes, flops, allow = (torch.stack([o[i] for o in out], 1).numpy() for i in range(3))
    return modes, flops, allow


score_streams = st.one_of(
    st.lists(st.floats(0, 1), min_size=1, max_size=160),
    st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=160),
    st.integers(1, 160).map(lambda n: [1.0] * n),
    st.tuples(st.integers(0, 100), st.integers(1, 60)).map(lambda t: [0.0] * t[0] + [1.0] * t[1]),
)


@settings(max_examples=80, deadline=None)
@given(
    scores=score_streams,
    fraction=st.floats(0, 1),
    window=st.integers(1, 48),
    slack=st.sampled_from([0.0, 0.05, 0.2]),
    reserve=st.floats(0, 1),
    spike_z=st.floats(-1, 5),
    n0=st.integers(0, 500),
    hold=st.sampled_from([0, 0, 1, 4, 12]),
    spike_feature=st.sampled_from([-1, -1, 1]),
    signal_seed=st.integers(0, 2**16),
    threshold=st.sampled_from(["ema", "window"]),
)
def test_realized_flops_never_exceed_the_budget_on_any_window(scores, fraction, window, slack, reserve, spike_z, n0, hold, spike_feature,
                                                              signal_seed, threshold):
    budget = BudgetConfig(fraction=fraction, window=window, slack=slack, reserve=reserve, spike_z=spike_z, hold=hold,
                          spike_feature=spike_feature, spike_signal_z=spike_z, threshold=threshold)
    s = np.asarray(scores)
    signal = np.random.default_rng(signal_seed).standard_normal((2, len(s))) ** 4  # heavy-tailed: many signal spikes
    _, flops, allow = run(np.stack([s, s[::-1]]), budget, n0, signal)
    for b in range(2):
        spent, allowed = window_sums(flops[b], window), window_sums(allow[b], window)
        assert (spent <= (1 + slack) * allowed * (1 + 1e-12)).all()


@settings(max_examples=30, deadline=None)
@given(scores=score_streams, offsets=st.tuples(st.integers(0, 300), st.integers(0, 300)), window=st.integers(1, 32))
def test_series_at_different_positions_decide_as_each_would_alone(scores, offsets, window):
    budget = BudgetConfig(fraction=0.2, window=window)
    s = np.asarray(scores)
    both = ControllerState.init(2, window)
    alone = [ControllerState.init(1, window) for _ in offsets]
    for n in range(len(s)):
        pos = np.asarray(offsets) + n
        m2, f2, a2 = controller_step(torch.tensor([s[n], s[-1 - n]]), both, budget, CONFIG, pos)
        for b, score in enumerate((s[n], s[-1 - n])):
            m1, f1, a1 = controller_step(torch.tensor([score]), alone[b], budget, CONFIG, int(pos[b]))
            assert m1[0] == m2[b] and f1[0] == f2[b] and a1[0] == a2[b]


def test_continuous_scores_spend_close_to_the_budget():
    rng = np.random.default_rng(0)
    budget = BudgetConfig(fraction=0.1, window=128, reserve=0.1)
    modes, flops, allow = run(rng.random(3000), budget)
    rec = mode_costs(CONFIG, 0, 3000).recurrent_T
    spend = (flops[0] - rec).sum() / (allow[0] - rec).sum()
    assert 0.85 <= spend <= 1.0


def test_a_spike_after_a_quiet_span_spends_the_saved_reserve():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.random(400) * 0.5, [0.99]])
    modes, _, _ = run(scores, BudgetConfig(fraction=0.1, window=64, reserve=0.3, spike_z=3.0))
    assert modes[0, :-1].mean() > 0.05  # quiet tokens do spend the ordinary part of the budget
    assert modes[0, -1] == 1
    # the same score is no spike when spikes must lie 10 deviations out: the reserve holds it back
    modes, _, _ = run(scores, BudgetConfig(fraction=0.1, window=64, reserve=0.3, spike_z=10.0))
    assert modes[0, -1] == 0


def test_zero_scores_never_run_attention_and_full_scores_are_greedy():
    budget = BudgetConfig(fraction=0.25, window=16)
    modes, _, _ = run(np.zeros(200), budget)
    assert modes.sum() == 0
    modes, _, _ = run(np.ones(200), budget)
    assert 0.15 < modes.mean() <= 0.25


def test_a_hold_keeps_attention_on_after_a_spike_while_the_budget_allows():
    scores = np.zeros(300)  # zeros never pass the threshold, so the budget is there when the spikes come
    scores[[100, 200]] = 1.0
    plain, _, _ = run(scores, BudgetConfig(fraction=0.2, window=64, reserve=0.0))
    held, _, _ = run(scores, BudgetConfig(fraction=0.2, window=64, reserve=0.0, hold=4))
    for n in (100, 200):
        assert plain[0, n] == 1 and held[0, n : n + 5].all()  # the spike and the 4 tokens after it
        assert plain[0, n + 1 : n + 5].sum() < 4
    # a budget with no room beyond the spike itself holds nothing: every window still fits
    tight, flops, allow = run(scores, BudgetConfig(fraction=0.02, window=64, reserve=0.0, hold=8))
    assert (window_sums(flops[0], 64) <= window_sums(allow[0], 64) * (1 + 1e-12)).all()
    assert tight[0].sum() < held[0].sum()


def test_a_spike_of_the_signal_spends_the_reserve_where_the_score_does_not_stand_out():
    scores = np.full(300, 0.2)  # flat scores: never a score spike
    signal = np.random.default_rng(0).uniform(0, 0.1, 300)
    signal[[150, 250]] = 5.0
    budget = BudgetConfig(fraction=0.1, window=300, reserve=0.5, spike_z=3.0)
    plain, _, _ = run(scores, budget, signal_BT=signal)
    sig, flops, allow = run(scores, BudgetConfig(fraction=0.1, window=300, reserve=0.5, spike_z=3.0, spike_feature=1), signal_BT=signal)
    assert sig[0, [150, 250]].all() and not plain[0, [150, 250]].all()
    assert (window_sums(flops[0], 300) <= window_sums(allow[0], 300) * (1 + 1e-12)).all()
    # off by default: a budget without a spike feature ignores the signal and needs no spike state
    assert np.array_equal(plain, run(scores, budget)[0])
    with pytest.raises(ValueError, match="SpikeState"):
        controller_step(torch.ones(1), ControllerState.init(1, 4), BudgetConfig(fraction=0.1, window=4, spike_feature=1), CONFIG, 0)


def test_the_windowed_threshold_asks_when_a_score_ranks_within_what_the_window_still_pays_for():
    # window 4 at a 50% rate, slack 1 so that the window test never binds and the modes are the asks:
    # token n asks when its rank among the window's n scores is at most 2 * 0.5 * n - (attention among the n - 1 before)
    budget = BudgetConfig(fraction=0.5, window=4, slack=1.0, reserve=0.0, spike_z=100.0, threshold="window")
    modes, _, _ = run(np.array([0.9, 0.1, 0.5, 0.8, 0.7, 0.2, 0.95, 0.3]), budget)
    # 0: rank 1 <= 1; 1: rank 2 > 2 - 1; 2: rank 2 <= 3 - 1; 3: rank 2 <= 4 - 2; 4: rank 2 <= 4 - 2 (0.9 left the window);
    # 5: rank 4 > 4 - 3; 6: rank 1 <= 4 - 2; 7: rank 3 > 4 - 2
    assert modes[0].tolist() == [1, 0, 1, 1, 1, 0, 1, 0]
    assert run(np.zeros(100), budget)[0].sum() == 0  # scores of 0 never ask
    with pytest.raises(ValueError, match="RankState"):
        controller_step(torch.ones(1), ControllerState.init(1, 4), budget, CONFIG, 0)
    with pytest.raises(ValueError, match="RankState"):
        controller_step(torch.ones(1), ControllerState.init(1, 4), budget, CONFIG, 0, rank=RankState.init(1, 8))
    with pytest.raises(ValueError, match="threshold"):
        BudgetConfig(threshold="median")


def test_the_windowed_threshold_spends_a_quiet_span_that_the_running_threshold_leaves_unspent():
    rng = np.random.default_rng(2)
    # a burst that asks for every token, then a quiet span of low, spread scores: the running threshold stays
    # high for a while (its deviation shrinks slowly, z steps back down slowly); the window's bar drops as the burst leaves it
    scores = np.concatenate([np.ones(200), rng.random(600) * 0.2])
    ema, flops, allow = run(scores, BudgetConfig(fraction=0.1, window=64, reserve=0.0, spike_z=100.0))
    ranked, flops_w, allow_w = run(scores, BudgetConfig(fraction=0.1, window=64, reserve=0.0, spike_z=100.0, threshold="window"))
    quiet = slice(264, 500)  # once the burst has left the window
    assert ranked[0, quiet].mean() >= 0.075 and ranked[0, quiet].mean() > 2 * ema[0, quiet].mean()
    assert np.median(scores[264:][ranked[0, 264:] > 0]) > np.quantile(scores[264:], 0.75)
    assert (window_sums(flops_w[0], 64) <= window_sums(allow_w[0], 64) * (1 + 1e-12)).all()
    # on steady scores it spends about as much, on better tokens: the top of each window rather than what passes a running bar
    s = rng.random(3000)
    ema, _, _ = run(s, BudgetConfig(fraction=0.1, window=128, reserve=0.0))
    ranked, _, _ = run(s, BudgetConfig(fraction=0.1, window=128, reserve=0.0, threshold="window"))
    assert ranked.mean() >= 0.08 and s[ranked[0] > 0].mean() >= 0.9 > s[ema[0] > 0].mean()


def test_the_reasons_tell_asked_ordinary_and_spike_tokens_apart():
    scores = np.zeros(300)
    scores[[100, 200]] = 1.0  # asks (a 1 always reaches the threshold) and spikes
    budget = BudgetConfig(fraction=0.2, window=64, reserve=0.0, hold=4)
    why = {}
    modes = controller_run(scores[None], ControllerState.init(1, 64), budget, CONFIG, 0, HoldState.init(1), why=why)[0][0]
    assert why["asked"][0, [100, 200]].all() and why["asked"][0].sum() == 2
    assert why["ordinary"][0, [100, 200]].all() and not why["spike"][0].any()
    assert modes[101:105].all() and not (why["ordinary"] | why["spike"])[0, 101:105].any()  # held: neither
    # with the whole surcharge reserved, only spikes get in
    why = {}
    modes = controller_run(scores[None], ControllerState.init(1, 64), BudgetConfig(fraction=0.2, window=64, reserve=1.0), CONFIG, 0,
                           why=why)[0][0]
    assert modes[[100, 200]].all() and why["spike"][0, [100, 200]].all() and not why["ordinary"][0].any()


def test_a_hold_needs_its_state():
    with pytest.raises(ValueError, match="HoldState"):
        controller_step(torch.ones(1), ControllerState.init(1, 4), BudgetConfig(fraction=0.1, window=4, hold=2), CONFIG, 0)


def test_bad_budgets_are_refused_and_the_allowance_covers_recurrence():
    for bad in ({"fraction": -0.1}, {"fraction": 1.5}, {"window": 0}, {"reserve": 2.0}, {"slack": -1.0}, {"hold": -1}, {"hold": 1.5},
                {"spike_feature": -2}, {"spike_feature": 1.0}):
        with pytest.raises(ValueError, match="budget"):
            BudgetConfig(**bad)
    rec, att, allow = allowance(BudgetConfig(fraction=0.0), CONFIG, np.arange(40))
    assert np.array_equal(allow, rec) and (att > rec).all()
    with pytest.raises(ValueError, match="window"):
        controller_step(torch.ones(1), ControllerState.init(1, 4), BudgetConfig(fraction=0.1, window=8), CONFIG, 0)
