"""Training must actually learn: a short debug run lowers validation loss; the CLI trains from a file."""

import numpy as np
import polars as pl
import pytest
import torch

from oryx_ts.cli import main
from oryx_ts.config import preset
from oryx_ts.demo import demo_stream
from oryx_ts.checkpoint import DataInfo, fingerprint, read_data
from oryx_ts.train import fixed_schedule, lr_factor, rows_needed, sample_modes, train


def test_debug_training_lowers_validation_loss(tmp_path):
    config = preset("debug", train={"steps": 60, "val_every": 30, "batch_size": 8, "window_tokens": 32})
    stream = demo_stream(6_000, 4, seed=3)
    result = train(config, stream.values, out_dir=tmp_path / "m", progress=False)
    vals = result.val_losses
    assert len(vals) == 3
    assert vals[-1] < 0.8 * vals[0], vals
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_training_on_an_explicit_device_is_the_same_loop():
    config = preset("debug", train={"steps": 5, "val_every": 5, "batch_size": 4, "window_tokens": 16})
    values = demo_stream(3_000, 4, seed=1).values
    default = train(config, values, progress=False).history
    explicit = train(config, values, progress=False, device="cpu").history
    assert default == explicit and len(default) == 6


def test_training_rejects_a_stream_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"\(length, 4\)"):
        train(preset("debug"), np.zeros((5000, 3), dtype=np.float32), progress=False)


def test_mode_sampling_mixes_chunks_and_whole_windows():
    config = preset("debug")
    gen = torch.Generator().manual_seed(0)
    patterns = [sample_modes(64, config, gen) for _ in range(400)]
    means = np.array([p.mean().item() for p in patterns])
    full = (means == 0) | (means == 1)
    assert 0.1 < full.mean() < 0.4  # whole windows in one mode, about full_mode_fraction of them
    mixed = means[~full]
    assert abs(mixed.mean() - config.train.attention_fraction) < 0.05
    chunked = patterns[int(np.flatnonzero(~full)[0])].view(-1, config.train.mode_chunk)
    assert (chunked == chunked[:, :1]).all()  # a chunk has one mode


def test_fixed_schedule_is_one_in_k():
    s = fixed_schedule(12, every=4)
    assert s.tolist() == [0, 0, 0, 1] * 3


def test_cli_trains_from_a_csv_file(tmp_path, capsys):
    stream = demo_stream(3_000, 3, seed=1)
    path = tmp_path / "data.csv"
    pl.DataFrame({f"c{i}": stream.values[:, i] for i in range(3)}).with_row_index("t").write_csv(path)
    code = main(["train", "--data", str(path), "--timestamp", "t", "--out", str(tmp_path / "ckpt"), "--quiet",
                 "--set", "train.steps=3", "--set", "train.window_tokens=16", "--set", "block.mixer=mamba2"])
    assert code == 0
    from oryx_ts import load

    model = load(tmp_path / "ckpt")
    assert model.config.tokenizer.channels == 3  # the timestamp column is not a channel
    assert model.config.block.mixer == "mamba2"


def test_cli_refuses_out_of_order_timestamps(tmp_path, capsys):
    path = tmp_path / "data.csv"
    pl.DataFrame({"t": [0, 2, 1], "a": [1.0, 2.0, 3.0]}).write_csv(path)
    assert main(["train", "--data", str(path), "--timestamp", "t", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "row" in err and "'t'" in err


def test_cli_reports_a_missing_file(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.csv"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_time_budget_caps_the_steps_and_ends_the_schedule_there():
    config = preset("debug", train={"steps": 10_000, "val_every": 10_000, "batch_size": 4, "window_tokens": 16, "warmup_steps": 2})
    values = demo_stream(3_000, 4, seed=1).values
    result = train(config, values, progress=False, max_seconds=1e-3, probe_steps=3)
    budget = result.time_budget
    assert result.steps == 3 == budget["steps"] and budget["planned_steps"] == 10_000  # the probe alone spends the budget
    assert budget["max_seconds"] == 1e-3 and budget["seconds_per_step"] > 0 and not budget["stopped_early"]
    assert [h["step"] for h in result.history] == [0, 1, 2, 3] and "val_loss" in result.history[-1]
    unbounded = train(config.replace(train={"steps": 3}), values, progress=False)
    assert unbounded.time_budget is None and unbounded.steps == 3


def test_a_generous_time_budget_keeps_the_configured_steps():
    config = preset("debug", train={"steps": 6, "val_every": 3, "batch_size": 4, "window_tokens": 16})
    values = demo_stream(3_000, 4, seed=1).values
    result = train(config, values, progress=False, max_seconds=3_600)
    assert result.steps == 6 and result.time_budget["steps"] == 6
    plain = train(config, values, progress=False).history
    assert [h["step"] for h in result.history] == [h["step"] for h in plain] == list(range(7))
    assert [h["train_loss"] for h in result.history[1:]] == [h["train_loss"] for h in plain[1:]]  # the same schedule


@pytest.mark.parametrize("make, message", [
    (lambda v: np.full_like(v, np.nan), "no finite value: every value is missing"),
    (lambda v: np.where(np.arange(4) == 1, np.nan, v), "'channel 1' has no finite value"),
    (lambda v: np.where(np.arange(4) == 2, 7.0, v), "'channel 2' is constant"),
    (lambda v: v[:1_100], "needs at least 1205 rows"),
])
def test_a_stream_that_cannot_train_is_refused(make, message):
    values = make(demo_stream(8_000, 4, seed=1).values).astype(np.float32)
    with pytest.raises(ValueError) as err:
        train(preset("debug"), values, progress=False)
    assert message in str(err.value)


def test_rows_needed_is_the_fewest_rows_that_train():
    config = preset("debug", train={"window_tokens": 16, "steps": 1, "val_every": 1, "batch_size": 2})
    need = rows_needed(config)
    values = demo_stream(2_000, 4, seed=1).values[:need]
    assert train(config, values, progress=False).steps == 1
    with pytest.raises(ValueError, match=f"needs at least {need} rows"):
        train(config, values[:-1], progress=False)


def test_checkpoint_records_the_data_it_was_trained_on(tmp_path):
    config = preset("debug", train={"steps": 2, "val_every": 2, "batch_size": 2, "window_tokens": 16})
    values = demo_stream(3_000, 4, seed=1).values
    info = DataInfo(channels=("a", "b", "c", "d"), step_seconds=60, timestamp="t")
    train(config, values, progress=False, out_dir=tmp_path / "m", data=info)
    stored = read_data(tmp_path / "m")
    assert stored.channels == ("a", "b", "c", "d") and stored.rows == 3_000 and stored.train_rows == 2_550
    assert stored.fingerprint == fingerprint(values) and stored.normalization["decay"] == config.tokenizer.norm_decay


def test_the_cosine_schedule_ends_at_the_fitted_step():
    assert lr_factor(0, 4, 100) == 0.25 and lr_factor(4, 4, 100) == 1.0 and abs(lr_factor(100, 4, 100) - 0.1) < 1e-12
    config = preset("debug", train={"steps": 100_000, "val_every": 100_000, "batch_size": 2, "window_tokens": 16, "warmup_steps": 0})
    result = train(config, demo_stream(3_000, 4, seed=1).values, progress=False, max_seconds=2.0, probe_steps=2)
    steps, lr = result.steps, config.train.lr
    assert 2 <= steps < 100_000
    if steps > 2 and not result.time_budget["stopped_early"]:  # refitted after the probe, and the machine kept pace
        last = result.history[-1]
        assert last["step"] == steps and abs(last["lr"] - lr * lr_factor(steps - 1, 0, steps)) < 1e-12
        assert last["lr"] < 0.2 * lr
