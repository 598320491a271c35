"""`oryx-ts sweep`: Ray Tune sweeps of the budget, shape and router settings, with a Pareto report.

`add_parser(subparsers)` registers the `sweep` command on the top-level parser's sub-parsers; it sets
`func(args) -> int` (the exit code). Ray is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `sweep` command to `subparsers`; returns its parser."""
    parser = subparsers.add_parser(
        "sweep", help="Ray Tune sweep of budget/shape/router settings with a Pareto report",
        description="Run a sweep on embedded labelled synthetic telemetry: each trial trains (or reuses) a forecaster, "
                    "trains its router, backtests through the streams engine and reports CRPS, realized FLOPs and "
                    "window recall; then writes the Pareto table, JSON and PNG.")
    parser.add_argument("--space", default="budget", metavar="NAME|FILE",
                        help="a named space (budget, budget-quick, routing, shape) or a .json/.yaml space file (default budget)")
    parser.add_argument("--samples", type=int, default=1, help="grid: repeats of every point; search: trials (default 1)")
    parser.add_argument("--storage", default=None, metavar="PATH", help="experiment directory (default runs/sweep/<space name>)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep at --storage (Tuner.restore): finished trials are kept")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: an embedded local Ray on this machine's cores)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where the Pareto report goes (default <storage>/report)")
    parser.add_argument("--quick", action="store_true", help="the budget-quick space on shorter streams (smoke tests)")
    parser.add_argument("--cpus", type=int, default=None, help="cores of the embedded Ray (default all)")
    parser.add_argument("--seed", type=int, default=0, help="NSGA-II sampler seed (search spaces)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="chosen point: cheapest within this share of the best CRPS")
    parser.add_argument("--min-recall", type=float, default=None, help="chosen point: also at least this window recall")
    parser.set_defaults(func=_cmd_sweep)
    return parser


def _cmd_sweep(args: argparse.Namespace) -> int:
    from oryx_ts.tune.pareto import write_report
    from oryx_ts.tune.spaces import load_space
    from oryx_ts.tune.trainable import SweepData

    space = load_space("budget-quick" if args.quick and args.space == "budget" else args.space)
    data = SweepData(train_length=8192, val_tokens=320) if args.quick else SweepData()
    storage = Path(args.storage or Path("runs") / "sweep" / space.name)
    out = Path(args.out) if args.out else storage / "report"
    try:
        from oryx_ts.tune.search import run_sweep
        from oryx_ts.tune.local import shutdown_ray
    except ImportError as e:
        raise ValueError(f"oryx-ts sweep needs the tune extra (pip install -e '.[tune]'): {e}") from e
    try:
        rows = run_sweep(space, samples=args.samples, storage=storage, resume=args.resume, address=args.address,
                         data=data, num_cpus=args.cpus, seed=args.seed)
    finally:
        shutdown_ray()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{space.name}_trials.json").write_text(json.dumps(rows, indent=2, default=str))
    paths = write_report(rows, out, name=space.name, tolerance=args.tolerance, min_recall=args.min_recall,
                         title=f"oryx-ts sweep --space {space.name}")
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
