"""Training must actually learn: a short debug run lowers validation loss; the CLI trains from a file."""

import numpy as np
import polars as pl
import pytest
import torch

from oryx_ts.cli import main
from oryx_ts.config import preset
from oryx_ts.demo import demo_stream
from oryx_ts.train import fixed_schedule, sample_modes, train


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
