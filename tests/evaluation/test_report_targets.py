"""The backtest report's target rows: oryx against the best peer and against seasonal naive, by hand."""

import pytest

from oryx_ts.evaluation.report import targets


def _sc(mase, crps, in_mase=None, in_crps=None):
    inside = None if in_mase is None else {"mase": in_mase, "crps": in_crps}
    return {"overall": {"mase": mase, "crps": crps}, "inside_windows": inside}


def test_targets_by_hand():
    scores = {"oryx": _sc(0.70, 0.020, 1.5, 0.07), "oryx_frozen": _sc(0.1, 0.001, 0.1, 0.001),
              "seasonal_naive": _sc(1.0, 0.040, 1.6, 0.06), "deepar": _sc(0.80, 0.018, 1.4, 0.08)}
    rows = {r["target"]: r for r in targets(scores)}
    assert set(rows) == {"MASE <= best peer", "CRPS <= best peer", "MASE in windows <= best peer", "CRPS in windows <= best peer",
                         "MASE <= 0.75 x seasonal naive", "CRPS <= 0.55 x seasonal naive"}
    r = rows["MASE <= best peer"]  # oryx_frozen is not a peer
    assert (r["peer"], r["bound"], r["holds"]) == ("deepar", 0.80, True) and r["margin"] == pytest.approx(0.70 / 0.80 - 1)
    r = rows["CRPS <= best peer"]
    assert (r["peer"], r["holds"]) == ("deepar", False) and r["margin"] == pytest.approx(0.020 / 0.018 - 1)
    assert rows["MASE in windows <= best peer"]["peer"] == "deepar" and not rows["MASE in windows <= best peer"]["holds"]
    assert rows["CRPS in windows <= best peer"]["peer"] == "seasonal_naive" and not rows["CRPS in windows <= best peer"]["holds"]
    assert rows["MASE <= 0.75 x seasonal naive"]["bound"] == pytest.approx(0.75) and rows["MASE <= 0.75 x seasonal naive"]["holds"]
    r = rows["CRPS <= 0.55 x seasonal naive"]
    assert r["bound"] == pytest.approx(0.022) and r["holds"]


def test_targets_without_windows_or_peers():
    assert targets({"oryx": _sc(0.7, 0.02)}) == []
    rows = targets({"oryx": _sc(0.7, 0.02), "nhits": _sc(0.9, 0.03)})
    assert [r["target"] for r in rows] == ["MASE <= best peer", "CRPS <= best peer"]  # no windows, no seasonal naive
