"""The routing benchmarks' training recipes decide what the routers are compared on: each scenario's
forecaster config, the recall curriculum before the telemetry and the labels the supervised router fits."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from oryx_ts.config import preset
from oryx_ts.datasets.labels import LabelWindow, mask_from_windows
from oryx_ts.datasets.scenarios import (CURRICULUM_SEED_BASE, EVALUATION_SEED, SCENARIOS, TRAIN_SEED, VALIDATION_SEED, labelled_stream,
                                       recurring_plays)
from oryx_ts.datasets.recall import recall_stream
from oryx_ts.routers import LearnedRouter
from oryx_ts.routers import training
from oryx_ts.routers.training import LOOKUP_RECIPES, MIX_BLOCK, RECIPES, ForecasterRecipe, train_forecaster, train_routers
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
    def fake_train(config, values, *, model=None, progress=True, device=None, max_seconds=None, guide=None):
        calls.append(SimpleNamespace(config=config, values=np.asarray(values), model=model, device=device, max_seconds=max_seconds,
                                     guide=guide))
        return SimpleNamespace(model=f"model{len(calls)}", steps=config.train.steps, seconds=1.0, time_budget=None,
                               validation={"best_val_loss": 0.5})
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


def test_lookup_recipes_share_a_time_budget_by_steps_and_mix_the_curriculum_into_the_telemetry(monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", _recording_train(calls))
    recipe = LOOKUP_RECIPES["programs-b2b"]
    config = recipe.config(train={"steps": 200})
    C = config.tokenizer.channels
    telemetry = np.full((3 * MIX_BLOCK, C), 7.0, np.float32)
    recipe = dataclasses.replace(recipe, recall_steps=100, mix=0.5)
    model, record = recipe.fit(telemetry, config=config, seconds=30.0, device="cuda", progress=False)
    assert model == "model2" and record["recall"]["steps"] == 100 and record["telemetry"]["steps"] == 200
    curriculum, main = calls
    assert [c.max_seconds for c in calls] == [pytest.approx(10.0), pytest.approx(20.0)] and {c.device for c in calls} == {"cuda"}
    assert np.array_equal(curriculum.values, recall_stream(len(telemetry), C, **recipe.recall, seed=5))
    # the telemetry phase: whole blocks of it replaced by a curriculum stream with the mixed-in settings
    blocks = main.values.reshape(3, MIX_BLOCK, C)
    replaced = [not np.all(b == 7.0) for b in blocks]
    other = recall_stream(len(telemetry), C, **recipe.mix_recall, seed=6).reshape(3, MIX_BLOCK, C)
    assert all(np.array_equal(b, o) for b, o, r in zip(blocks, other, replaced) if r)
    assert np.array_equal(main.values, training.mix_streams(telemetry, other.reshape(-1, C), 0.5, seed=7))


def test_a_telemetry_curriculum_is_the_scenarios_kind_of_stream_with_its_plays():
    recurring = dict(SCENARIOS["programs"].train_recurring)
    stream, plays = training.curriculum_plays(20_000, 3, {"recurring": recurring}, seed=5)
    values, windows = labelled_stream(20_000, 3, seed=CURRICULUM_SEED_BASE + 5, recurring=recurring)
    assert np.array_equal(stream, values, equal_nan=True)
    kinds = {w.kind for seq in plays for w in seq}
    assert plays and kinds == {"recurring_first", "recurring_repeat"}
    assert sorted((w.start, w.end, w.kind) for seq in plays for w in seq) == [(w.start, w.end, w.kind) for w in windows if w.kind in kinds]
    assert all(seq[0].kind == "recurring_first" and len(seq) == 1 + recurring["recurring_repeats"] for seq in plays)
    with pytest.raises(ValueError, match="only 'recurring'"):
        training.curriculum_plays(1000, 3, {"recurring": recurring, "period": 64}, seed=5)
    walks, walk_plays = training.curriculum_plays(1000, 3, {"period": 64, "repeats": 2}, seed=5)
    assert np.array_equal(walks, recall_stream(1000, 3, period=64, repeats=2, seed=5)) and walk_plays


def _step_correlation(a_LC: np.ndarray, b_LC: np.ndarray) -> float:
    a, b = np.diff(a_LC, axis=0).ravel(), np.diff(b_LC, axis=0).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[finite], b[finite])[0, 1])


def test_a_telemetry_curriculum_shares_no_sample_path_with_any_scored_stream():
    # the generator draws a stream's noise from its seed alone: a stream of the training kind at an evaluation seed
    # follows that evaluation stream step for step (the check can fail), a curriculum stream follows none of them
    scenario, n, C = SCENARIOS["programs"], 4096, 3
    recurring = {"recurring": dict(scenario.train_recurring)}
    same_seed = recurring_plays(n, C, 5, scenario.train_recurring)[0]
    assert _step_correlation(scenario.stream(n, C, 5)[0], same_seed) > 0.9
    for seed in (5, 6):  # the curriculum's and the mixed blocks' seeds in train_forecaster
        curriculum = training.curriculum_plays(n, C, recurring, seed=seed)[0]
        for scored in (TRAIN_SEED, EVALUATION_SEED, VALIDATION_SEED, *range(3, 8)):
            assert abs(_step_correlation(scenario.stream(n, C, scored)[0], curriculum)) < 0.1, (seed, scored)


def test_the_telemetry_guide_points_repeats_at_their_earlier_play_outside_the_mixed_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(training, "train", _recording_train(calls))
    recipe = LOOKUP_RECIPES["programs-b2b-guided"]
    config = recipe.config(train={"steps": 20})
    C, P = config.tokenizer.channels, config.tokenizer.patch_len
    L = 4 * MIX_BLOCK
    telemetry = np.zeros((L, C), np.float32)
    plays = [[LabelWindow(s, s + 160, "recurring_first"), LabelWindow(s + 400, s + 560, "recurring_repeat")]
             for s in range(0, L - 560, 1000)]
    with pytest.raises(ValueError, match="train_plays"):
        recipe.fit(telemetry, config=config, progress=False)
    recipe = dataclasses.replace(recipe, recall_steps=10, mix=0.5)
    recipe.fit(telemetry, config=config, progress=False, train_plays=plays)
    guide = calls[-1].guide
    assert guide.weight == recipe.telemetry_guide and guide.heads == 2 and guide.steps is None
    replaced = np.isin(np.arange(L // P) // (MIX_BLOCK // P), training.mixed_blocks(L, 0.5, seed=7))
    assert replaced.any() and not replaced.all()
    t = np.flatnonzero(guide.targets_T >= 0)
    assert len(t) and not replaced[t].any() and not replaced[guide.targets_T[t]].any()
    assert set((t - guide.targets_T[t]).tolist()) == {400 // P - 2}  # 2 tokens ahead of the match, 50 tokens back
    # every repeat token outside the replaced blocks, up to 2 before the play's end, has its target
    own = training.guide_targets(plays, L, P)
    assert np.array_equal(guide.targets_T >= 0, (own >= 0) & ~replaced & ~replaced[own.clip(0)])
    with pytest.raises(ValueError, match="telemetry_guide"):
        ForecasterRecipe(telemetry_guide=1.0)  # no guide
    with pytest.raises(ValueError, match="telemetry_guide"):
        dataclasses.replace(recipe, mix_guide=0.5)


def test_mix_streams_replaces_whole_blocks_at_about_the_share():
    a, b = np.zeros((100 * 16, 2)), np.ones((100 * 16, 2))
    mixed = training.mix_streams(a, b, 0.3, block=16, seed=1)
    per_block = mixed.reshape(100, 16, 2).mean((1, 2))
    assert set(per_block.tolist()) <= {0.0, 1.0} and 15 <= per_block.sum() <= 45
    assert np.array_equal(training.mix_streams(a, b, 0.0, block=16), a) and np.array_equal(training.mix_streams(a, b, 1.0, block=16), b)
    with pytest.raises(ValueError):
        training.mix_streams(a, b[:-1], 0.5)


@pytest.mark.parametrize("name", sorted(LOOKUP_RECIPES))
def test_lookup_checkpoints_fit_the_repository(name):
    from oryx_ts.model import OryxForecaster

    config = LOOKUP_RECIPES[name].config()
    assert config.tokenizer == preset("debug").tokenizer and config.head == preset("debug").head  # scored on the same streams
    params = sum(p.numel() for p in OryxForecaster(config).parameters())
    assert 4 * params < 10 * 2**20, params  # fp32 safetensors under 10 MB


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


@pytest.mark.parametrize("name", ["programs", "daily"])
def test_the_committed_lookup_checkpoints_are_their_recipes_and_score_on_the_benchmark_streams(name):
    from pathlib import Path

    import oryx_ts

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "checkpoints" / f"{name}-lookup"
    model = oryx_ts.load(path)  # checksums and shapes checked
    assert model.config.block == LOOKUP_RECIPES[name].config().block
    recipe = RECIPES[name].config()
    assert (model.config.tokenizer, model.config.head) == (recipe.tokenizer, recipe.head)  # what routing.py --checkpoint requires
    assert (path / "model.safetensors").stat().st_size < 10 * 2**20
