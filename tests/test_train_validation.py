"""Validation that a user can trust: early stopping stops and keeps the best weights, a separate validation array replaces the tail, and resume keeps both."""

import tempfile

import numpy as np
import pytest
import torch

import oryx_ts.train as train_module
from oryx_ts.checkpoint import load, read_extra
from oryx_ts.config import preset
from oryx_ts.datasets.windows import WindowSampler
from oryx_ts.demo import demo_stream
from oryx_ts.model import OryxForecaster
from oryx_ts.train import fit, lr_factor, train, validation_loss

CONFIG = preset("debug", train={"steps": 20, "val_every": 2, "batch_size": 4, "window_tokens": 16, "warmup_steps": 0,
                                "patience": 3})
# validation losses at steps 0, 2, 4, ...: best at step 4, then rising (stop after 3 evaluations: step 10)
RISING = [1.0, 0.9, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2]


@pytest.fixture(scope="module")
def values():
    return demo_stream(3_000, 4, seed=1).values


def _scripted(monkeypatch, losses):
    """Replace the validation loss by `losses`, one per evaluation, in order (one script may span a resume)."""
    script = iter(losses)
    monkeypatch.setattr(train_module, "validation_loss", lambda *a, **k: next(script))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_stops_after_patience_and_restores_the_best_weights(monkeypatch, values):
    _scripted(monkeypatch, RISING)
    seen = {}
    state, _ = fit(CONFIG, values, on_step=lambda s, r: seen.__setitem__(r["step"], _weights(s.model)) if "val_loss" in r else None)
    assert state.step == 10 and state.stopped == "patience" and state.stale == 3
    assert state.best_step == 4 and state.best_val_loss == 0.7
    assert [h["val_loss"] for h in state.history if "val_loss" in h] == RISING[:6]
    assert _same(_weights(state.model), seen[4]) and not _same(seen[4], seen[10])

    _scripted(monkeypatch, RISING)
    last, _ = fit(CONFIG.replace(train={"keep_best": False}), values)
    assert last.step == 10 and _same(_weights(last.model), seen[10])  # keep_best=False: the last step's weights

    _scripted(monkeypatch, RISING)
    off, _ = fit(CONFIG.replace(train={"patience": 0}), values)
    assert off.step == 20 and off.stopped is None and off.best_step == 4  # no early stopping, still the best weights


def test_evaluations_during_the_warm_up_do_not_count_against_patience(monkeypatch, values):
    _scripted(monkeypatch, [1.0 + 0.1 * i for i in range(11)])
    state, _ = fit(CONFIG.replace(train={"warmup_steps": 6}), values)
    assert state.best_step == 0 and state.step == 12  # steps 2, 4, 6 are warm-up; 8, 10, 12 use up the patience


def test_a_resumed_run_keeps_the_best_weights_and_the_patience_count(monkeypatch, values):
    _scripted(monkeypatch, RISING)
    whole, _ = fit(CONFIG, values)
    _scripted(monkeypatch, RISING)  # one script over both halves: evaluations come in the same order
    with tempfile.TemporaryDirectory() as d:
        first, _ = fit(CONFIG, values, stop_after=7)
        assert (first.step, first.best_step, first.stale, first.stopped) == (7, 4, 1, None)
        first.save(d)
        resumed, _ = fit(CONFIG, values, resume=d)
    assert (resumed.step, resumed.best_step, resumed.best_val_loss, resumed.stale, resumed.stopped) == (10, 4, 0.7, 3, "patience")
    assert resumed.history == whole.history and _same(_weights(resumed.model), _weights(whole.model))
    with tempfile.TemporaryDirectory() as d:
        resumed.save(d)
        again, _ = fit(CONFIG, values, resume=d)  # a run that stopped early stays stopped
    assert again.step == 10 and again.history == whole.history and _same(_weights(again.model), _weights(whole.model))


def test_early_stopping_under_a_time_budget_records_the_steps_it_ran(monkeypatch, values):
    _scripted(monkeypatch, RISING)
    state, budget = fit(CONFIG, values, max_seconds=3_600, probe_steps=2)
    assert state.step == 10 and budget["steps"] == 10 and not budget["stopped_early"]


def test_a_separate_validation_array_is_validated_and_the_whole_stream_trains(tmp_path, values):
    config = CONFIG.replace(train={"steps": 4, "val_every": 2, "patience": 0})
    other = demo_stream(2_000, 4, seed=7).values
    result = train(config, values, val_values=other, progress=False, out_dir=tmp_path / "m")
    torch.manual_seed(config.train.seed)
    fresh = OryxForecaster(config)  # the weights of step 0
    window = config.train.window_tokens * config.tokenizer.patch_len
    on_array = validation_loss(fresh, WindowSampler(other, window, align=8), batch_size=config.train.batch_size)
    split = int(len(values) * (1 - config.train.val_fraction))
    on_tail = validation_loss(fresh, WindowSampler(values, window, start=split, align=8), batch_size=config.train.batch_size)
    assert result.val_losses[0] == on_array != on_tail
    v = result.validation
    assert v["source"] == "array" and v["rows"] == 2_000 and v["curve"][0] == [0, on_array]
    extra = read_extra(tmp_path / "m")
    assert extra["validation"]["best_step"] == v["best_step"] and extra["validation"]["curve"] == v["curve"]
    best = min(v["curve"], key=lambda c: c[1])
    assert v["best_step"] == best[0] and v["best_val_loss"] == best[1]
    saved = load(tmp_path / "m")
    got = validation_loss(saved, WindowSampler(other, window, align=8), batch_size=config.train.batch_size)
    assert abs(got - v["best_val_loss"]) < 1e-6  # the checkpoint holds the best step's weights


@pytest.mark.parametrize("make, message", [
    (lambda v: v[:20], "the validation array has 20 rows, fewer than one validation window of 3 patches x tokenizer.patch_len=8"),
    (lambda v: v[:, :3], "expected (length, 4)"),
    (lambda v: np.full_like(v, np.nan), "the validation array (500 rows x 4 channels) has no finite value"),
])
def test_a_validation_array_that_cannot_validate_is_refused(values, make, message):
    with pytest.raises(ValueError) as err:
        train(CONFIG, values, val_values=make(demo_stream(500, 4, seed=2).values), progress=False)
    assert message in str(err.value)


def test_a_horizon_that_a_training_window_cannot_hold_is_refused(values):
    with pytest.raises(ValueError, match=r"head.horizon=121 does not fit a training window .* = 128 steps.*at least 17"):
        train(CONFIG.replace(head={"horizon": 121}), values, progress=False)
    assert train(CONFIG.replace(head={"horizon": 120}, train={"steps": 1}), values, progress=False).steps == 1


def test_a_short_schedule_still_warms_up_and_decays():
    factors = [lr_factor(s, 20, 10) for s in range(10)]  # warm-up capped at 5 of the 10 steps
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0] and factors[-1] < 0.2
    assert [lr_factor(s, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # a long run keeps its warm-up


def test_early_stopping_on_a_validation_stream_that_training_only_hurts():
    # trained on clean sines, validated on white noise: every step fits the sines better and the noise worse
    rng = np.random.default_rng(0)
    steps = np.arange(4_000)
    sines = np.stack([np.sin(2 * np.pi * steps / 16 + c) + 0.05 * rng.standard_normal(len(steps)) for c in range(4)], 1)
    noise = rng.standard_normal((1_500, 4))
    config = CONFIG.replace(train={"steps": 40, "val_every": 5, "patience": 2})
    result = train(config, sines, val_values=noise, progress=False)
    curve = result.validation["curve"]
    assert curve[0][1] < curve[1][1] < curve[2][1] and result.steps == 10 and result.validation["stopped"] == "patience"
    window = config.train.window_tokens * config.tokenizer.patch_len
    val = WindowSampler(torch.as_tensor(noise, dtype=torch.float32), window, align=8)
    assert validation_loss(result.model, val, batch_size=4) == curve[0][1]  # the best weights: the untrained model's
    last = train(config.replace(train={"keep_best": False}), sines, val_values=noise, progress=False)
    assert validation_loss(last.model, val, batch_size=4) == last.validation["curve"][-1][1]


def test_a_resumed_run_keeps_the_schedule_a_time_budget_fitted(tmp_path, values):
    from oryx_ts.loop_state import new_loop_state

    state, _ = fit(CONFIG.replace(train={"patience": 0}), values, stop_after=3)
    state.total[0] = 8  # as a time budget would have fitted it
    state.save(tmp_path)
    resumed = new_loop_state(state.model.config, None)
    resumed.load(tmp_path)
    assert resumed.total == [8] and resumed.scheduler.lr_lambdas[0](7) == lr_factor(7, 0, 8)
    after, _ = fit(CONFIG.replace(train={"patience": 0}), values, resume=tmp_path)
    assert after.step == 8 and after.history[-1]["lr"] == CONFIG.train.lr * lr_factor(7, 0, 8)


def test_a_validation_part_shorter_than_a_training_window_validates_on_shorter_windows(values):
    short = demo_stream(1_000, 4, seed=2).values[:60]  # 7 whole patches; a training window has 16
    result = train(CONFIG.replace(train={"steps": 2, "patience": 0}), values, val_values=short, progress=False)
    assert result.validation["window_tokens"] == 7 and result.validation["windows"] == 1
    torch.manual_seed(CONFIG.train.seed)
    fresh = OryxForecaster(CONFIG)
    assert result.val_losses[0] == validation_loss(fresh, WindowSampler(short, 56, align=8), batch_size=4)
    tail = train(CONFIG.replace(train={"steps": 2, "patience": 0, "val_fraction": 0.02}), values, progress=False)
    assert tail.validation["window_tokens"] == 7 and tail.validation["start"] == 2_940  # rows [2944, 3000): 7 patches
