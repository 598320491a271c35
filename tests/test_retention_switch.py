"""A trained model moves to bounded retention without a rebuild: the switched copy forecasts exactly as a model built from the changed config, in the forward, the step and the forecast command."""

import io

import numpy as np
import polars as pl
import pytest
import torch

from oryx_ts import OryxForecaster, load, save, with_retention
from oryx_ts.cli import forecast_at, main
from oryx_ts.config import parse_retention
from oryx_ts.demo import demo_stream
from oryx_ts.train import fixed_schedule
from tests.conftest import random_model

BOUNDED = {"retention": "bounded", "window": 8, "pinned": 2}
T, P = 40, 8  # tokens well past the window, so retention matters


def _built(model: OryxForecaster) -> OryxForecaster:
    """What a user did before: a model from the changed config, given the trained weights."""
    built = OryxForecaster(model.config.replace(block=BOUNDED))
    built.load_state_dict(model.state_dict())
    return built.eval()


def test_switched_retention_forecasts_as_the_model_built_from_the_changed_config(mixer):
    model = random_model(mixer)
    x = torch.as_tensor(demo_stream(T * P, 4, seed=3).values)[None]
    modes = fixed_schedule(T)
    switched, built = with_retention(model, **BOUNDED), _built(model)
    assert switched.config == built.config and switched.config.block.retention == "bounded" and not switched.training
    with torch.no_grad():
        got, want, full = switched(x, modes), built(x, modes), model(x, modes)
    assert torch.equal(got, want)
    assert not torch.allclose(got[:, -1], full[:, -1])  # the cache bound changes what the last tokens see
    assert model.config.block.retention == "all"  # the original is left as it was

    s_state, b_state = switched.init_state(1), built.init_state(1)
    assert s_state.bounded and b_state.bounded
    with torch.no_grad():
        for n in range(T):
            patch = x[:, n * P : (n + 1) * P]
            ys, s_state = switched.step(patch, s_state, modes[n : n + 1])
            yb, b_state = built.step(patch, b_state, modes[n : n + 1])
            assert torch.equal(ys, yb), n
    torch.testing.assert_close(ys, got[:, -1], rtol=1e-3, atol=1e-3)  # step equals forward under the switched policy (fp32, 40 tokens)


def test_load_switches_retention_and_refuses_window_without_it(tmp_path):
    model = random_model()
    save(model, tmp_path / "m")
    x = torch.as_tensor(demo_stream(T * P, 4, seed=5).values)[None]
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m", **BOUNDED)(x), _built(model)(x))
    assert load(tmp_path / "m", retention="bounded").config.block.window == model.config.block.window  # the config's default
    with pytest.raises(ValueError, match="come with retention='bounded'"):
        load(tmp_path / "m", window=8)
    with pytest.raises(ValueError, match="apply to bounded retention only"):
        with_retention(model, "all", window=8)
    with pytest.raises(ValueError, match="block.window must be >= 1"):
        with_retention(model, "bounded", window=0)


@pytest.mark.parametrize("text, want", [
    ("all", {"retention": "all"}),
    ("bounded", {"retention": "bounded"}),
    ("bounded:512", {"retention": "bounded", "window": 512}),
    (" bounded:128:16", {"retention": "bounded", "window": 128, "pinned": 16}),
])
def test_retention_text_parses(text, want):
    assert parse_retention(text) == want


@pytest.mark.parametrize("text", ["none", "all:5", "bounded:1:2:3", "bounded:x", "bounded:8.5"])
def test_bad_retention_text_says_the_form(text):
    with pytest.raises(ValueError, match="expected all, bounded, bounded:WINDOW or bounded:WINDOW:PINNED"):
        parse_retention(text)


def test_forecast_command_takes_a_retention(tmp_path, capsys):
    model = random_model()
    ckpt = save(model, tmp_path / "ckpt")
    values = demo_stream(T * P, 4, seed=1).values
    path = tmp_path / "plain.csv"
    pl.DataFrame({f"c{i}": values[:, i] for i in range(4)}).write_csv(path)
    assert main(["forecast", "--model", str(ckpt), "--data", str(path), "--retention", "bounded:8:2"]) == 0
    frame = pl.read_csv(io.StringIO(capsys.readouterr().out))
    want = forecast_at(_built(model), values, [len(values) - 1])[0]  # (Hz, C, Q)
    got = frame.sort(["step", "channel"])["q0.5"].to_numpy().reshape(want.shape[0], want.shape[1])
    np.testing.assert_allclose(got, want[..., 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, forecast_at(model, values, [len(values) - 1])[0][..., 1], rtol=1e-3, atol=1e-3)
    assert main(["forecast", "--model", str(ckpt), "--data", str(path), "--retention", "bounded:0"]) == 2
    assert "block.window must be >= 1" in capsys.readouterr().err
