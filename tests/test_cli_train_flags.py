"""`oryx-ts train` sets the horizon, patch length, validation and early stopping from flags, and refuses bad ones in one line that says what is wrong."""

import io

import numpy as np
import polars as pl
import pytest

from oryx_ts import load
from oryx_ts.checkpoint import read_extra
from oryx_ts.cli import main
from oryx_ts.demo import demo_stream

START = np.datetime64("2024-01-01T00:00", "us")
QUICK = ["--quiet", "--threads", "1", "--set", "train.steps=2", "--set", "train.val_every=1", "--set", "train.window_tokens=16"]


def _write(path, values, *, step_minutes=60, names=("a", "b", "c")):
    times = START + np.arange(len(values)) * np.timedelta64(step_minutes, "m")
    pl.DataFrame({"time": times, **{n: values[:, i] for i, n in enumerate(names)}}).write_csv(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    paths = {
        "root": root,
        "data": _write(root / "data.csv", demo_stream(3_000, 3, seed=2).values),
        "val": _write(root / "val.csv", demo_stream(1_000, 3, seed=5).values),
        "val_short": _write(root / "val_short.csv", demo_stream(1_000, 3, seed=5).values[:20]),
        "val_columns": _write(root / "val_columns.csv", demo_stream(1_000, 3, seed=5).values, names=("a", "b", "x")),
        "val_step": _write(root / "val_step.csv", demo_stream(1_000, 3, seed=5).values, step_minutes=30),
    }
    assert main(["train", "--data", str(paths["data"]), "--out", str(root / "ckpt"), *QUICK]) == 0
    paths["ckpt"] = root / "ckpt"
    return paths


def test_flags_set_horizon_patch_validation_file_and_patience(files, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", "--data", str(files["data"]), "--out", str(out), "--horizon", "24", "--patch-len", "16",
                 "--val-data", str(files["val"]), "--patience", "2", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "horizon 24 steps, patches of 16" in printed and f"validation on {files['val']} (1000 rows)" in printed
    config = load(out).config
    assert (config.head.horizon, config.tokenizer.patch_len, config.tokenizer.channels, config.train.patience) == (24, 16, 3, 2)
    validation = read_extra(out)["validation"]
    assert validation["source"] == "array" and validation["rows"] == 1_000 and len(validation["curve"]) == 3
    assert main(["forecast", "--model", str(out), "--data", str(files["data"])]) == 0
    frame = pl.read_csv(io.StringIO(capsys.readouterr().out))
    assert frame["step"].max() == 24 and len(frame) == 24 * 3


def test_val_fraction_sets_the_validation_tail(files, tmp_path):
    out = tmp_path / "m"
    assert main(["train", "--data", str(files["data"]), "--out", str(out), "--val-fraction", "0.3", *QUICK]) == 0
    assert load(out).config.train.val_fraction == 0.3
    validation = read_extra(out)["validation"]
    assert validation["source"] == "tail" and validation["start"] == 2_100 and validation["rows"] == 900


BAD = [
    ("horizon 0", ["--horizon", "0"], "--horizon must be a whole number of steps >= 1, got 0"),
    ("horizon not a number", ["--horizon", "1.5"], "argument --horizon: invalid int value: '1.5'"),
    ("patch length", ["--patch-len", "-1"], "--patch-len must be a whole number of steps >= 1, got -1"),
    ("val fraction", ["--val-fraction", "1.5"], "--val-fraction must be a fraction in (0, 1), got 1.5"),
    ("patience", ["--patience", "-1"], "--patience must be a number of validation evaluations >= 0"),
    ("flag and --set", ["--horizon", "24", "--set", "head.horizon=12"], "--horizon sets head.horizon, and --set head.horizon=... sets it too"),
    ("horizon beyond a window", ["--horizon", "200"], "head.horizon=200 does not fit a training window of train.window_tokens=16"),
    ("horizon says what to raise", ["--horizon", "200"], "raise train.window_tokens to at least 26"),
    ("val file and fraction", ["--val-data", "{val}", "--val-fraction", "0.2"], "give --val-data (a separate validation file) or --val-fraction"),
    ("val file columns", ["--val-data", "{val_columns}"], "no column(s) ['c']"),
    ("val file step", ["--val-data", "{val_step}"], "--val-data {val_step} has step 1800s, the model was trained on step 3600s"),
    ("val file too short", ["--val-data", "{val_short}"], "the validation array has 20 rows, fewer than one validation window of 3 patches"),
    ("val file missing", ["--val-data", "{root}/nope.csv"], "no such file"),
    ("init with another horizon", ["--init", "{ckpt}", "--horizon", "24"], "--horizon 24: the checkpoint"),
    ("init with another patch", ["--init", "{ckpt}", "--set", "tokenizer.patch_len=4"], "--set tokenizer.patch_len 4: the checkpoint"),
]


@pytest.mark.parametrize("label, extra, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_flag_ends_in_one_line_that_says_what_is_wrong(files, tmp_path, label, extra, message, capsys):
    argv = ["train", "--data", str(files["data"]), "--out", str(tmp_path / "m"), *[a.format(**files) for a in extra], *QUICK]
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("oryx-ts: error: "), lines
    assert message.format(**files) in lines[0], lines[0]
