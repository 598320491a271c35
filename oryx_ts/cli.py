"""The `oryx-ts` command line: demo, train, and the data tools."""

import argparse
import json
import sys

from oryx_ts.datasets.cli import add_parser as add_data_parser

def _cmd_demo(args: argparse.Namespace) -> int:
    from oryx_ts.demo import run_demo

    run_demo(args.out, steps=args.steps, length=args.length, progress=not args.quiet)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from oryx_ts.config import OryxConfig, preset
    from oryx_ts.train import train

    config = OryxConfig.load(args.config) if args.config else preset(args.preset)
    from oryx_ts.datasets import read

    channels = args.channels.split(",") if args.channels else None
    try:
        stream = read(args.data, timestamp=args.timestamp, channels=channels, step=args.step)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    values, columns = stream.values, list(stream.channels)
    overrides: dict[str, dict] = {"tokenizer": {"channels": values.shape[1]}}
    for item in args.set or []:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        if not name:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        overrides.setdefault(section, {})[name] = json.loads(raw) if raw[:1] in "[{0123456789-tfn" else raw
    config = config.replace(**overrides)
    print(f"training on {values.shape[0]} steps x {values.shape[1]} channels ({', '.join(columns)})")
    result = train(config, values, out_dir=args.out, progress=not args.quiet)
    print(f"validation loss {result.val_losses[0]:.4f} -> {result.val_losses[-1]:.4f}; checkpoint: {result.checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oryx-ts", description="Oryx multi-mixer streaming forecaster")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and stream on an embedded synthetic telemetry stream")
    demo.add_argument("--out", default="runs/demo", help="output directory (checkpoint, plot)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the debug preset's)")
    demo.add_argument("--length", type=int, default=24_000, help="steps of the generated stream")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    tr = sub.add_parser("train", help="train on a CSV or Parquet file (numeric columns are channels)")
    tr.add_argument("--data", required=True, help="CSV or Parquet file")
    tr.add_argument("--timestamp", default=None, help="timestamp column (must be increasing; not a channel)")
    tr.add_argument("--step", default=None, help="resampling step, e.g. 1m or 15min (default: inferred)")
    tr.add_argument("--channels", default=None, help="comma-separated channel columns (default: all numeric)")
    tr.add_argument("--preset", default="debug", choices=["debug", "small", "base"])
    tr.add_argument("--config", default=None, help="JSON config file (instead of a preset)")
    tr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field, e.g. block.mixer=mamba2")
    tr.add_argument("--out", default="runs/train", help="checkpoint directory")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_cmd_train)

    add_data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"oryx-ts: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
