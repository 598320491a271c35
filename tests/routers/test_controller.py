"""The budget controller's promise (never over budget on any sliding window, yet spending it and saving it for spikes) must hold for any score stream."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oryx_ts.config import preset
from oryx_ts.flops import mode_costs
from oryx_ts.routers import Budget, ControllerState, controller_step, window_sums

CONFIG = preset("debug")


def run(scores_BT: np.ndarray, budget: Budget, n0: int = 0):
    scores_BT = np.atleast_2d(scores_BT)
    B, T = scores_BT.shape
    st_ = ControllerState.init(B, budget.window)
    out = [controller_step(torch.as_tensor(scores_BT[:, n]), st_, budget, CONFIG, n0 + n) for n in range(T)]
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
)
def test_realized_flops_never_exceed_the_budget_on_any_window(scores, fraction, window, slack, reserve, spike_z, n0):
    budget = Budget(fraction=fraction, window=window, slack=slack, reserve=reserve, spike_z=spike_z)
    s = np.asarray(scores)
    _, flops, allow = run(np.stack([s, s[::-1]]), budget, n0)
    for b in range(2):
        spent, allowed = window_sums(flops[b], window), window_sums(allow[b], window)
        assert (spent <= (1 + slack) * allowed * (1 + 1e-12)).all()


@settings(max_examples=30, deadline=None)
@given(scores=score_streams, extra=st.floats(0, 1), window=st.integers(1, 32))
def test_absolute_budgets_hold_too(scores, extra, window):
    costs = mode_costs(CONFIG, 0, 1)
    budget = Budget(flops=float(costs.recurrent_T[0] + extra * 5 * costs.surcharge_T[0]), window=window)
    _, flops, allow = run(np.asarray(scores), budget)
    assert (window_sums(flops[0], window) <= window_sums(allow[0], window) * (1 + 1e-12)).all()


def test_continuous_scores_spend_close_to_the_budget():
    rng = np.random.default_rng(0)
    budget = Budget(fraction=0.1, window=128, reserve=0.1)
    modes, flops, allow = run(rng.random(3000), budget)
    rec = mode_costs(CONFIG, 0, 3000).recurrent_T
    spend = (flops[0] - rec).sum() / (allow[0] - rec).sum()
    assert 0.85 <= spend <= 1.0


def test_a_spike_after_a_quiet_span_spends_the_saved_reserve():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.random(400) * 0.5, [0.99]])
    modes, _, _ = run(scores, Budget(fraction=0.1, window=64, reserve=0.3, spike_z=3.0))
    assert modes[0, :-1].mean() > 0.05  # quiet tokens do spend the ordinary part of the budget
    assert modes[0, -1] == 1
    # the same score is no spike when spikes must lie 10 deviations out: the reserve holds it back
    modes, _, _ = run(scores, Budget(fraction=0.1, window=64, reserve=0.3, spike_z=10.0))
    assert modes[0, -1] == 0


def test_zero_scores_never_run_attention_and_full_scores_are_greedy():
    budget = Budget(fraction=0.25, window=16)
    modes, _, _ = run(np.zeros(200), budget)
    assert modes.sum() == 0
    modes, _, _ = run(np.ones(200), budget)
    assert 0.15 < modes.mean() <= 0.25


def test_budgets_below_the_recurrent_cost_are_refused():
    costs = mode_costs(CONFIG, 0, 1)
    with pytest.raises(ValueError, match="below the all-recurrent cost"):
        Budget(flops=float(costs.recurrent_T[0]) * 0.9).allowance(CONFIG, 0, 4)
    with pytest.raises(ValueError, match="below the all-recurrent cost"):
        Budget(fraction=0.1, of="attention").allowance(CONFIG, 0, 4)
    with pytest.raises(ValueError, match="exactly one"):
        Budget(fraction=0.1, flops=1e6)
    with pytest.raises(ValueError, match="window"):
        controller_step(torch.ones(1), ControllerState.init(1, 4), Budget(fraction=0.1, window=8), CONFIG, 0)
