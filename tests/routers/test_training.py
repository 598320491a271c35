"""The routing benchmarks' training recipes decide what the routers are compared on: each scenario's
forecaster config, the recall curriculum before the telemetry and the labels the supervised router fits."""

from types import SimpleNamespace

import numpy as np
import pytest

from oryx_ts.config import preset
from oryx_ts.datasets.labels import LabelWindow, mask_from_windows
from oryx_ts.datasets.scenarios import SCENARIOS
from oryx_ts.datasets.recall import recall_stream
from oryx_ts.routers import LearnedRouter
from oryx_ts.routers import training
from oryx_ts.routers.training import RECIPES, ForecasterRecipe, train_forecaster, train_routers
from tests.conftest import random_model


def test_every_scenario_has_a_recipe_and_later_changes_win():
    assert sorted(RECIPES) == sorted(SCENARIOS)
    daily = RECIPES["daily"]
    config = daily.config(block={"head_dim_k": 8}, train={"steps": 7})
    assert config.block.head_dim_k == 8 and config.block.rope_base == 100.0
    assert config.train.steps == 7 and config.train.attention_fraction == 0.5
    assert RECIPES["anomalies"].config() == preset("debug", train={"steps": 300})
    with pytest.raises(ValueError, match="recall_steps"):
        ForecasterRecipe(recall_steps=-1)


def _recording_train(calls):
    def fake_train(config, values, *, model=None, progress=True):
        calls.append(SimpleNamespace(config=config, values=np.asarray(values), model=model))
        return SimpleNamespace(model=f"model{len(calls)}")
    return fake_train


def test_recall_curriculum_trains_all_attention_first_then_the_telemetry_from_its_weights(monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", _recording_train(calls))
    config = RECIPES["programs"].config()
    telemetry = np.zeros((640, config.tokenizer.channels), np.float32)
    assert train_forecaster(config, telemetry, recall_steps=5, progress=False) == "model2"
    recall, main = calls
    assert recall.config.train.steps == 5 and recall.config.train.attention_fraction == 1.0
    assert recall.config.train.full_mode_fraction == 0.0 and recall.model is None
    assert np.array_equal(recall.values, recall_stream(640, config.tokenizer.channels, period=128, repeats=8, seed=5))
    assert main.config == config and main.model == "model1" and np.array_equal(main.values, telemetry)

    calls.clear()
    assert train_forecaster(config, telemetry, progress=False) == "model1" and calls[0].model is None  # no curriculum


def test_the_supervised_router_fits_only_the_event_windows(monkeypatch):
    calls = []

    def fake_train_router(model, values, *, router=None, label_mask=None, progress=True):
        calls.append(SimpleNamespace(router=router, label_mask=label_mask))
        return SimpleNamespace(router=f"router{len(calls)}")

    monkeypatch.setattr(training, "train_router", fake_train_router)
    model = random_model()
    values = np.zeros((200, model.config.tokenizer.channels), np.float32)
    windows = [LabelWindow(10, 30, "spike"), LabelWindow(50, 60, "regime_switch"), LabelWindow(190, 200, "fault")]
    assert train_routers(model, values, windows, ("spike", "fault"), progress=False) == ("router1", "router2")
    free, supervised = calls
    assert free.router.config == model.config.router and free.label_mask is None
    assert isinstance(supervised.router, LearnedRouter) and supervised.router.config.label_weight == 1.0
    assert np.array_equal(supervised.label_mask, mask_from_windows(windows[::2], 200))


def test_token_losses_average_to_the_models_loss_and_the_gain_is_their_difference(monkeypatch):
    import torch

    model = random_model()
    x = torch.randn(2, 20 * 8, model.config.tokenizer.channels).cumsum(1)
    x[0, 30:34, 1] = float("nan")
    for mode in (0.0, 1.0):
        per_token = training.token_losses(model, x, mode)
        assert torch.isnan(per_token[:, -1]).all() and not torch.isnan(per_token[:, :-1]).any()  # the last token has no target
        pred, mean, std = model.forward_normalized(x, torch.full((2, 20), mode))
        counts = (~torch.isnan(model.targets_normalized(x, mean, std))).sum((2, 3)).double()
        pooled = (per_token.nan_to_num() * counts).sum() / counts.sum()
        torch.testing.assert_close(pooled.float(), model.loss(x, torch.full((2, 20), mode)).detach(), rtol=1e-5, atol=1e-6)
    fake = {0.0: torch.tensor([[3.0, 2.0, 5.0, float("nan")]], dtype=torch.float64),
            1.0: torch.tensor([[1.0, 2.0, 1.0, float("nan")]], dtype=torch.float64)}
    monkeypatch.setattr(training, "token_losses", lambda model, x, modes: fake[modes])
    gain = training.attention_gain(None, None)
    assert torch.allclose(gain[0, :3], torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)) and torch.isnan(gain[0, 3])
    ahead = training.attention_gain(None, None, lookahead=1)  # each token's gain averaged with the next one's, where it has one
    assert torch.allclose(ahead[0, :3], torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)) and torch.isnan(ahead[0, 3])


def test_gain_targets_take_the_largest_positive_gains_of_the_whole_batch():
    import torch

    gain = torch.tensor([[0.5, -1.0, 0.1, float("nan")], [2.0, 0.3, -0.2, 0.0]], dtype=torch.float64)
    assert training.gain_targets(gain, 0.25).tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]  # 2 of the 7 scored tokens
    assert training.gain_targets(gain, 1.0).tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]  # never a gain <= 0 or a NaN
    with pytest.raises(ValueError, match="fraction"):
        training.gain_targets(gain, 0.0)


def test_the_gain_router_fits_its_targets_and_leaves_the_forecaster_alone(monkeypatch):
    import torch

    model = random_model(train={"window_tokens": 16}, router={"steps": 30, "batch_size": 4, "target": "gain", "surprise_weight": 0.0},
                         budget={"fraction": 0.2})
    values = np.random.default_rng(0).normal(size=(3000, 4)).cumsum(0).astype(np.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = training.train_gain_router(model, values, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    losses = [h["gain_loss"] for h in result.history]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(0 < h["positives"] <= 0.2 + 1e-9 for h in result.history)
    calls = []
    monkeypatch.setattr(training, "train_gain_router", lambda model, values, router=None, progress=True: calls.append(router.config.target) or result)
    monkeypatch.setattr(training, "train_router", lambda model, values, router=None, label_mask=None, progress=True:
                        calls.append(router.config.target) or result)
    training.train_routers(model, values, [LabelWindow(10, 30, "spike")], ("spike",), progress=False)
    assert calls == ["gain", "surprise"]  # the label-fitted router keeps the surprise objective


def test_router_targets_are_validated_and_old_configs_load():
    from oryx_ts.config import OryxConfig

    for bad in ({"target": "labels"}, {"gain_lookahead": -1}):
        with pytest.raises(ValueError, match="router"):
            preset("debug", router=bad)
    data = preset("debug").to_dict()
    for key in ("target", "gain_lookahead"):
        del data["router"][key]
    del data["budget"]["hold"]
    old = OryxConfig.from_dict(data)
    assert old.router.target == "surprise" and old.router.gain_lookahead == 0 and old.budget.hold == 0
