"""The routing benchmark script runs end to end (its `--quick` size) and reports every router at every budget."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oryx_ts.cli import default_threads

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD = 3600  # seconds; the work is bounded by the --quick sizes, this only stops a hung process
# the CLI's thread default (the idle cores), so that a busy machine slows the run instead of oversubscribing it
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(default_threads()))}


# the daily stream also runs the other target, hysteresis and a whole-segment budget window
EXTRA = {"anomalies": [], "programs": [], "daily": ["--target", "surprise", "--hold", "2", "--window", "0"]}


@pytest.mark.parametrize("stream", ["anomalies", "programs", "daily"])
def test_quick_routing_benchmark_writes_a_full_table(tmp_path, stream):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--quick", "--stream", stream, "--out", str(tmp_path),
                          *EXTRA[stream]], capture_output=True, text=True, timeout=HANG_GUARD, cwd=ROOT, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    routed = [(r["budget"], r["router"]) for r in result["rows"] if r["budget"] is not None]
    routers = ("fixed 1-in-k", "random", "surprise", "learned", "learned+labels", "oracle")
    routers += () if stream == "daily" else ("learned (surprise)",)  # beside the gain target, the surprise one
    assert sorted(routed) == sorted((b, name) for b in (0.05, 0.10, 0.25) for name in routers)
    assert (result["controller"]["reserve"], result["controller"]["spike_z"]) in {(0.3, 2.0), (0.3, 3.0), (0.5, 2.0), (0.5, 3.0)}
    for r in result["rows"]:
        if r["budget"] is not None:
            # the controller's guarantee is per 128-token window; the total over a 160-token segment
            # may pass its allowance by a little (its last tokens share a window with earlier ones)
            assert 0.0 <= r["window_recall"] <= 1.0 and 0.8 < r["realized_over_budget"] < 1.01, r
        assert math.isfinite(r["mae_all"]) and math.isfinite(r["crps_all"]), r
    (further,) = result["further_streams"]  # --quick: one further stream
    assert further["seed"] == 3
    for name in ("learned", "surprise", "random"):
        assert 0 <= further[name]["recalled"] <= further[name]["windows"], further
    assert result["router"]["target"] == ("surprise" if stream == "daily" else "gain")
    assert result["controller"]["window"] == (160 if stream == "daily" else 128)  # --quick segments hold 160 tokens
    effect = [(r["window"], r["hold"], r["router"]) for r in result["window_effect"]]
    compared = ("learned", "oracle") if stream == "daily" else ("learned", "learned (surprise)", "oracle")
    holds = (0, 2) if stream == "daily" else (0,)
    assert effect == [(w, h, name) for w in (128, 1024, 160) for h in holds for name in compared]
    for r in result["window_effect"]:
        # a window of exactly the segment holds its total; a longer one may spend allowance of tokens past the segment's end
        assert r["realized_over_budget"] <= 1.0 + 1e-9 or r["window"] != 160, r
    targets = result["targets"]
    assert [t["seed"] for t in targets] == [1, 3] and all(0 <= t["recalled"] <= t["windows"] for t in targets)
    assert "Targets at 10%" in run.stdout and "| window (tokens) |" in run.stdout
    for name in ("routing.png", "stream.png", "model/config.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_quick_attention_ceiling_reports_every_mode_per_variant(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_ceiling.py"), "--quick", "--jobs", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=HANG_GUARD, cwd=ROOT, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in result["variants"]] == ["as the stream, 25% attention chunks", "as the stream, 50% attention chunks"]
    for r in result["variants"]:
        (per_mode,) = r["mae_in"].values()  # --quick: one evaluation stream
        assert sorted(per_mode) == ["att", "oracle", "rec"]
        assert all(math.isfinite(v) and v > 0 for v in per_mode.values()), r
    assert "| as the stream, 25% attention chunks |" in run.stdout
    assert (tmp_path / "ceiling.png").stat().st_size > 0
