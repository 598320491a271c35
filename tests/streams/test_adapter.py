"""The online adapter changes the forecasts users see, so it must be the exact identity when it should be,
keep series apart, help after a level shift, not hurt a calibrated model, and be rolled back when it diverges.

Legend: B series, L raw steps, M pending forecasts, Hz horizon steps, C channels, Q quantile levels.
"""

import dataclasses
import math

import pytest
import torch

from oryx_ts.streams.adapter import Adapter, AdapterConfig, AdapterState

P, HZ, C, QS = 8, 16, 2, (0.1, 0.5, 0.9)
M = HZ // P + 1  # pending forecasts: two still maturing plus the one that finished last patch
Z_Q = torch.tensor([-1.2815516, 0.0, 1.2815516])  # standard normal quantiles at QS


def _fields(st: AdapterState) -> dict[str, torch.Tensor]:
    return {f.name: getattr(st, f.name).clone() for f in dataclasses.fields(st)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _random_pred(g: torch.Generator, *lead: int, spread: float = 1.0) -> torch.Tensor:
    """Ordered quantile forecasts with random medians and random (positive) gaps."""
    center = torch.randn(*lead, HZ, C, 1, generator=g) * 2
    below = torch.rand(*lead, HZ, C, 1, generator=g) * spread + 1e-3
    above = torch.rand(*lead, HZ, C, 1, generator=g) * spread + 1e-3
    return torch.cat([center - below, center, center + above], -1)


def _random_batch(g: torch.Generator, B: int, scale: float = 1.0):
    """A random update: pending forecasts, targets (NaN where unobserved) and a random new-entry mask."""
    pred_BMHzCQ = _random_pred(g, B, M)
    target_BMHzC = torch.randn(B, M, HZ, C, generator=g) * scale
    observed_BMHzC = torch.rand(B, M, HZ, C, generator=g) < 0.7
    target_BMHzC = torch.where(observed_BMHzC, target_BMHzC, float("nan"))
    new_BMHzC = torch.rand(B, M, HZ, C, generator=g) < 0.5
    return pred_BMHzCQ, target_BMHzC, new_BMHzC


def simulate(
    adapter: Adapter,
    level_BLC: torch.Tensor,
    seed: int,
    tau: float = 0.3,
    st: AdapterState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, AdapterState]:
    """Stream targets `level + N(0, 1)` patch by patch past frozen forecasts that believe the level is 0.

    Frozen forecasts: median N(0, tau^2) (forecast noise), quantiles calibrated for a level-0 stream.
    The engine's pattern: after patch j is observed, the forecasts of origins j-1 and j-2 mature
    (horizon steps 0..P-1 and P..2P-1) while j-3 is still pending but has nothing new; then the
    origin-j forecast is made and adapted with the state as it stands. Returns the pinball loss
    `(B, N)` of each origin's adapted (as emitted) and frozen forecast, and the final state.
    """
    g = torch.Generator().manual_seed(seed)
    B, L, _ = level_BLC.shape
    n_patches = L // P
    y_BLC = level_BLC + torch.randn(B, L, C, generator=g)
    spread = math.sqrt(1 + tau**2)
    q_Q = torch.tensor(QS)
    st = adapter.init_state(B) if st is None else st
    frozen, adapted = [], []
    h_Hz = torch.arange(HZ)
    for j in range(n_patches):
        now = (j + 1) * P
        origins = [o for o in range(j - M, j) if o >= 0]
        if origins:
            t_MHz = torch.tensor([(o + 1) * P for o in origins])[:, None] + h_Hz
            observed_MHz = t_MHz < now
            target_BMHzC = torch.where(observed_MHz[None, :, :, None], y_BLC[:, t_MHz.clamp_max(L - 1)], float("nan"))
            new_BMHzC = (observed_MHz & (t_MHz >= now - P))[None, :, :, None].expand(B, -1, -1, C).contiguous()
            adapter.update(st, torch.stack([frozen[o] for o in origins], 1), target_BMHzC, new_BMHzC)
        f_BHzCQ = torch.randn(B, HZ, C, 1, generator=g) * tau + spread * Z_Q
        frozen.append(f_BHzCQ)
        adapted.append(adapter.apply(st, f_BHzCQ))
    scored = n_patches - HZ // P - 1  # origins whose whole horizon is inside the stream
    t_NHz = (torch.arange(scored)[:, None] + 1) * P + h_Hz
    diff_f = y_BLC[:, t_NHz][..., None] - torch.stack(frozen[:scored], 1)
    diff_a = y_BLC[:, t_NHz][..., None] - torch.stack(adapted[:scored], 1)

    def pinball(d: torch.Tensor) -> torch.Tensor:
        return torch.maximum(q_Q * d, (q_Q - 1) * d).mean((2, 3, 4))

    return pinball(diff_a), pinball(diff_f), st


def test_identity_at_init_and_when_disabled():
    g = torch.Generator().manual_seed(1)
    adapter = Adapter(AdapterConfig(), HZ, C, QS)
    st = adapter.init_state(5)
    pred_BHzCQ = _random_pred(g, 5)
    pred_BHzCQ[0, 0, 0] = torch.tensor([-0.0, 0.0, float("inf")])  # signed zero and inf must pass through too
    out = adapter.apply(st, pred_BHzCQ)
    assert torch.equal(out.view(torch.int32), pred_BHzCQ.view(torch.int32))

    off = Adapter(AdapterConfig(enabled=False), HZ, C, QS)
    st = off.init_state(5)
    st.bias_BHzC.fill_(1.0)  # even a non-identity state is ignored when adaptation is off
    before = _fields(st)
    for _ in range(3):
        off.update(st, *_random_batch(g, 5))
    _assert_same(before, _fields(st))
    assert torch.equal(off.apply(st, pred_BHzCQ).view(torch.int32), pred_BHzCQ.view(torch.int32))


def test_quantiles_stay_ordered_and_parameters_bounded():
    g = torch.Generator().manual_seed(2)
    cfg = AdapterConfig(lr=5.0, lr_horizon=5.0, lr_scale=5.0, steps=3, max_step=2.0, guard_min=10**9)
    adapter = Adapter(cfg, HZ, C, QS)
    st = adapter.init_state(8)
    for _ in range(50):
        adapter.update(st, *_random_batch(g, 8, scale=20.0))
        out_BHzCQ = adapter.apply(st, _random_pred(g, 8, spread=1e-2))
        assert torch.isfinite(out_BHzCQ).all()
        assert (out_BHzCQ.diff(dim=-1) >= 0).all()
    assert st.bias_BHzC.abs().max() <= cfg.bias_bound
    assert st.log_scale_BC.abs().max() <= cfg.log_scale_bound
    assert st.log_scale_BC.abs().max() > 0  # the updates did move the spread


def test_series_are_independent():
    g = torch.Generator().manual_seed(3)
    adapter = Adapter(AdapterConfig(guard_min=20, guard_window=64), HZ, C, QS)
    batches = [_random_batch(g, 2, scale=3.0) for _ in range(40)]

    st = adapter.init_state(2)
    for pred, target, new in batches[:5]:
        adapter.update(st, pred, target, new)
    before = _fields(st)
    pred, target, new = batches[5]
    new = new.clone()
    new[1] = False  # only series 0 has matured entries; series 1's forecasts and targets are noise it must ignore
    adapter.update(st, pred, target, new)
    after = _fields(st)
    for name in after:
        assert torch.equal(after[name][1], before[name][1]), name
    assert not torch.equal(after["bias_BHzC"][0], before["bias_BHzC"][0])

    both = adapter.init_state(2)
    alone = [adapter.init_state(1), adapter.init_state(1)]
    for pred, target, new in batches:
        adapter.update(both, pred, target, new)
        for b in range(2):
            adapter.update(alone[b], pred[b : b + 1], target[b : b + 1], new[b : b + 1])
    probe_BHzCQ = _random_pred(g, 2)
    for b in range(2):
        for name, value in _fields(alone[b]).items():
            torch.testing.assert_close(getattr(both, name)[b : b + 1], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            adapter.apply(both, probe_BHzCQ)[b : b + 1],
            adapter.apply(alone[b], probe_BHzCQ[b : b + 1]),
            rtol=0,
            atol=1e-6,
        )


def test_level_shift_lowers_the_error_after_the_shift():
    """Measured (32 series, 400 patches, shift of 1 std at patch 200): adapted / frozen ~0.73 after, ~1.00 before."""
    adapter = Adapter(AdapterConfig(), HZ, C, QS)
    B, n, shift = 32, 400, 200
    level_BLC = torch.zeros(B, n * P, C)
    level_BLC[:, shift * P :] = 1.0
    la_BN, lf_BN, st = simulate(adapter, level_BLC, seed=4)
    ratio_after = float(la_BN[:, shift:].mean() / lf_BN[:, shift:].mean())
    ratio_before = float(la_BN[:, : shift - 2].mean() / lf_BN[:, : shift - 2].mean())
    assert ratio_after < 0.85, ratio_after
    assert ratio_before < 1.01, ratio_before
    assert int(st.rollbacks_B.sum()) == 0


def test_stationary_calibrated_stream_costs_at_most_one_percent():
    """Measured (32 series, 400 patches): adapted / frozen ~1.001."""
    adapter = Adapter(AdapterConfig(), HZ, C, QS)
    la_BN, lf_BN, st = simulate(adapter, torch.zeros(32, 400 * P, C), seed=5)
    ratio = float(la_BN.mean() / lf_BN.mean())
    assert ratio <= 1.01, ratio
    assert int(st.updates_B.min()) > 0


def test_guard_rolls_back_an_injected_bias():
    adapter = Adapter(AdapterConfig(guard_min=64, guard_window=256), HZ, C, QS)
    st = adapter.init_state(2)
    st.bias_BHzC[0] = 3.0  # series 0 diverged; series 1 is healthy
    la_BN, lf_BN, st = simulate(adapter, torch.zeros(2, 100 * P, C), seed=6, st=st)
    assert st.rollbacks_B.tolist()[0] >= 1 and st.rollbacks_B.tolist()[1] == 0
    assert st.bias_BHzC[0].abs().max() < 1.0
    # after the rollback the series is back to about the frozen model's error
    assert float(la_BN[0, 50:].mean() / lf_BN[0, 50:].mean()) < 1.02

    # the rollback itself: identity parameters, empty window, counter up
    g = torch.Generator().manual_seed(7)
    st = adapter.init_state(1)
    st.bias_BHzC.fill_(-3.0)
    pred, target, _ = _random_batch(g, 1)
    adapter.update(st, pred, target.nan_to_num(0.5), torch.ones_like(target, dtype=torch.bool))
    assert st.rollbacks_B.tolist() == [1]
    assert (st.bias_BHzC == 0).all() and (st.log_scale_BC == 0).all()
    assert st.count_B.tolist() == [0] and torch.isnan(adapter.gain(st)).all()


def test_guard_rolls_back_an_adapter_that_chases_noise():
    """Measured (3 series, 100 patches): adapted / frozen ~1.14 unguarded, ~1.01 guarded (rollbacks halve the rate)."""
    # the level jumps at random every patch: an adapter that follows the last patch's level is wrong by sqrt(2) more
    g = torch.Generator().manual_seed(8)
    level_BLC = (torch.randn(3, 100, generator=g) * 2).repeat_interleave(P, 1)[..., None].expand(-1, -1, C).contiguous()
    ratios = {}
    for guard_min in (64, 10**9):
        cfg = AdapterConfig(lr=4.0, lr_horizon=4.0, max_step=3.0, guard_min=guard_min, guard_window=256)
        la_BN, lf_BN, st = simulate(Adapter(cfg, HZ, C, QS), level_BLC, seed=8)
        ratios[guard_min] = float(la_BN.mean() / lf_BN.mean())
        assert (st.rollbacks_B >= 1).all() if guard_min == 64 else (st.rollbacks_B == 0).all()
    assert ratios[10**9] > 1.1 and ratios[64] < ratios[10**9] - 0.08, ratios


def test_entries_are_used_once():
    g = torch.Generator().manual_seed(9)
    adapter = Adapter(AdapterConfig(), HZ, C, QS)
    st = adapter.init_state(3)
    for _ in range(5):
        adapter.update(st, *_random_batch(g, 3, scale=2.0))
    pred, target, new = _random_batch(g, 3, scale=2.0)
    adapter.update(st, pred, target, new)
    before = _fields(st)
    adapter.update(st, pred, target, torch.zeros_like(new))  # the same entries again, already used
    _assert_same(before, _fields(st))
    adapter.update(st, pred, torch.full_like(target, float("nan")), torch.ones_like(new))  # new but not observed
    _assert_same(before, _fields(st))
    assert st.updates_B.tolist() == [6, 6, 6]


def test_gain_is_nan_before_any_matured_entry():
    adapter = Adapter(AdapterConfig(), HZ, C, QS)
    st = adapter.init_state(2)
    assert torch.isnan(adapter.gain(st)).all()
    pred, target, new = _random_batch(torch.Generator().manual_seed(10), 2)
    new[1] = False
    adapter.update(st, pred, target, new)
    gain = adapter.gain(st)
    assert gain[0] == 0 and torch.isnan(gain[1])  # identity before the first step: adapted == frozen


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", -1.0),
        ("steps", 0),
        ("guard_window", 0),
        ("guard_min", -1),
        ("guard_margin", float("nan")),
        ("bias_bound", 0.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**{field: value})


def test_shape_mismatch_raises():
    adapter = Adapter(AdapterConfig(), HZ, C, QS)
    st = adapter.init_state(2)
    with pytest.raises(ValueError, match="shape"):
        adapter.apply(st, torch.zeros(2, HZ, C + 1, len(QS)))
    pred, target, new = _random_batch(torch.Generator().manual_seed(11), 2)
    with pytest.raises(ValueError, match="shape"):
        adapter.update(st, pred, target[:, :, :-1], new)
    with pytest.raises(ValueError, match="bool"):
        adapter.update(st, pred, target, new.float())
    with pytest.raises(ValueError, match="quantiles"):
        Adapter(AdapterConfig(), HZ, C, (0.5, 0.1))
