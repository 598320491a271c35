"""`oryx-ts sweep` is the third user's whole job, so it runs end to end here: killed midway by SIGKILL, resumed, complete, with no finished trial run again."""

import json
import os
import signal
import time

import numpy as np
import pytest

from tests.tune.conftest import CLI, kill_group
from oryx_ts.tune.pareto import pareto_mask


def _finals(storage) -> dict[str, list[float]]:
    """Per trial, the CRPS of every final (`complete`) report in its result file."""
    finals: dict[str, list[float]] = {}
    for result in storage.glob("trainable_*/result.json"):
        for line in result.read_text().splitlines():
            if line.strip() and (r := json.loads(line)).get("complete"):
                finals.setdefault(r["trial_id"], []).append(r["crps"])
    return finals


def _completed(storage) -> set[str]:
    return set(_finals(storage))


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_killed_then_resumed(tmp_path, drivers):
    storage, out = tmp_path / "budget-quick", tmp_path / "report"
    args = [*CLI, "sweep", "--quick", "--storage", str(storage), "--out", str(out), "--cpus", "2"]
    proc = drivers.start(args, tmp_path / "first.log")
    deadline = time.time() + 150
    while len(_completed(storage)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    done_before = _completed(storage)
    assert proc.poll() is None, f"the sweep ended before it could be killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    assert len(done_before) >= 2, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    kill_group(proc.pid)

    rc = drivers.run([*args, "--resume"], tmp_path / "resume.log", timeout=200)
    assert rc == 0, (tmp_path / "resume.log").read_text()[-3000:]
    starts = [json.loads(line) for line in (storage / "_oryx" / "starts.jsonl").read_text().splitlines()]
    # A trial that finished just before the kill, before Tune's experiment state recorded it, is started
    # again by the resume, but from its done-checkpoint: it re-reports its metrics and runs nothing.
    again = [s for s in starts if s["time"] > killed_at and s["trial_id"] in done_before]
    assert all(s["restored"] for s in again), f"finished trials ran again from scratch after the resume: {again}"
    finals = _finals(storage)
    assert all(len(set(finals[s["trial_id"]])) == 1 for s in again), finals  # the same metrics, not a new run
    assert {s["trial_id"] for s in starts} == {r["trial_id"] for r in json.loads((out / "budget-quick_trials.json").read_text())}

    report = json.loads((out / "budget-quick_pareto.json").read_text())
    rows = report["rows"]
    fractions = sorted(r["config/budget.fraction"] for r in rows)
    assert len(rows) >= 6 and len(set(fractions)) >= 4 and report["excluded"] == 0
    points = np.array([[r["crps"], r["flops_share"]] for r in rows])
    front = np.array([r["on_front"] for r in rows])
    assert pareto_mask(points, ["min", "min"]).tolist() == front.tolist()
    for i in np.flatnonzero(front):  # nothing dominates a front point
        assert not any((points[j] <= points[i]).all() and (points[j] < points[i]).any() for j in range(len(points)))
    by_budget = sorted(rows, key=lambda r: r["config/budget.fraction"])
    flops = [r["flops_per_token"] for r in by_budget]
    assert flops == sorted(flops) and flops[0] < flops[-1], flops  # realized FLOPs grow with the budget
    assert by_budget[-1]["flops_share"] == pytest.approx(1.0) and by_budget[0]["surcharge_share"] == pytest.approx(0.0)
    assert (out / "budget-quick_pareto.png").stat().st_size > 1000 and report["chosen"] is not None
