"""`oryx-ts backtest`: replay a dataset's test part through the streams engine, next to peers, and report.

`add_parser(subparsers)` registers the `backtest` command on the top-level parser's sub-parsers;
it sets `func(args) -> int` (the exit code). The job itself is `oryx_ts.evaluation.job.run_backtest`.
"""

from __future__ import annotations

import argparse

from oryx_ts.config import PRESETS

__all__ = ["add_parser"]

QUICK = {"rows": 4000, "aggregate": 60, "peer_epochs": 1, "peer_batches": 5, "train_steps": 30, "warmup_tokens": 64}


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated fractions like 0.7,0.1,0.2") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give train,validation,test fractions, e.g. 0.7,0.1,0.2")
    return parts  # type: ignore[return-value]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `backtest` command to `subparsers`; returns its parser."""
    p = subparsers.add_parser(
        "backtest", help="backtest oryx and peers on a dataset's test part (report, JSON, PNGs)",
        description="Split a dataset by time, train (or load) an oryx model and the peers on the rows before the "
                    "test part, replay the test part through the streams engine and score every model at the same origins.")
    p.add_argument("--dataset", required=True, help="a packaged dataset (oryx-ts data list) or a CSV/Parquet file")
    p.add_argument("--timestamp", default=None, help="timestamp column of a file")
    p.add_argument("--channels", default=None, help="comma-separated channel columns (default: all numeric)")
    p.add_argument("--labels", nargs="*", default=None, help="label columns of a file (default: the dataset's labels, else derived)")
    p.add_argument("--step", default=None, help="a file's grid step, e.g. 5min (default: inferred)")
    p.add_argument("--duplicates", choices=["error", "first", "last", "mean"], default="error")
    p.add_argument("--cache", default=None, help="wheel cache of packaged datasets")
    p.add_argument("--aggregate", type=int, default=None, metavar="K", help="mean over blocks of K raw steps (60: minutes to hours)")
    p.add_argument("--rows", type=int, default=None, help="keep only the first ROWS rows (after --aggregate)")
    p.add_argument("--split", type=_fractions, default=(0.7, 0.1, 0.2), help="train,validation,test fractions by time (default 0.7,0.1,0.2)")
    p.add_argument("--horizon", type=int, default=24, help="forecast steps (default 24)")
    p.add_argument("--model", default=None, metavar="DIR", help="oryx checkpoint (default: train one on the rows before the test part)")
    p.add_argument("--preset", default="debug", choices=sorted(PRESETS), help="preset to train (default debug)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config field of the trained model")
    p.add_argument("--univariate", action="store_true",
                   help="train a 1-channel model on every channel, each channel a series of its own (channel-independent)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--max-minutes", type=float, default=None, help="oryx training time budget in minutes")
    p.add_argument("--router", default="surprise", help="none | all | fixed:K | surprise | learned (default surprise)")
    p.add_argument("--budget", type=float, default=0.1, help="share of the attention surcharge (default 0.1)")
    p.add_argument("--adaptation", choices=["on", "off"], default="off", help="online adaptation in the engine (default off)")
    p.add_argument("--peers", default="seasonal_naive", help="comma-separated: seasonal_naive,nhits,patchtst,deepar (or none)")
    p.add_argument("--peer-epochs", type=int, default=10)
    p.add_argument("--peer-batches", type=int, default=50, help="batches per epoch of a learned peer")
    p.add_argument("--peer-batch-size", type=int, default=32)
    p.add_argument("--peer-minutes", type=float, default=2.5, help="wall-clock cap of each learned peer's training")
    p.add_argument("--peer-context", type=int, default=None, help="peers' encoder length in steps (default 4 horizons)")
    p.add_argument("--season", type=int, default=None, help="seasonal period in steps (default: a day of steps, else 1)")
    p.add_argument("--warmup-tokens", type=int, default=None, help="replay only this many tokens before the test part (default: all)")
    p.add_argument("--origin-stride", type=int, default=1, help="score every K-th test token's origin (default 1)")
    p.add_argument("--path", choices=["engine", "prefill"], default="engine",
                   help="stream everything through the engine (default), or prefill the history before the test part in parallel chunks")
    p.add_argument("--retention", default=None, metavar="SPEC",
                   help="the oryx model's KV-cache retention in the replay: all, or bounded[:WINDOW[:PINNED]] in tokens "
                        "(default: the model's own; the weights are unchanged)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short CI run: first {QUICK['rows']} rows (hourly means of a minute dataset), "
                        f"{QUICK['train_steps']} oryx steps, peers {QUICK['peer_epochs']} epoch x {QUICK['peer_batches']} batches")
    p.add_argument("--out", default="runs/backtest", help="output directory (report.md, backtest.json, PNGs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_backtest)
    return p


def _spec(args: argparse.Namespace):
    from oryx_ts.evaluation.job import BacktestSpec
    from oryx_ts.evaluation.peers import PeerBudget

    quick = args.quick
    aggregate = args.aggregate
    if aggregate is None:
        aggregate = QUICK["aggregate"] if quick and args.dataset == "household_power" else 1
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none")
    budget = PeerBudget(epochs=QUICK["peer_epochs"] if quick else args.peer_epochs,
                        batches_per_epoch=QUICK["peer_batches"] if quick else args.peer_batches,
                        batch_size=args.peer_batch_size, max_minutes=args.peer_minutes, context=args.peer_context)
    return BacktestSpec(
        dataset=args.dataset, out=args.out, timestamp=args.timestamp,
        channels=tuple(args.channels.split(",")) if args.channels else None,
        labels=tuple(args.labels) if args.labels else None, step=args.step, duplicates=args.duplicates, cache=args.cache,
        aggregate=aggregate, rows=args.rows if args.rows is not None else (QUICK["rows"] if quick else None),
        split=args.split, horizon=args.horizon, model=args.model, preset=args.preset, univariate=args.univariate, overrides=tuple(args.set),
        train_steps=args.train_steps if args.train_steps is not None else (QUICK["train_steps"] if quick else None),
        max_minutes=args.max_minutes, router=args.router, budget=args.budget, adaptation=args.adaptation == "on",
        peers=peers, peer_budget=budget, season=args.season,
        warmup_tokens=args.warmup_tokens if args.warmup_tokens is not None else (QUICK["warmup_tokens"] if quick else None),
        origin_stride=args.origin_stride, path=args.path, retention=args.retention, progress=not args.quiet,
    )


def cmd_backtest(args: argparse.Namespace) -> int:
    from oryx_ts.cli import _set_threads
    from oryx_ts.datasets import NotFetchedError
    from oryx_ts.evaluation.job import run_backtest

    spec = _spec(args)
    _set_threads(args.threads)
    try:
        result = run_backtest(spec)
    except NotFetchedError as e:
        raise ValueError(str(e)) from e
    s = result.summary
    print(f"{s['dataset']['source']}: {s['origins']['count']} test origins x {s['horizon']} steps; "
          f"oryx path: {s['oryx']['replay']['path']}")
    print(f"{'model':<16}{'MASE':>8}{'CRPS':>8}{'MAE':>10}{'coverage':>10}")
    for name, sc in s["scores"].items():
        o = sc["overall"]
        cov = o.get("coverage")
        print(f"{name:<16}{o['mase']:>8.3f}{o['crps']:>8.3f}{o['mae']:>10.4g}{cov if cov is None else f'{cov:.2f}':>10}")
    print(f"report: {result.files['report']}; json: {result.files['json']}")
    return 0
