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
    assert free.router is None and free.label_mask is None
    assert isinstance(supervised.router, LearnedRouter) and supervised.router.config.label_weight == 1.0
    assert np.array_equal(supervised.label_mask, mask_from_windows(windows[::2], 200))
