"""A trial that finished before its driver was killed keeps its own done record, so a resume that finds no
checkpoint of it in Tune's experiment state (the kill came between the last report and the state's save)
re-reports its metrics instead of training again."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")
from ray import tune  # noqa: E402

from oryx_ts.tune import trainable as tr  # noqa: E402


def _fake_tune(monkeypatch, trial_id: str, reports: list):
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)  # Tune's state recorded no checkpoint
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: trial_id))

    class Checkpoint:
        @staticmethod
        def from_directory(d):
            return {p.name: p.read_text() for p in Path(d).iterdir()}

    monkeypatch.setattr(tune, "Checkpoint", Checkpoint)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)))


def test_finished_trial_is_not_trained_again(tmp_path, monkeypatch):
    setup = SimpleNamespace(run_dir=str(tmp_path))
    calls, reports = [], []
    metrics = {"crps": 0.123, "complete": True}

    def fake_run_trial(params, setup, *, report, checkpoint_dir=None):
        done = checkpoint_dir is not None and (checkpoint_dir / tr.DONE_FILE).exists()
        calls.append({"done": done, "metrics": json.loads((checkpoint_dir / tr.DONE_FILE).read_text()) if done else None})
        report(calls[-1]["metrics"] if done else metrics, None)

    monkeypatch.setattr(tr, "run_trial", fake_run_trial)
    _fake_tune(monkeypatch, "abc_00002", reports)

    tr.trainable({"budget.fraction": 0.1}, setup)  # the first run trains and finishes
    assert calls == [{"done": False, "metrics": None}]
    assert json.loads((tmp_path / "done" / "abc_00002.json").read_text()) == metrics
    assert reports[-1][0] == metrics and json.loads(reports[-1][1][tr.DONE_FILE]) == metrics

    tr.trainable({"budget.fraction": 0.1}, setup)  # the resume, with no checkpoint from Tune
    assert calls[-1] == {"done": True, "metrics": metrics}  # from the done record: nothing trained
    assert reports[-1][0] == metrics
    starts = [json.loads(line) for line in (tmp_path / "starts.jsonl").read_text().splitlines()]
    assert [s["restored"] for s in starts] == [False, True]

    _fake_tune(monkeypatch, "abc_00003", reports)  # another trial has no record: it trains
    tr.trainable({"budget.fraction": 0.25}, setup)
    assert calls[-1] == {"done": False, "metrics": None}
