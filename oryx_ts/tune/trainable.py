"""The sweep's Ray Tune trainable: forecaster -> router -> engine backtest -> audit, one trial per sample.

A trial's sample becomes a typed `OryxConfig` (`Space.config`) first. The forecaster is trained
(through `train_ray.fit`, `train()`'s loop, reporting `val_loss` every `train.val_every` steps for
ASHA with a checkpoint of the loop state) or, when another trial already trained one with the same
training settings, loaded: forecasters are cached under `<run dir>/forecasters/<forecaster_key>`,
one writer at a time (a file lock), so a sweep over routing settings trains once. Then the router
(a `LearnedRouter` trained at the trial's budget fraction; at fraction 0 nothing may attend and
at 1 everything may, so those trials run `NoneRouter` and `AllRouter`), then `backtest_streams`
on labelled validation streams, the engine the service runs.

Reported at the end (with `complete: True` and a checkpoint that marks the trial done, so a
restored sweep does not run it again): `crps`, `mae` (served forecasts, normalized units, pooled
over the validation streams' matured entries), `flops_per_token` (realized), `flops_share`
(realized over all-attention FLOPs of the same tokens, by `oryx_ts.flops`), `surcharge_share`
(attention FLOPs above all-recurrent over those of all-attention), `window_recall` (labelled
anomaly windows with an attention token among their first 3 tokens, pooled), `state_bytes` (largest
per-series state), `realized_over_allowance`, `attention_rate`, and `val_loss` of the forecaster.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oryx_ts.config import OryxConfig
from oryx_ts.tune.spaces import Space, forecaster_key, training_config

__all__ = ["SweepData", "SweepSetup", "run_trial", "trainable"]

DONE_FILE = "trial.json"


@dataclass(frozen=True)
class SweepData:
    """The embedded labelled synthetic telemetry of a sweep (`oryx_ts.datasets.synthetic`).

    Training: one stream of `train_length` steps (seed `train_seed`). Validation:
    `val_segments` fresh streams of `val_tokens` patches (seeds `val_seed`, `val_seed + 1`, ...),
    each its own series in the engine. Anomalies cover `anomaly_coverage` of the steps, in short
    windows, as in the routing benchmark.
    """

    train_length: int = 16384
    val_segments: int = 2
    val_tokens: int = 640
    train_seed: int = 0
    val_seed: int = 1
    anomaly_coverage: float = 0.03

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def _stream(self, length: int, channels: int, seed: int):
        from oryx_ts.datasets.synthetic import SyntheticConfig, generate

        cfg = SyntheticConfig(level_shift_length=(16, 96), variance_burst_length=(16, 96), fault_length=(16, 96),
                              drift_length=(96, 288), recurring_rate=0.0).with_coverage(anomaly=self.anomaly_coverage)
        return generate(length, channels, seed=seed, config=cfg)

    def train_values(self, channels: int) -> np.ndarray:
        return self._stream(self.train_length, channels, self.train_seed).values

    def validation(self, channels: int, patch_len: int) -> tuple[dict[str, np.ndarray], dict[str, list[tuple[int, int]]]]:
        """`(streams {id: (L, C)}, labels {id: [(start, end)]})`: anomaly windows only."""
        from oryx_ts.datasets.synthetic import ANOMALY_KINDS

        streams, labels = {}, {}
        for i in range(self.val_segments):
            s = self._stream(self.val_tokens * patch_len, channels, self.val_seed + i)
            streams[f"val{i}"] = s.values
            labels[f"val{i}"] = [(w.start, w.end) for w in s.labels if w.kind in ANOMALY_KINDS]
        return streams, labels


@dataclass(frozen=True)
class SweepSetup:
    """What every trial of a sweep shares: the space, the run directory (forecaster cache) and the data."""

    space: Space
    run_dir: str
    data: SweepData = SweepData()
    threads: int = 1


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the trial's process ends, however it ends
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _forecaster(config: OryxConfig, setup: SweepSetup, values: np.ndarray, report, resume: Path | None):
    """The trained forecaster for `config`, from the cache or trained now (and cached); and its history."""
    import oryx_ts
    from oryx_ts.tune.train_ray import fit

    train_cfg = training_config(config, setup.space.base_config())
    cache = Path(setup.run_dir) / "forecasters" / forecaster_key(train_cfg, setup.data.key())
    with _locked(cache.with_suffix(".lock")):
        if not (cache / "history.json").exists():
            state, _ = fit(train_cfg, values, resume=resume, on_step=report)
            oryx_ts.save(state.model, cache)
            (cache / "history.json").write_text(json.dumps(state.history))
    history = json.loads((cache / "history.json").read_text())
    return oryx_ts.load(cache, config=config), history  # the trial's retention and budget over the shared weights


def _router(model, config: OryxConfig, values: np.ndarray):
    from oryx_ts.routers import AllRouter, LearnedRouter, NoneRouter
    from oryx_ts.train import train_router

    if config.budget.fraction == 0.0:
        return NoneRouter()
    if config.budget.fraction == 1.0:
        return AllRouter()
    router = LearnedRouter(config.block.d_model, config.router)
    return train_router(model, values, router=router, budget=config.budget, progress=False).router


def summarize(results: dict, config: OryxConfig) -> dict[str, float]:
    """Pooled metrics of `backtest_streams` results (see the module doc)."""
    from oryx_ts.flops import mode_costs

    entries = crps = mae = flops = att = rec = 0.0
    tokens = seen = 0
    recalled = 0.0
    state_bytes, over = 0, []
    for sb in results.values():
        a = sb.audit
        n = a["matured_entries"]
        entries += n
        crps += a["crps_served"] * n
        mae += a["mae_served"] * n
        T = len(sb.flops_T)
        costs = mode_costs(config, 0, T)
        flops += float(sb.flops_T.sum())
        att += float(costs.attention_T.sum())
        rec += float(costs.recurrent_T.sum())
        tokens += T
        windows = a["labelled_windows"]
        if windows and np.isfinite(a["window_recall"]):
            # pooled by labelled windows: the audit gives only its ratio over the windows it saw
            seen += windows
            recalled += a["window_recall"] * windows
        state_bytes = max(state_bytes, int(sb.state_bytes_T.max()) if T else 0)
        over.append(a["realized_over_allowance"])
    return {
        "crps": crps / entries, "mae": mae / entries, "flops_per_token": flops / tokens, "flops_share": flops / att,
        "surcharge_share": (flops - rec) / (att - rec), "window_recall": recalled / seen if seen else float("nan"),
        "windows": seen, "state_bytes": state_bytes, "realized_over_allowance": float(np.nanmax(over)),
        "attention_rate": float(np.mean([float(sb.modes_T.mean()) for sb in results.values()])),
    }


def run_trial(params: dict[str, Any], setup: SweepSetup, *, report, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """One trial outside Ray: `report(metrics, loop_state_or_None)` is called during training and once at the end.

    `checkpoint_dir`: a restored trial's checkpoint (a loop state to resume, or the finished trial's metrics).
    """
    from oryx_ts.evaluation.backtest import backtest_streams
    from oryx_ts.routers import RoutedForecaster

    torch.set_num_threads(setup.threads)
    began = time.perf_counter()
    config = setup.space.config(params)
    if checkpoint_dir is not None and (checkpoint_dir / DONE_FILE).exists():
        metrics = json.loads((checkpoint_dir / DONE_FILE).read_text())
        report(metrics, None)
        return metrics
    C, P = config.tokenizer.channels, config.tokenizer.patch_len
    values = setup.data.train_values(C)

    def on_step(state, record):
        if "val_loss" in record and record["step"] < state.model.config.train.steps:
            report({"training_step": record["step"], "val_loss": record["val_loss"], "complete": False}, state)

    resume = checkpoint_dir if checkpoint_dir is not None and (checkpoint_dir / "loop.pt").exists() else None
    model, history = _forecaster(config, setup, values, on_step, resume)
    router = _router(model, config, values)
    streams, labels = setup.data.validation(C, P)
    results = backtest_streams(RoutedForecaster(model, router, config.budget), streams, labels=labels)
    metrics = {**summarize(results, config), "val_loss": history[-1]["val_loss"], "training_step": config.train.steps,
               "trial_seconds": time.perf_counter() - began, "complete": True}
    report(metrics, None)
    return metrics


def trainable(params: dict[str, Any], setup: SweepSetup) -> None:
    """The Ray Tune function trainable (`tune.with_parameters(trainable, setup=...)`)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    done = _done_record(setup, tune.get_context().get_trial_id())
    _log_start(setup, params, restored=checkpoint is not None or done.exists())

    def report(metrics: dict, loop_state) -> None:
        with tempfile.TemporaryDirectory() as d:
            if loop_state is not None:
                loop_state.save(d)
            else:
                Path(d, DONE_FILE).write_text(json.dumps(metrics))
                # the trial's own record, written before Tune hears of the end: a driver killed after this
                # report but before its experiment state recorded the checkpoint resumes the trial from here
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(metrics))
                os.replace(tmp, done)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    if done.exists():  # finished before a kill: report the same metrics, run nothing
        with tempfile.TemporaryDirectory() as d:
            Path(d, DONE_FILE).write_text(done.read_text())
            run_trial(params, setup, report=report, checkpoint_dir=Path(d))
    elif checkpoint is None:
        run_trial(params, setup, report=report)
    else:
        with checkpoint.as_directory() as d:
            run_trial(params, setup, report=report, checkpoint_dir=Path(d))


def _done_record(setup: SweepSetup, trial_id: str) -> Path:
    """Where a finished trial keeps its final metrics in the run directory (`done/<trial id>.json`)."""
    folder = Path(setup.run_dir) / "done"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{trial_id}.json"


def _log_start(setup: SweepSetup, params: dict, *, restored: bool) -> None:
    """Append this start to `<run dir>/starts.jsonl` (trial id, whether it starts from saved progress: a
    checkpoint or the trial's done record): how tests see re-runs."""
    from ray import tune

    ctx = tune.get_context()
    line = json.dumps({"trial_id": ctx.get_trial_id(), "restored": restored, "params": params,
                       "pid": os.getpid(), "time": time.time()}, default=str)
    with open(Path(setup.run_dir) / "starts.jsonl", "a") as f:
        f.write(line + "\n")
