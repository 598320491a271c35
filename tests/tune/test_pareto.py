"""The sweep's Pareto front is ours (Ray has none), so it is checked against a brute-force front, ties and early-stopped trials included."""

import json

import numpy as np
import pytest

from oryx_ts.tune.pareto import choose, front_report, pareto_mask, write_report


def brute_front(points: np.ndarray, senses: list[str]) -> np.ndarray:
    """Row i is on the front when no row j is at least as good everywhere and better somewhere."""
    sign = np.array([1 if s == "min" else -1 for s in senses])
    cost = points * sign
    out = []
    for i in range(len(cost)):
        dominated = False
        for j in range(len(cost)):
            if all(cost[j][k] <= cost[i][k] for k in range(len(senses))) and any(cost[j][k] < cost[i][k] for k in range(len(senses))):
                dominated = True
        out.append(not dominated)
    return np.array(out)


@pytest.mark.parametrize("seed,n,senses", [(s, n, senses) for s in range(20) for n in (1, 2, 7, 40)
                                            for senses in (["min", "min"], ["min", "min", "max"])])
def test_front_equals_brute_force(seed, n, senses):
    rng = np.random.default_rng(seed)
    # few distinct values: many exact ties in one or all objectives
    points = rng.integers(0, 5, size=(n, len(senses))).astype(float)
    if n > 3:
        points[1] = points[0]  # an exact duplicate: both or neither on the front
    np.testing.assert_array_equal(pareto_mask(points, senses), brute_front(points, senses))


def test_front_continuous_points_and_duplicates():
    rng = np.random.default_rng(0)
    points = rng.random((200, 3))
    points = np.concatenate([points, points[:10]])
    np.testing.assert_array_equal(pareto_mask(points, ["min", "max", "min"]), brute_front(points, ["min", "max", "min"]))


def test_nan_is_worst():
    mask = pareto_mask(np.array([[1.0, np.nan], [2.0, 1.0]]), ["min", "min"])
    assert mask.tolist() == [True, True]
    assert pareto_mask(np.array([[1.0, np.nan], [1.0, 1.0]]), ["min", "min"]).tolist() == [False, True]


def test_bad_senses_and_shapes():
    with pytest.raises(ValueError, match="senses"):
        pareto_mask(np.zeros((2, 2)), ["min", "up"])
    with pytest.raises(ValueError, match="points must be"):
        pareto_mask(np.zeros((2, 3)), ["min", "min"])


def _trial(crps, share, recall=0.5, complete=True, fraction=0.1):
    return {"crps": crps, "flops_share": share, "window_recall": recall, "complete": complete, "mae": crps,
            "flops_per_token": 1e6 * share, "surcharge_share": share, "state_bytes": 100, "config/budget.fraction": fraction}


def test_report_excludes_early_stopped_and_unfinished():
    results = [_trial(0.30, 0.90), _trial(0.28, 0.95), _trial(0.10, 0.50, complete=False),  # stopped early: would dominate
               {"val_loss": 0.2, "training_step": 20}, _trial(0.35, 0.95), _trial(float("nan"), 0.1)]
    report = front_report(results)
    assert len(report["rows"]) == 3 and report["excluded"] == 3
    assert [r["on_front"] for r in report["rows"]] == [True, True, False]  # sorted by FLOPs: 0.90, 0.95 (0.28), 0.95 (0.35)


def test_chosen_is_cheapest_within_tolerance():
    rows = [_trial(0.300, 0.80), _trial(0.289, 0.85), _trial(0.285, 0.90), _trial(0.284, 1.0)]
    report = front_report(rows, tolerance=0.02)
    chosen = report["rows"][report["chosen"]]
    assert chosen["flops_share"] == 0.85  # 0.289 <= 1.02 * 0.284; 0.300 is not
    assert front_report(rows, tolerance=0.0)["rows"][front_report(rows, tolerance=0.0)["chosen"]]["flops_share"] == 1.0
    assert choose([], np.zeros(0, bool)) is None
    # a recall floor no point meets: nothing chosen
    assert front_report(rows, min_recall=0.9)["chosen"] is None


def test_write_report(tmp_path):
    results = [_trial(0.3 - 0.01 * i, 0.8 + 0.03 * i, recall=i / 6, fraction=f) for i, f in enumerate([0, .02, .05, .1, .25, .5, 1])]
    paths = write_report(results, tmp_path, title="test")
    assert paths["png"].stat().st_size > 1000
    table = paths["md"].read_text()
    assert table.count("\n| budget.fraction=") == 7 and "**chosen**" in table
    data = json.loads(paths["json"].read_text())
    assert sum(r["on_front"] for r in data["rows"]) == 7 and data["chosen"] is not None
