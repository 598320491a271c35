"""The command line as a user meets it: forecasts from a checkpoint, typed overrides, and one-line errors for every bad invocation."""

import io
import json

import numpy as np
import polars as pl
import pytest
import torch

from oryx_ts import load
from oryx_ts.cli import _set_threads, default_threads, forecast_at, main
from oryx_ts.config import parse_overrides, preset
from oryx_ts.demo import demo_stream
from oryx_ts.train import fixed_schedule

ROWS, P = 1_500, 8
START = np.datetime64("2024-01-01T00:00", "us")


def _write(path, values, *, step_minutes=15, names=("a", "b", "c")):
    times = START + np.arange(len(values)) * np.timedelta64(step_minutes, "m")
    frame = pl.DataFrame({"time": times, **{n: values[:, i] for i, n in enumerate(names)}})
    frame.write_parquet(path) if path.suffix == ".parquet" else frame.write_csv(path)
    return path


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    values = demo_stream(ROWS, 3, seed=2).values
    data = _write(root / "data.csv", values)
    code = main(["train", "--data", str(data), "--out", str(root / "ckpt"), "--quiet", "--threads", "1",
                 "--set", "train.steps=3", "--set", "train.window_tokens=16", "--set", "block.rope=false"])
    assert code == 0
    return {"root": root, "data": data, "ckpt": root / "ckpt", "values": values, **_bad_files(root)}


def test_overrides_are_parsed_by_the_field_type():
    config = parse_overrides(preset("debug"), [
        "block.rope=False", "train.lr=.001", "train.weight_decay=1e-3", "train.steps=7", "block.mixer=mamba2",
        "head.quantiles=0.1,0.5,0.9", "budget.fraction=0.2", "block.retention=bounded", "tokenizer.norm_decay=1",
    ])
    assert config.block.rope is False and config.train.lr == 0.001 and config.train.weight_decay == 1e-3
    assert config.train.steps == 7 and config.block.mixer == "mamba2" and config.head.quantiles == (0.1, 0.5, 0.9)
    assert config.budget.fraction == 0.2 and config.block.retention == "bounded"
    for text, value in [("TRUE", True), ("yes", True), ("1", True), ("no", False), ("0", False), ("False", False)]:
        assert parse_overrides(preset("debug"), [f"block.rope={text}"]).block.rope is value


@pytest.mark.parametrize("item, message", [
    ("block.rope=maybe", "block.rope='maybe': expected a bool"),
    ("train.steps=abc", "train.steps='abc': expected an integer"),
    ("train.steps=1.5", "train.steps='1.5': expected an integer"),
    ("train.lr=fast", "train.lr='fast': expected a number"),
    ("train.lr=nan", "expected a finite number"),
    ("block.mixer=foo", "block.mixer='foo': expected one of gdn, mamba2"),
    ("head.quantiles=a,b", "head.quantiles='a,b': expected comma-separated numbers"),
    ("train.nope=1", "unknown key 'nope' in section 'train'"),
    ("nope.steps=1", "unknown config section 'nope'"),
    ("train.steps", "expected section.key=value"),
    ("steps=3", "expected section.key=value"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
])
def test_a_bad_override_names_the_field_the_value_and_the_type(item, message):
    with pytest.raises(ValueError) as err:
        parse_overrides(preset("debug"), [item])
    assert message in str(err.value)


def test_training_stores_typed_overrides_and_the_data(files):
    model = load(files["ckpt"])
    assert model.config.block.rope is False and model.config.train.steps == 3
    meta = json.loads((files["ckpt"] / "config.json").read_text())
    assert meta["data"]["channels"] == ["a", "b", "c"] and meta["data"]["step_seconds"] == 900
    assert meta["data"]["start"] == "2024-01-01T00:00:00" and meta["data"]["rows"] == ROWS


def test_forecast_at_given_origins_equals_the_parallel_forward_at_those_tokens(files, tmp_path):
    out = tmp_path / "f.csv"
    origins = [P - 1, 203, 1_000, ROWS - 1]  # off the patch grid counted from the file's start
    assert main(["forecast", "--model", str(files["ckpt"]), "--data", str(files["data"]), "--out", str(out),
                 "--origins", *map(str, origins)]) == 0
    frame = pl.read_csv(out)
    model, values = load(files["ckpt"]), files["values"]
    Hz, C, Q = model.config.head.horizon, 3, 3
    assert frame.columns == ["origin_row", "origin", "timestamp", "channel", "step", "q0.1", "q0.5", "q0.9"]
    assert frame.height == len(origins) * Hz * C
    for r in origins:
        start = (r + 1) % P  # the longest whole number of patches that ends at r
        T = (r + 1 - start) // P
        with torch.no_grad():
            expected = model(torch.as_tensor(values[None, start : r + 1]), fixed_schedule(T))[0, -1].numpy()
        got = frame.filter(pl.col("origin_row") == r).sort("step", "channel")
        table = got.select("q0.1", "q0.5", "q0.9").to_numpy().reshape(Hz, C, Q)
        np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-4)
        assert got["channel"].to_list()[:C] == ["a", "b", "c"]
    first = frame.filter(pl.col("origin_row") == 203).sort("step", "channel")
    assert first["origin"][0] == "2024-01-03T02:45:00.000000"  # row 203 at 15 minutes a row
    assert first["timestamp"][0] == "2024-01-03T03:00:00.000000" and first["step"].to_list()[::C] == list(range(1, Hz + 1))


def test_forecast_origins_by_timestamp_equal_origins_by_row_and_parquet_equals_csv(files, tmp_path):
    by_row, by_time = tmp_path / "rows.parquet", tmp_path / "times.csv"
    common = ["forecast", "--model", str(files["ckpt"]), "--data", str(files["data"])]
    assert main([*common, "--origins", "203", "-1", "--out", str(by_row), "--plot", str(tmp_path / "fan.png")]) == 0
    assert main([*common, "--origins", "2024-01-03T02:45", f"{ROWS - 1}", "--out", str(by_time)]) == 0
    a, b = pl.read_parquet(by_row), pl.read_csv(by_time)
    np.testing.assert_allclose(a["q0.5"].to_numpy(), b["q0.5"].to_numpy(), rtol=1e-6)
    assert (tmp_path / "fan.png").stat().st_size > 10_000


def test_forecast_with_a_context_cap_reads_only_the_last_patches(files):
    model, values = load(files["ckpt"]), files["values"]
    capped = forecast_at(model, values, [1_000], attention_every=0, context=10)
    with torch.no_grad():
        expected = model(torch.as_tensor(values[None, 1_001 - 80 : 1_001]))[0, -1].numpy()
    np.testing.assert_allclose(capped[0], expected, rtol=1e-5, atol=1e-5)


def test_forecast_without_out_prints_the_last_origin_as_csv(files, capsys):
    assert main(["forecast", "--model", str(files["ckpt"]), "--data", str(files["data"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("origin_row,origin,timestamp,channel,step,q0.1")
    assert len(lines) == 1 + 16 * 3 and lines[1].startswith(f"{ROWS - 1},")


def test_train_init_resumes_from_the_checkpoint_weights_with_overrides(files, tmp_path):
    out = tmp_path / "tuned"
    assert main(["train", "--data", str(files["data"]), "--init", str(files["ckpt"]), "--out", str(out), "--quiet",
                 "--set", "train.steps=1", "--set", "train.lr=1e-12", "--set", "train.warmup_steps=0"]) == 0
    before, after = load(files["ckpt"]), load(out)
    assert after.config.train.steps == 1 and after.config.block.rope is False  # the checkpoint's config is the base
    for (name, p), q in zip(before.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_threads_option_sets_torch_threads_and_the_default_is_a_core_count():
    _set_threads(1)
    assert torch.get_num_threads() == 1
    import os

    assert 1 <= default_threads() <= (os.cpu_count() or 1)


def _bad_files(root):
    values = demo_stream(ROWS, 3, seed=4).values
    nan = np.full_like(values, np.nan)
    one_nan = values.copy()
    one_nan[:, 1] = np.nan
    constant = values.copy()
    constant[:, 2] = 3.0
    paths = {
        "all_nan": _write(root / "all_nan.csv", nan),
        "nan_channel": _write(root / "nan_channel.csv", one_nan),
        "constant": _write(root / "constant.csv", constant),
        "short": _write(root / "short.csv", values[:1_100]),
        "other_columns": _write(root / "other_columns.csv", values, names=("a", "b", "x")),
        "other_step": _write(root / "other_step.csv", values, step_minutes=5),
        "bad_json": root / "bad.json",
        "unknown_keys": root / "unknown.json",
        "xlsx": root / "data.xlsx",
    }
    paths["bad_json"].write_text("{\"block\": ")
    paths["unknown_keys"].write_text(json.dumps({"block": {"d_modle": 3}}))
    paths["xlsx"].write_text("a,b\n1,2\n")
    dup = root / "dup.csv"
    pl.DataFrame({"time": [0, 1, 1, 2], "a": [1.0, 2.0, 3.0, 4.0]}).write_csv(dup)
    paths["dup"] = dup
    return paths


BAD = [
    # (label, argv with {data} {ckpt} {root} and file keys, expected text in the one-line message)
    ("missing data file", ["train", "--data", "{root}/nope.csv"], "no such file"),
    ("bool override", ["train", "--data", "{data}", "--set", "block.rope=maybe"], "block.rope='maybe': expected a bool"),
    ("int override", ["train", "--data", "{data}", "--set", "train.steps=abc"], "train.steps='abc': expected an integer"),
    ("literal override", ["train", "--data", "{data}", "--set", "block.mixer=foo"], "expected one of gdn, mamba2"),
    ("unknown key", ["train", "--data", "{data}", "--set", "train.nope=1"], "unknown key 'nope'"),
    ("override without =", ["train", "--data", "{data}", "--set", "train.steps"], "expected section.key=value"),
    ("invalid value", ["train", "--data", "{data}", "--set", "head.quantiles=0.9,0.1"], "strictly increasing"),
    ("missing config", ["train", "--data", "{data}", "--config", "{root}/nope.json"], "cannot read --config"),
    ("config not JSON", ["train", "--data", "{data}", "--config", "{bad_json}"], "not valid JSON"),
    ("config unknown keys", ["train", "--data", "{data}", "--config", "{unknown_keys}"], "unknown keys ['d_modle']"),
    ("config and preset", ["train", "--data", "{data}", "--config", "{unknown_keys}", "--preset", "small"], "not both"),
    ("all-NaN file", ["train", "--data", "{all_nan}"], "has no finite value: every value is missing"),
    ("all-NaN channel", ["train", "--data", "{nan_channel}"], "'b' has no finite value"),
    ("constant channel", ["train", "--data", "{constant}"], "'c' is constant"),
    ("too few rows", ["train", "--data", "{short}"], "needs at least 1205 rows"),
    ("too few rows in both splits", ["train", "--data", "{short}", "--val-fraction", "0.01", "--set", "train.window_tokens=200"],
     "rows [0, 1089) and the validation split is rows [1089, 1100): both are too short"),
    ("too few validation rows", ["train", "--data", "{short}", "--set", "train.window_tokens=64", "--val-fraction", "0.01"],
     "the validation split is rows [1089, 1100), shorter than 24 steps"),
    ("too few validation rows says what to set", ["train", "--data", "{short}", "--val-fraction", "0.01"], "--val-fraction F"),
    ("too few rows says what to set", ["train", "--data", "{short}"], "--set train.window_tokens=N"),
    ("duplicates", ["train", "--data", "{dup}"], "--duplicates first|last|mean"),
    ("unknown suffix", ["train", "--data", "{xlsx}"], "unknown format '.xlsx'"),
    ("threads", ["train", "--data", "{data}", "--threads", "0"], "--threads must be >= 1"),
    ("max minutes", ["train", "--data", "{data}", "--max-minutes", "0"], "--max-minutes must be > 0"),
    ("init with preset", ["train", "--data", "{data}", "--init", "{ckpt}", "--preset", "small"], "without --config or --preset"),
    ("init with other shapes", ["train", "--data", "{data}", "--init", "{ckpt}", "--set", "block.d_model=32"], "shape"),
    ("init on other columns", ["train", "--data", "{other_columns}", "--init", "{ckpt}"], "no column(s) ['c']"),
    ("missing --data", ["train"], "the following arguments are required: --data"),
    ("unknown preset", ["train", "--data", "{data}", "--preset", "huge"], "invalid choice: 'huge'"),
    ("unknown command", ["nope"], "invalid choice: 'nope'"),
    ("not a checkpoint", ["forecast", "--model", "{root}", "--data", "{data}"], "is not an oryx_ts checkpoint"),
    ("other columns", ["forecast", "--model", "{ckpt}", "--data", "{other_columns}", "--channels", "a,b,x"],
     "has channels ['a', 'b', 'x'], the model was trained on ['a', 'b', 'c']"),
    ("other step", ["forecast", "--model", "{ckpt}", "--data", "{other_step}"], "has step 300s, the model was trained on step 900s"),
    ("origin before one patch", ["forecast", "--model", "{ckpt}", "--data", "{data}", "--origins", "3"], "outside [7, 1499]"),
    ("origin past the end", ["forecast", "--model", "{ckpt}", "--data", "{data}", "--origins", "2099-01-01"], "outside [7, 1499]"),
    ("origin off the grid", ["forecast", "--model", "{ckpt}", "--data", "{data}", "--origins", "2024-01-01T00:07"], "not on the file's grid"),
    ("origin not parseable", ["forecast", "--model", "{ckpt}", "--data", "{data}", "--origins", "soon"], "neither a row index nor a timestamp"),
    ("forecast out suffix", ["forecast", "--model", "{ckpt}", "--data", "{data}", "--out", "{root}/f.xlsx"], "expected .csv or .parquet"),
    ("plot suffix", ["forecast", "--model", "{ckpt}", "--data", "{data}", "--plot", "{root}/f.jpg"], "give a .png path"),
    ("generate csv", ["data", "generate", "--out", "{root}/x.csv", "--length", "100"], "writes Parquet"),
    ("generate missing config", ["data", "generate", "--out", "{root}/x.parquet", "--config", "{root}/nope.json"], "cannot read --config"),
    ("describe missing file", ["data", "describe", "{root}/nope.csv", "--no-plot"], "no such file"),
]


@pytest.mark.parametrize("label, argv, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_invocation_ends_in_one_line_and_a_nonzero_exit(files, label, argv, message, capsys):
    code = main([a.format(**files) for a in argv] + (["--quiet"] if argv[0] == "train" and len(argv) > 1 else []))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0, label
    assert len(lines) == 1 and lines[0].startswith("oryx-ts: error: "), err
    assert message in lines[0], lines[0]


def test_corrupted_weights_are_refused_by_forecast(files, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(files["ckpt"], ckpt)
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # a weight byte; the safetensors header stays valid
    weights.write_bytes(bytes(raw))
    assert main(["forecast", "--model", str(ckpt), "--data", str(files["data"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oryx-ts: error: corrupt checkpoint weights") and "model.safetensors" in err


def test_forecast_from_a_checkpoint_without_data_metadata_uses_row_indices(tmp_path, capsys):
    from oryx_ts import save
    from tests.conftest import random_model

    ckpt = save(random_model(), tmp_path / "ckpt")  # trained on an array: no channel names, no clock
    values = demo_stream(400, 4, seed=1).values
    path = tmp_path / "plain.csv"
    pl.DataFrame({f"c{i}": values[:, i] for i in range(4)}).write_csv(path)
    assert main(["forecast", "--model", str(ckpt), "--data", str(path), "--origins", "100"]) == 0
    frame = pl.read_csv(io.StringIO(capsys.readouterr().out))
    assert frame.columns[:4] == ["origin_row", "timestamp", "channel", "step"]
    assert frame["timestamp"].to_list()[:4] == [101] * 4 and frame["channel"].to_list()[:4] == ["c0", "c1", "c2", "c3"]
    assert main(["forecast", "--model", str(ckpt), "--data", str(path), "--channels", "c0,c1,c2"]) == 2
    assert "the model reads 4" in capsys.readouterr().err
