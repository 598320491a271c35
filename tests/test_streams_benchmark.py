"""The streams benchmark script runs end to end at its `--quick` size and writes every section's figures."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_streams_benchmark_writes_every_section(tmp_path):
    plot = tmp_path / "state.png"
    # no time target here (CI machines vary): the timeout only guards against a hang
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "streams.py"), "--quick", "--out", str(tmp_path), "--plot", str(plot)],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = tmp_path.glob("streams_*.json")
    result = json.loads(path.read_text())
    assert result["quick"] and result["threads"] == 2 and result["block"] == {"retention": "bounded", "window": 128, "pinned": 16}

    assert {(r["variant"], r["adapter"]) for r in result["latency"]} == {(v, a) for v in ("recurrent", "routed") for a in (True, False)}
    for r in result["latency"]:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and 0 < r["bare_p50_ms"] <= r["bare_p99_ms"] and r["p50_over_bare"] > 0, r
    assert {(r["series"], r["adapter"]) for r in result["throughput"]} == {(32, True), (128, True), (32, False)}
    for r in result["throughput"]:
        for key in ("flush_rate", "ingest_flush_rate", "bare_rate", "flush_over_bare", "ingest_flush_over_bare"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)

    bounded, grown = result["state"]["bounded"], result["state"]["all"]
    assert bounded["patches_reached"] > 0 and grown["patches_reached"] > 0
    assert {s[1] for s in bounded["samples"]} == {bounded["samples"][0][1]} and bounded["samples"][0][1] > 0  # constant under bounded retention
    assert grown["samples"][-1][1] > grown["samples"][0][1] > 0  # retention `all` keeps every token
    assert plot.stat().st_size > 0

    rss = result["rss"]
    assert rss["rounds"] > 0 and rss["patches"] == rss["rounds"] * rss["series"] and rss["rss_min_after_warmup"] > 0
    prof = result["profile"]
    assert 0 < prof["engine_own_tottime_share"] < 1 and prof["engine_functions"] and prof["top_tottime"]
    assert {t["target"] for t in result["targets"]} >= {"one series, p50 per patch <= 1 ms (adaptation on)",
                                                        "state bytes per series constant (bounded retention)"}
    assert "| target | measured | met? |" in run.stdout
