"""The label-free router objective must mark what it documents, from inputs the router sees causally, and must teach the router to score surprising tokens high."""

import numpy as np
import pytest
import torch

from oryx_ts.config import preset
from oryx_ts.routers import LearnedRouter
from oryx_ts.routers.features import novelty_scores, surprise_targets
from oryx_ts.routers.heuristics import RouterInputs
from oryx_ts.train import batch_targets, router_inputs, train_router
from tests.conftest import random_model


def test_targets_mark_the_top_fraction_of_scored_tokens_and_the_lookahead_before_them():
    s = torch.tensor([[100.0, 1.0, 5.0, 2.0, 9.0, 0.0], [0.0, 3.0, 3.0, 3.0, 1.0, 2.0]])
    has_prev = torch.arange(6) > 0  # token 0 has no earlier forecast, whatever its score
    t = surprise_targets(s, has_prev, fraction=0.4)  # ceil(0.4 * 5) = 2 per series
    assert t.tolist() == [[0, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]]  # ties at the threshold all count
    ahead = surprise_targets(s, has_prev, fraction=0.4, lookahead=2)
    assert ahead.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert surprise_targets(s, torch.zeros(6, dtype=torch.bool), fraction=0.5).sum() == 0
    with pytest.raises(ValueError):
        surprise_targets(s, has_prev, fraction=0.0)
    with pytest.raises(ValueError):
        surprise_targets(s, has_prev, fraction=0.1, lookahead=-1)


def test_without_lookahead_a_target_is_a_function_of_what_the_router_sees_at_that_token():
    model = random_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24 * 8, 4, generator=g).cumsum(1) * 0.3
    x[:, 100:104, 1] += 40.0
    full = router_inputs(model, x)
    prefix = router_inputs(model, x[:, : 14 * 8])
    torch.testing.assert_close(prefix.surprise_BTF, full.surprise_BTF[:, :14])  # the features are causal
    torch.testing.assert_close(prefix.tokens_BTD, full.tokens_BTD[:, :14])
    s = novelty_scores(full.surprise_BTF, full.positions_BT[0] > 0)
    t = surprise_targets(s, full.positions_BT[0] > 0, fraction=0.1)
    for b in range(2):
        hot = t[b] > 0
        assert hot.sum() == 3 and not hot[0]  # ceil(0.1 * 23)
        assert s[b, hot].min() > s[b, 1:][~hot[1:]].max()  # positives are exactly the most surprising own patches
    assert t[:, 12].all()  # the patch the spike falls in (steps 96-103)


def test_dispersion_and_flatness_mark_a_burst_and_a_stuck_channel():
    model = random_model()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 24 * 8, 4, generator=g) * 0.3).cumsum(1) * 0.2 + torch.randn(1, 24 * 8, 4, generator=g) * 0.3
    x[0, 80:88, 2] = x[0, 79, 2]  # token 10: channel 2 stuck at its last value
    x[0, 128:136, 0] += torch.randn(8, generator=g) * 5.0  # token 16: channel 0 bursts
    x[0, 168:176, 3] = float("nan")  # token 21: channel 3 missing, the others still count
    f = router_inputs(model, x).surprise_BTF[0]
    disp, flat = f[:, 5], f[:, 6]
    assert int(flat[1:].argmax()) + 1 == 10 and flat[10] > 6.0  # an exactly constant channel: -log(1e-3)
    assert int(disp[1:].argmax()) + 1 == 16
    assert torch.isfinite(f).all() and (f[0] == 0).all()
    novelty = novelty_scores(f[None], torch.arange(24) > 0)[0]
    hot = surprise_targets(novelty[None], torch.arange(24) > 0, fraction=0.1)[0]  # 3 tokens of 23
    assert hot[10] and hot[16] and novelty[0] == -torch.inf


def test_batch_targets_pool_the_windows_so_a_quiet_window_holds_no_positive():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 20, 7, generator=g) * 0.1
    feats[1, [4, 9, 15], 1] = 5.0  # window 1: three surprising patches
    feats[2, 7, 6] = 4.0  # window 2: one flat patch
    inputs = RouterInputs(torch.zeros(3, 20, 8), feats, torch.arange(20).expand(3, 20))
    hot = batch_targets(inputs, fraction=0.07)  # ceil(0.07 * 57) = 4 of the batch's scored tokens
    assert hot[0].sum() == 0 and hot[1, [4, 9, 15]].all() and hot[2, 7] and hot.sum() == 4
    ahead = batch_targets(inputs, fraction=0.07, lookahead=2)
    assert ahead[1, [2, 3, 4, 7, 8, 9, 13, 14, 15]].all() and ahead[2, [5, 6, 7]].all() and ahead[0].sum() == 0 and ahead.sum() == 12


def spiky_stream(seed: int, length: int = 6000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = (rng.normal(size=(length, 4)).cumsum(0) * 0.1).astype(np.float32)
    for start in rng.choice(length - 8, size=length // 100, replace=False):
        values[start : start + 4, rng.integers(4)] += rng.choice([-1, 1]) * 6.0
    return values


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = scores.argsort().argsort() + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_a_short_training_run_ranks_surprising_tokens_above_the_others():
    model = random_model(train={"window_tokens": 16}, router={"steps": 120, "batch_size": 4})
    x = torch.as_tensor(spiky_stream(1, 8 * 16 * 8)).reshape(8, 16 * 8, 4)
    inputs = router_inputs(model, x)
    positive = surprise_targets(novelty_scores(inputs.surprise_BTF, inputs.positions_BT[0] > 0), inputs.positions_BT[0] > 0,
                                fraction=0.1)[:, 1:].flatten().numpy() > 0

    def ranking(router) -> float:
        with torch.no_grad():
            return auc(router.scores(inputs)[:, 1:].flatten().numpy(), positive)

    torch.manual_seed(model.config.router.seed)
    untrained = ranking(LearnedRouter(64, model.config.router))
    result = train_router(model, spiky_stream(0), progress=False)
    assert "surprise_loss" in result.history[-1]
    trained = ranking(result.router)
    assert trained > 0.85 and trained > untrained + 0.2, (untrained, trained)


def test_config_rejects_negative_surprise_settings():
    with pytest.raises(ValueError):
        preset("debug", router={"surprise_weight": -1.0})
    with pytest.raises(ValueError):
        preset("debug", router={"surprise_lookahead": -1})
