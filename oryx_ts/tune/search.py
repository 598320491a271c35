"""`run_sweep`: a space's trials on Ray Tune, resumable, and their results for the Pareto report.

Grid spaces (every parameter a grid, e.g. the budget sweep) run every point `samples` times in
FIFO order. Other spaces are searched: Optuna's NSGA-II (through `OptunaSearch`, multi-objective)
minimizes validation CRPS and realized FLOPs and maximizes window recall, while ASHA stops
trials whose forecaster's validation loss lags at the same training step (`training_step`; only
when the space trains forecasters: over one shared forecaster there is nothing to stop early).

The experiment lives at `storage` (an explicit directory, never ~/ray_results); `resume=True`
continues it with `Tuner.restore`: finished trials keep their results and are not run again,
unfinished ones continue from their last checkpoint. (A trial that finished just before a kill,
before Tune saved its experiment state, is started again, from its done-checkpoint: it
re-reports its stored metrics and runs nothing.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from oryx_ts.tune.pareto import OBJECTIVES
from oryx_ts.tune.spaces import Param, Space
from oryx_ts.tune.trainable import SweepData, SweepSetup, trainable

__all__ = ["run_sweep", "optuna_space", "results_rows"]


def optuna_space(space: Space) -> dict[str, Any]:
    """The space as Optuna distributions (grids become categorical choices)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def dist(p: Param):
        if p.kind in ("grid", "choice"):
            return CategoricalDistribution(list(p.values))
        if p.kind == "int":
            return IntDistribution(int(p.low), int(p.high))
        return FloatDistribution(float(p.low), float(p.high), log=p.kind == "loguniform")

    return {k: dist(p) for k, p in space.params.items()}


def results_rows(result_grid) -> list[dict[str, Any]]:
    """One dict per trial: its last reported metrics, `config/<param>` and `trial_id`, `status`."""
    rows = []
    for r in result_grid:
        metrics = dict(r.metrics or {})
        row = {k: v for k, v in metrics.items() if not isinstance(v, dict) and k != "config"}
        row.update({f"config/{k}": v for k, v in (r.config or {}).items()})
        row["trial_id"] = metrics.get("trial_id")
        row["status"] = "error" if r.error else ("complete" if metrics.get("complete") else "stopped")
        rows.append(row)
    return rows


def run_sweep(
    space: Space,
    *,
    samples: int = 1,
    storage: str | Path,
    resume: bool = False,
    address: str | None = None,
    data: SweepData = SweepData(),
    num_cpus: int | None = None,
    threads_per_trial: int = 1,
    seed: int = 0,
    verbose: int = 1,
) -> list[dict[str, Any]]:
    """Run (or with `resume`, continue) the sweep of `space` at `storage`; returns `results_rows`.

    Starts an embedded local Ray on `num_cpus` cores (default all) unless `address` names a cluster.
    Raises `ValueError` for a new sweep where one already exists (give `resume` or another storage),
    and for `samples < 1`.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from oryx_ts.tune.local import init_ray

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    # training reports (val_loss per step, for ASHA) carry no objectives yet; only the final report does
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    space.check()
    path = Path(storage).resolve()
    cache = path / "_oryx"
    init_ray(address, num_cpus=num_cpus)
    setup = SweepSetup(space=space, run_dir=str(cache), data=data, threads=threads_per_trial)
    fn = tune.with_resources(tune.with_parameters(trainable, setup=setup), {"cpu": threads_per_trial})
    if resume and tune.Tuner.can_restore(str(path)):
        cache.mkdir(parents=True, exist_ok=True)
        tuner = tune.Tuner.restore(str(path), trainable=fn, resume_unfinished=True, resume_errored=True)
        return results_rows(tuner.fit())
    if path.exists() and any(path.glob("experiment_state*.json")):
        raise ValueError(f"a sweep already exists at {path}; give --resume to continue it or another --storage")
    cache.mkdir(parents=True, exist_ok=True)
    cpus = num_cpus or os.cpu_count() or 1
    t = space.base_config().train
    if space.mode == "grid":
        param_space = {k: tune.grid_search(list(p.values)) for k, p in space.params.items()}
        tune_config = tune.TuneConfig(num_samples=samples, max_concurrent_trials=max(1, cpus // threads_per_trial))
    else:
        param_space = None
        import optuna

        searcher = OptunaSearch(space=optuna_space(space), metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()),
                                sampler=optuna.samplers.NSGAIISampler(seed=seed))
        scheduler = None if space.shared_forecaster else ASHAScheduler(
            time_attr="training_step", metric="val_loss", mode="min", max_t=t.steps, grace_period=min(t.val_every, t.steps),
            reduction_factor=2)
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples,
                                      max_concurrent_trials=max(1, cpus // threads_per_trial))
    run_config = tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=verbose,
                                failure_config=tune.FailureConfig(max_failures=1),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    tuner = tune.Tuner(fn, param_space=param_space, tune_config=tune_config, run_config=run_config)
    return results_rows(tuner.fit())
