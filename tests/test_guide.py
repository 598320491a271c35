"""Guided attention (`oryx_ts.guide`): where each repeat's answer lies, the guided heads' own attention
(the block's logits, checked against its forward), and a training run that follows the guide."""

import dataclasses

import numpy as np
import pytest
import torch

from oryx_ts.config import preset
from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.datasets.recall import recall_plays
from oryx_ts.guide import Guide, attention_logits, guide_targets, guided_loss, mixer_inputs, window_targets
from oryx_ts.model import OryxForecaster
from oryx_ts.routers import training
from oryx_ts.routers.training import ForecasterRecipe, mixed_blocks, mixed_guide_targets, train_forecaster
from oryx_ts.train import train


def test_guide_targets_point_ahead_of_the_match_in_the_play_before():
    P = 4
    first, second = LabelWindow(8, 24, "recurring_first"), LabelWindow(40, 56, "recurring_repeat")  # lag 32 steps = 8 tokens
    t = guide_targets([[first, second]], 64, P, ahead=2)
    assert t.shape == (16,)
    expected = np.full(16, -1)
    expected[10:12] = np.arange(10, 12) - 8 + 2  # tokens 10..13 are inside the repeat; the last 2 have no continuation inside it
    assert np.array_equal(t, expected)
    # a repeat off the patch grid: the lag rounds to whole tokens (34 steps -> 9 tokens, 33 -> 8), over the tokens inside it
    off = guide_targets([[first, LabelWindow(42, 58, "recurring_repeat")]], 64, P)
    assert np.flatnonzero(off >= 0).tolist() == [11] and off[11] == 11 - 9 + 2
    assert guide_targets([[first, LabelWindow(41, 57, "recurring_repeat")]], 64, P)[11] == 11 - 8 + 2
    # a lag shorter than `ahead` gives nothing; a block of one play gives nothing
    close = guide_targets([[LabelWindow(0, 16, "recurring_first"), LabelWindow(4, 20, "recurring_repeat")]], 64, P, ahead=2)
    assert (close == -1).all() and (guide_targets([[first]], 64, P) == -1).all()
    with pytest.raises(ValueError):
        guide_targets([], 64, 0)


def test_window_targets_are_relative_causal_and_inside_the_window():
    targets = np.array([-1, -1, 0, 1, 2, 5, -1, 3], np.int64)
    rel = window_targets(targets, torch.tensor([0, 8]), 4, 4)  # windows of 4 tokens from tokens 0 and 2
    assert rel.tolist() == [[-1, -1, 0, 1], [-1, -1, 0, 3]]  # from token 2, targets 0 and 1 lie before the window
    rel = window_targets(np.array([-1, -1, -1, 4, -1], np.int64), torch.tensor([0]), 4, 4)
    assert rel.tolist() == [[-1, -1, -1, -1]]  # a target after its token (not causal) is dropped
    with pytest.raises(ValueError, match="patch grid"):
        window_targets(targets, torch.tensor([3]), 4, 4)


@pytest.mark.parametrize("rope", [False, True])
def test_the_guided_logits_are_the_attention_the_block_computes(rope):
    torch.manual_seed(0)
    model = OryxForecaster(preset("debug", block={"rope": rope, "rope_base": 100.0}))
    mixer, c = model.blocks[0].mixer, model.config.block
    with torch.no_grad():
        mixer.att_log_temp.normal_(2.0, 0.5)  # distinct per-head temperatures
    u = torch.randn(2, 24, c.d_model)
    with torch.no_grad():
        full = mixer(u, torch.ones(2, 24))  # every token in attention mode
        logp = attention_logits(mixer, u, c.n_heads)
        _, _, v, _, _, z, _ = mixer._projections(u)
        o = torch.einsum("bhqs,bshv->bqhv", logp.exp(), v.float())
        rebuilt = mixer._output(u, o.to(v.dtype), z)
    torch.testing.assert_close(rebuilt, full, atol=2e-5, rtol=2e-5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(()), atol=1e-5) and (logp.exp().triu(1) == 0).all()
    assert attention_logits(mixer, u, 1).shape == (2, 1, 24, 24)


def test_guided_loss_is_the_cross_entropy_at_the_targets_and_zero_without_any():
    torch.manual_seed(1)
    model = OryxForecaster(preset("debug"))
    x = torch.randn(2, 16 * 8, 4)
    targets = torch.full((2, 16), -1)
    targets[0, 5], targets[1, 9] = 2, 9
    with mixer_inputs(model) as caught:
        model.loss(x)
    assert len(caught) == len(model.blocks)
    loss = guided_loss(model, caught, targets, heads=2)
    expected = 0.0
    for blk, u in zip(model.blocks, caught):
        logp = attention_logits(blk.mixer, u, 2)
        expected -= (logp[0, :, 5, 2].sum() + logp[1, :, 9, 9].sum()) / 4
    torch.testing.assert_close(loss, expected / len(model.blocks))
    none = guided_loss(model, caught, torch.full((2, 16), -1), heads=1)
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="one mixer input per layer"):
        guided_loss(model, caught[:1], targets, heads=1)
    with pytest.raises(ValueError):
        Guide(np.zeros(3, np.int64), weight=0.0)


def test_training_with_a_guide_sends_the_guided_head_to_the_earlier_play():
    config = preset("debug", block={"rope": False}, train={"steps": 60, "attention_fraction": 1.0, "full_mode_fraction": 0.0,
                                                           "window_tokens": 48, "val_every": 60, "keep_best": False})
    values, plays = recall_plays(30_000, 4, period=64, repeats=4, seed=3)
    guide = Guide(guide_targets(plays, len(values), 8), weight=1.0, heads=1)
    torch.manual_seed(0)
    result = train(config, values, progress=False, guide=guide)
    losses = [r["guide_loss"] for r in result.history if "guide_loss" in r]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])  # the head learns where the answer lies
    torch.manual_seed(0)
    unguided = train(config, values, progress=False)  # same windows, same modes: only the objective differs
    assert all("guide_loss" not in r for r in unguided.history)
    assert unguided.history[1]["train_loss"] == pytest.approx(result.history[1]["train_loss"])
    late = train(config.replace(train={"steps": 4}), values, progress=False, guide=dataclasses.replace(guide, steps=2))
    assert ["guide_loss" in r for r in late.history[1:]] == [True, True, False, False]


def test_the_mixed_blocks_keep_their_own_targets_only():
    per = 4  # tokens per block of 32 steps at patch 8
    targets = np.array([-1, 0, 1, 2, 2, 3, 5, -1, 8, 9, 10, 11], np.int64)
    kept = mixed_guide_targets(targets, np.array([0, 2]), 8, block=32)
    assert kept.tolist() == [-1, 0, 1, 2, -1, -1, -1, -1, 8, 9, 10, 11]  # block 1 is not mixed in
    kept = mixed_guide_targets(targets, np.array([0, 1, 2]), 8, block=32)
    assert kept.tolist() == [-1, 0, 1, 2, -1, -1, 5, -1, 8, 9, 10, 11]  # tokens 4 and 5 point into the block before
    assert len(targets) == 3 * per
    with pytest.raises(ValueError, match="multiple"):
        mixed_guide_targets(targets, np.array([0]), 8, block=30)
    assert np.array_equal(mixed_blocks(1000, 0.5, block=10, seed=7), mixed_blocks(1000, 0.5, block=10, seed=7))


def test_a_recipe_guides_the_curriculum_and_the_mixed_telemetry(monkeypatch):
    calls = []

    def fake_train(config, values, *, model=None, progress=True, device=None, max_seconds=None, guide=None):
        calls.append((config, np.asarray(values), guide))
        from types import SimpleNamespace
        return SimpleNamespace(model="m", steps=config.train.steps, seconds=1.0, time_budget=None, validation={})

    monkeypatch.setattr(training, "train", fake_train)
    config = preset("debug", train={"steps": 20})
    telemetry = np.zeros((6 * training.MIX_BLOCK, 4), np.float32)  # seed 7 mixes in blocks 3 and 4
    recall = {"period": 64, "repeats": 4}
    train_forecaster(config, telemetry, recall_steps=10, recall=recall, mix=0.5, recall_train={"keep_best": False, "lr": 1e-3},
                     guide={"weight": 2.0, "heads": 2, "ahead": 1}, mix_guide=0.5, progress=False)
    (cur_config, cur_values, cur_guide), (_, tel_values, tel_guide) = calls
    assert cur_config.train.keep_best is False and cur_config.train.lr == 1e-3 and cur_config.train.attention_fraction == 1.0
    _, plays = recall_plays(len(telemetry), 4, **recall, seed=5)
    assert np.array_equal(cur_guide.targets_T, guide_targets(plays, len(telemetry), 8, ahead=1))
    assert (cur_guide.weight, cur_guide.heads) == (2.0, 2)
    assert tel_guide.weight == 0.5 and tel_guide.heads == 2 and tel_guide.steps is None
    # the telemetry's targets lie in the replaced blocks only, each within its block
    blocks = mixed_blocks(len(telemetry), 0.5, seed=7)
    tokens = np.flatnonzero(tel_guide.targets_T >= 0)
    assert len(blocks) and set((tokens * 8 // training.MIX_BLOCK).tolist()) == set(blocks.tolist())
    assert (tel_guide.targets_T[tokens] * 8 // training.MIX_BLOCK == tokens * 8 // training.MIX_BLOCK).all()
    with pytest.raises(ValueError, match="mix_guide"):
        ForecasterRecipe(mix_guide=0.5)
    with pytest.raises(ValueError, match="guide takes"):
        ForecasterRecipe(guide={"wieght": 1.0})
