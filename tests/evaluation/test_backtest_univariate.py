"""Univariate (channel-independent) models: training windows from every column, and a backtest that
replays each column as a series of its own, equal to backtesting each column alone."""

import json

import numpy as np
import pytest
import torch

from oryx_ts import save
from oryx_ts.cli import main
from oryx_ts.config import preset
from oryx_ts.datasets import SyntheticConfig, read, to_parquet
from oryx_ts.datasets.windows import WindowSampler
from oryx_ts.evaluation.backtest import backtest_streams
from oryx_ts.evaluation.metrics import horizon_targets, score_forecasts, seasonal_scale
from oryx_ts.routers import FixedRouter, RoutedForecaster
from oryx_ts.train import train
from tests.conftest import random_model


def test_per_channel_windows_cover_every_channel():
    values = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)  # value = 3 * row + channel
    s = WindowSampler(values, 8, align=4, per_channel=True)
    assert len(s) == 3 * len(s.starts)
    batches = list(s.sequential(4, stride=4))
    got = torch.cat(batches)
    assert got.shape == (len(s), 8, 1)
    first = got[:, 0, 0].long()
    assert sorted(zip((first // 3).tolist(), (first % 3).tolist())) == sorted((int(r), c) for r in s.starts for c in range(3))
    assert torch.equal(got[:, :, 0] - got[:, :1, 0], 3 * torch.arange(8.0).expand(len(s), 8))  # one channel, consecutive rows
    drawn = s.sample(300, torch.Generator().manual_seed(0))
    assert drawn.shape == (300, 8, 1) and set((drawn[:, 0, 0].long() % 3).tolist()) == {0, 1, 2}
    assert WindowSampler(values, 8, align=4).sample(2).shape == (2, 8, 3)  # default unchanged


def test_a_one_channel_model_trains_on_every_column():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2000, 3)).astype(np.float32)
    config = preset("debug").replace(tokenizer={"channels": 1}, train={"steps": 2, "batch_size": 2})
    result = train(config, values, progress=False)
    assert result.steps == 2 and result.model.config.tokenizer.channels == 1
    assert result.validation["windows"] % 3 == 0  # every channel's validation windows
    with pytest.raises(ValueError, match="shape"):
        train(preset("debug").replace(tokenizer={"channels": 2}), values, progress=False)


def test_univariate_backtest_equals_each_column_alone(tmp_path):
    data = tmp_path / "telemetry.parquet"
    to_parquet(data, 2400, 3, seed=3, config=SyntheticConfig().with_coverage(anomaly=0.05))
    model = random_model(seed=4, tokenizer={"channels": 1}, head={"horizon": 16})
    save(model, tmp_path / "uni")
    assert main(["backtest", "--dataset", str(data), "--model", str(tmp_path / "uni"), "--horizon", "16", "--peers", "seasonal_naive",
                 "--router", "fixed:4", "--season", "32", "--split", "0.6,0.1,0.3", "--out", str(tmp_path / "bt"), "--quiet",
                 "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "bt" / "backtest.json").read_text())
    assert summary["oryx"]["replay"]["series"] == 3
    assert "one 1-channel model for all 3 channels" in (tmp_path / "bt" / "report.md").read_text()
    # the same origins scored from a replay of each column on its own engine
    values = read(str(data)).values
    L = len(values)
    b = int(round(L * 0.7))
    s = b % 8
    x = values[s : s + (L - s) // 8 * 8]
    alone = [backtest_streams(RoutedForecaster(model, FixedRouter(4)), {"c": x[:, c : c + 1]})["c"].forecasts_THzCQ for c in range(3)]
    ends_T = s + (np.arange(len(x) // 8) + 1) * 8 - 1
    scored = (ends_T >= b - 1) & (ends_T + 16 <= L - 1)
    pred = np.concatenate(alone, axis=2)[scored]
    target = horizon_targets(values, ends_T[scored], 16)
    expect = score_forecasts(pred, target, (0.1, 0.5, 0.9), scale_C=seasonal_scale(values[: int(round(L * 0.6))], 32))
    assert summary["scores"]["oryx"]["overall"]["crps"] == pytest.approx(expect["crps"], rel=1e-5)
    assert summary["scores"]["oryx"]["overall"]["mase"] == pytest.approx(expect["mase"], rel=1e-5)


def test_any_phase_training_windows_start_anywhere_validation_on_the_grid():
    from oryx_ts.validation import split_stream

    values = torch.randn(3000, 2)
    base = preset("debug").replace(tokenizer={"channels": 2})
    grid = split_stream(values, base)
    anywhere = split_stream(values, base.replace(train={"any_phase": True}))
    P = base.tokenizer.patch_len
    assert (grid.train.starts % P == 0).all() and not (anywhere.train.starts % P == 0).all()
    last = int(anywhere.train.starts[-1])  # every step up to the last window that fits
    assert torch.equal(anywhere.train.starts, torch.arange(last + 1)) and 0 <= last - int(grid.train.starts[-1]) < P
    assert torch.equal(anywhere.val.starts, grid.val.starts)  # validation windows unchanged


def test_a_univariate_checkpoint_forecasts_each_named_column(tmp_path, capsys):
    """`backtest --univariate` records every column it learned from; `forecast` then forecasts any of them, each alone."""
    import polars as pl

    from oryx_ts import load
    from oryx_ts.checkpoint import read_data
    from oryx_ts.cli import forecast_at

    data = tmp_path / "telemetry.parquet"
    to_parquet(data, 2400, 3, seed=6, config=SyntheticConfig().with_coverage(anomaly=0.05))
    assert main(["backtest", "--dataset", str(data), "--univariate", "--train-steps", "2", "--set", "train.batch_size=2",
                 "--horizon", "16", "--peers", "none", "--router", "fixed:4", "--season", "32", "--out", str(tmp_path / "bt"),
                 "--quiet", "--threads", "1"]) == 0
    ckpt = tmp_path / "bt" / "model"
    info = read_data(ckpt)
    stream = read(str(data))
    assert info.univariate and info.channels == stream.channels and load(ckpt).config.tokenizer.channels == 1
    out = tmp_path / "f.csv"
    assert main(["forecast", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--origins", "-1", "1000"]) == 0
    frame = pl.read_csv(out)
    assert sorted(set(frame["channel"])) == sorted(stream.channels)
    model = load(ckpt)
    qs = [f"q{q:g}" for q in model.config.head.quantiles]
    for c, name in enumerate(stream.channels):  # each column's forecast is that column's alone
        rows = list(dict.fromkeys(frame["origin_row"].to_list()))  # the origins in the file's order
        alone = forecast_at(model, stream.values[:, c : c + 1], rows)[:, :, 0]  # (N, Hz, Q)
        assert main(["forecast", "--model", str(ckpt), "--data", str(data), "--channels", name, "--out", str(tmp_path / f"{c}.csv"),
                     "--origins", "-1", "1000"]) == 0
        one = pl.read_csv(tmp_path / f"{c}.csv")
        mine = frame.filter(pl.col("channel") == name)
        assert set(one["channel"]) == {name} and len(mine) == len(one) == alone.shape[0] * alone.shape[1]
        assert np.allclose(mine.select(qs).to_numpy(), alone.reshape(-1, len(qs)), rtol=1e-5, atol=1e-6)
        assert np.allclose(one.select(qs).to_numpy(), alone.reshape(-1, len(qs)), rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["forecast", "--model", str(ckpt), "--data", str(data), "--channels", "ch0,nope", "--out", str(out)]) != 0
    assert "nope" in capsys.readouterr().err
