"""Routed forward and routed streaming must make the same decisions and forecasts, and routing state must persist like the rest of the state."""

import hashlib
import json

import numpy as np
import pytest
import torch

import oryx_ts
from oryx_ts.checkpoint import load_router
from oryx_ts.config import preset
from oryx_ts.routers import (
    AllRouter,
    BudgetConfig,
    FixedRouter,
    LearnedRouter,
    NoneRouter,
    OracleRouter,
    RandomRouter,
    RoutedForecaster,
    SurpriseRouter,
)
from oryx_ts.train import train_router
from tests.conftest import random_model

T = 28


def stream(seed: int = 0, B: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T * 8, 4, generator=g).cumsum(1) * 0.3
    x[:, 150:166] += 6.0  # a level shift the surprise features must notice
    return x


def learned(seed: int = 0) -> LearnedRouter:
    torch.manual_seed(seed)
    router = LearnedRouter(64)
    with torch.no_grad():
        router.net[-1].bias.fill_(0.5)
        router.net[-1].weight.normal_(0, 1.0)
    return router.eval()


ROUTERS = {
    "fixed": lambda: FixedRouter(4),
    "random": lambda: RandomRouter(0.3, seed=3),
    "surprise": lambda: SurpriseRouter(),
    "surprise-threshold": lambda: SurpriseRouter(threshold=1.0),
    "learned": learned,
    "all": AllRouter,
    "none": NoneRouter,
    "oracle": lambda: OracleRouter(np.arange(T) % 5 == 0),
}


def stream_through_step(model, x, router, budget):
    P = model.config.tokenizer.patch_len
    routed = RoutedForecaster(model, router, budget)
    state = routed.init_state(x.shape[0])
    forecasts, modes, flops = [], [], []
    for n in range(x.shape[1] // P):
        f, state = routed.step(x[:, n * P : (n + 1) * P], state)
        forecasts.append(f)
        modes.append(state.parts["routing"].last_mode_B)
        flops.append(state.parts["routing"].last_flops_B)
    return torch.stack(forecasts, 1), torch.stack(modes, 1), torch.stack(flops, 1), state


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("budget", [BudgetConfig(fraction=0.25, window=8), BudgetConfig(fraction=0.25, window=8, reserve=0.1, hold=3),
                                    BudgetConfig(fraction=0.25, window=T),
                                    BudgetConfig(fraction=0.25, window=8, reserve=0.3, spike_feature=1),
                                    BudgetConfig(fraction=0.25, window=8, reserve=0.1, threshold="window"),
                                    None], ids=["budget", "hold", "whole-stream", "spike-feature", "window-threshold", "no-budget"])
def test_forward_and_step_make_the_same_decisions_and_forecasts(name, budget):
    model = random_model("gdn")
    router, x = ROUTERS[name](), stream()
    with torch.no_grad():
        out = RoutedForecaster(model, router, budget)(x)
    forecast, modes, flops, _ = stream_through_step(model, x, router, budget)
    assert torch.equal(out.modes_BT, modes)
    assert torch.equal(out.flops_BT, flops)
    torch.testing.assert_close(out.forecast, forecast, rtol=1e-4, atol=1e-4)
    if name not in ("none",) and budget is not None:
        assert 0 < modes.sum() < modes.numel()  # the pattern mixes modes, so the comparison means something


def test_mamba2_routed_forward_equals_step_with_the_learned_router():
    model = random_model("mamba2")
    budget = BudgetConfig(fraction=0.3, window=6)
    x = stream(1)
    with torch.no_grad():
        out = RoutedForecaster(model, learned(1), budget)(x)
    forecast, modes, _, _ = stream_through_step(model, x, learned(1), budget)
    assert torch.equal(out.modes_BT, modes)
    torch.testing.assert_close(out.forecast, forecast, rtol=1e-4, atol=1e-4)


def test_surprise_router_attends_where_the_level_shifts():
    model = random_model("gdn")
    with torch.no_grad():
        out = RoutedForecaster(model, SurpriseRouter(), BudgetConfig(fraction=0.2, window=12))(stream())
    peak = out.scores_BT[:, 4:].argmax(1) + 4  # the first tokens have no forecast history worth the name
    assert ((peak >= 150 // 8) & (peak <= 150 // 8 + 2)).all()


def test_routed_state_resumes_from_disk_bit_for_bit(tmp_path):
    model, router, budget = random_model("gdn"), SurpriseRouter(), BudgetConfig(fraction=0.25, window=8)
    x = stream(2)
    P = 8
    routed = RoutedForecaster(model, router, budget)
    state = routed.init_state(2)
    for n in range(10):
        routed.step(x[:, n * P : (n + 1) * P], state)
    state.save(tmp_path / "state.safetensors")
    resumed = oryx_ts.State.load(tmp_path / "state.safetensors")
    copy = state.clone()
    for n in range(10, T):
        a, state = routed.step(x[:, n * P : (n + 1) * P], state)
        b, resumed = routed.step(x[:, n * P : (n + 1) * P], resumed)
        c, copy = routed.step(x[:, n * P : (n + 1) * P], copy)
        assert torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(state.parts["routing"].last_mode_B, resumed.parts["routing"].last_mode_B)
    assert torch.equal(state.parts["routing"].spent_B, resumed.parts["routing"].spent_B)
    assert state.nbytes() > model.init_state(2).nbytes()


def test_prefill_with_a_hold_continues_as_steps_would_and_the_hold_survives_a_restart(tmp_path):
    model, budget, x = random_model("gdn"), BudgetConfig(fraction=0.3, window=8, reserve=0.0, hold=2), stream(4)
    routed, P = RoutedForecaster(model, FixedRouter(5), budget), 8
    _, steps, _, _ = stream_through_step(model, x, FixedRouter(5), budget)
    out, state = routed.prefill(x[:, : 12 * P])
    state.save(tmp_path / "s.safetensors")
    resumed = oryx_ts.State.load(tmp_path / "s.safetensors")
    assert torch.equal(resumed.parts["hold"].left_B, state.parts["hold"].left_B)
    rest, _ = routed.prefill(x[:, 12 * P :], state=resumed)
    assert torch.equal(torch.cat([out.modes_BT, rest.modes_BT], 1), steps)
    assert steps.sum() > (np.arange(T) % 5 == 4).sum() * 2  # the hold added tokens the schedule did not ask for
    with pytest.raises(ValueError, match="hold"):
        routed.step(torch.randn(1, 8, 4), RoutedForecaster(model, FixedRouter(5), BudgetConfig(fraction=0.3, window=8)).init_state(1))


def test_a_spike_feature_state_survives_a_restart_and_is_asked_for(tmp_path):
    model, x, P = random_model("gdn"), stream(5), 8
    budget = BudgetConfig(fraction=0.2, window=8, reserve=0.5, spike_feature=1)
    routed = RoutedForecaster(model, learned(2), budget)
    _, whole, _, _ = stream_through_step(model, x, learned(2), budget)
    state = routed.init_state(2)
    for n in range(12):
        routed.step(x[:, n * P : (n + 1) * P], state)
    state.save(tmp_path / "s.safetensors")
    resumed = oryx_ts.State.load(tmp_path / "s.safetensors")
    assert torch.equal(resumed.parts["spike"].dev_B, state.parts["spike"].dev_B) and (state.parts["spike"].dev_B > 0).all()
    modes = []
    for n in range(12, T):
        routed.step(x[:, n * P : (n + 1) * P], resumed)
        modes.append(resumed.parts["routing"].last_mode_B)
    assert torch.equal(torch.stack(modes, 1), whole[:, 12:])
    with pytest.raises(ValueError, match="spike"):
        routed.step(x[:, :P], RoutedForecaster(model, learned(2), BudgetConfig(fraction=0.2, window=8)).init_state(2))


def test_prefill_with_the_windowed_threshold_continues_as_steps_would_after_a_restart(tmp_path):
    model, budget, x, P = random_model("gdn"), BudgetConfig(fraction=0.3, window=8, reserve=0.0, threshold="window"), stream(6), 8
    router = RandomRouter(0.5, seed=3)
    _, steps, _, _ = stream_through_step(model, x, router, budget)
    routed = RoutedForecaster(model, router, budget)
    out, state = routed.prefill(x[:, : 12 * P])
    state.save(tmp_path / "s.safetensors")
    resumed = oryx_ts.State.load(tmp_path / "s.safetensors")
    assert torch.equal(resumed.parts["rank"].modes_BW, state.parts["rank"].modes_BW) and state.parts["rank"].modes_BW.sum() > 0
    rest, _ = routed.prefill(x[:, 12 * P :], state=resumed)
    assert torch.equal(torch.cat([out.modes_BT, rest.modes_BT], 1), steps)
    with pytest.raises(ValueError, match="rank"):
        routed.step(x[:, :P], RoutedForecaster(model, router, BudgetConfig(fraction=0.3, window=8)).init_state(2))


def test_plain_state_is_not_taken_for_a_routed_one(tmp_path):
    model = random_model("gdn")
    model.init_state(1).save(tmp_path / "plain.safetensors")
    plain = oryx_ts.State.load(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="routing parts"):
        RoutedForecaster(model, AllRouter()).step(torch.randn(1, 8, 4), plain)


def test_misuse_raises_value_error():
    model = random_model("gdn")
    patch = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="routing parts"):
        RoutedForecaster(model, AllRouter()).step(patch, model.init_state(1))
    with pytest.raises(TypeError, match="router"):
        RoutedForecaster(model, object())
    with pytest.raises(TypeError, match="BudgetConfig"):
        RoutedForecaster(model, AllRouter(), 0.1)
    state = RoutedForecaster(model, AllRouter(), BudgetConfig(fraction=0.1, window=4)).init_state(1)
    with pytest.raises(ValueError, match="window"):
        RoutedForecaster(model, AllRouter(), BudgetConfig(fraction=0.1, window=8)).step(patch, state)


def test_learned_router_round_trips_through_the_checkpoint(tmp_path):
    model, router = random_model("gdn"), learned(4)
    path = oryx_ts.save(model, tmp_path / "ckpt", router=router)
    loaded = load_router(path)
    x = stream(3)
    with torch.no_grad():
        assert torch.equal(RoutedForecaster(model, loaded)(x).modes_BT, RoutedForecaster(model, router)(x).modes_BT)
        assert torch.equal(loaded.net[0].weight, router.net[0].weight)
    oryx_ts.save(model, path)  # saving without a router drops the old one
    assert load_router(path) is None
    with pytest.raises(TypeError):
        oryx_ts.save(model, tmp_path / "other", router=AllRouter())


def test_a_router_saved_with_other_features_fails_to_load_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    path = oryx_ts.save(random_model("gdn"), tmp_path / "ckpt", router=learned(4))
    tensors = load_file(str(path / "router.safetensors"))
    tensors["net.0.weight"] = tensors["net.0.weight"][:, :-2].contiguous()  # as if saved with two features fewer
    save_file(tensors, str(path / "router.safetensors"))
    meta = json.loads((path / "config.json").read_text())  # a whole, checksummed file of another version, not a corrupt one
    meta["sha256"]["router.safetensors"] = hashlib.sha256((path / "router.safetensors").read_bytes()).hexdigest()
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="surprise features"):
        load_router(path)


def test_train_router_fits_the_router_and_leaves_the_forecaster_alone():
    config = preset("debug", train={"window_tokens": 16}, router={"steps": 6, "batch_size": 4}, budget={"fraction": 0.2})
    torch.manual_seed(0)
    model = oryx_ts.OryxForecaster(config).eval()
    values = np.random.default_rng(0).normal(size=(4000, 4)).cumsum(0).astype(np.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_router(model, values, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert len(result.history) == 6
    rates = [h["rate"] for h in result.history]
    duals = [h["dual"] for h in result.history]
    assert all((d1 - d0) * (r - 0.2) >= 0 for d0, d1, r in zip([0.0] + duals, duals, rates))  # the dual follows the rate gap
    first = result.router.net[0].weight.clone()
    assert not torch.equal(first, LearnedRouter(64, config.router).net[0].weight)


def test_train_router_takes_its_settings_from_the_router_it_is_given():
    config = preset("debug", train={"window_tokens": 16}, router={"steps": 3, "batch_size": 2})
    torch.manual_seed(0)
    model = oryx_ts.OryxForecaster(config).eval()
    values = np.random.default_rng(0).normal(size=(3000, 4)).cumsum(0).astype(np.float32)
    mask = np.zeros(3000, dtype=bool)
    mask[::50] = True
    labelled = config.replace(router={"label_weight": 1.0}).router
    plain = train_router(model, values, label_mask=mask, progress=False).router
    torch.manual_seed(0)
    supervised = train_router(model, values, router=LearnedRouter(64, labelled), label_mask=mask, progress=False).router
    assert supervised.config.label_weight == 1.0
    assert not torch.equal(plain.net[0].weight, supervised.net[0].weight)


def test_routing_under_bounded_retention_matches_between_forward_and_step_and_survives_a_restart(tmp_path):
    model = random_model("gdn", block={"retention": "bounded", "window": 6, "pinned": 3})
    router, budget, x = SurpriseRouter(), BudgetConfig(fraction=0.3, window=8), stream(5)
    with torch.no_grad():
        out = RoutedForecaster(model, router, budget)(x)
    forecast, modes, _, state = stream_through_step(model, x, router, budget)
    assert torch.equal(out.modes_BT, modes) and 0 < modes.sum() < modes.numel()
    torch.testing.assert_close(out.forecast, forecast, rtol=1e-4, atol=1e-4)
    state.save(tmp_path / "s.safetensors")
    resumed, copy = oryx_ts.State.load(tmp_path / "s.safetensors"), state.clone()
    assert resumed.bounded and copy.bounded
    patch = torch.randn(2, 8, 4)
    routed = RoutedForecaster(model, router, budget)
    a, _ = routed.step(patch, state)
    b, _ = routed.step(patch, resumed)
    c, _ = routed.step(patch, copy)
    assert torch.equal(a, b) and torch.equal(a, c)
