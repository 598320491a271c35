"""The `oryx-ts` command line: demo, train, forecast, and the data tools.

Every user mistake (a bad flag, file, override or dataset) ends in one line on stderr,
`oryx-ts: error: ...`, and a non-zero exit code; never in a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from oryx_ts.config import PRESETS
from oryx_ts.datasets.cli import add_parser as add_data_parser
from oryx_ts.tune.cli import add_parser as add_sweep_parser
from oryx_ts.service.cli import add_parser as add_serve_parser
from oryx_ts.evaluation.cli import add_parser as add_backtest_parser

DUPLICATES = ["error", "first", "last", "mean"]
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the command line."""

    def error(self, message: str) -> None:
        self.exit(2, f"oryx-ts: error: {message} (see `{self.prog} --help`)\n")


def default_threads() -> int:
    """Torch threads for this process: the cores that the 1-minute load average leaves idle (at least 1).

    Measured on a 2-core machine (40 debug-preset training steps): idle, 2 threads take 3.2 s and
    1 thread 4.5 s; beside two busy processes, 1 thread takes 5.4 s and 2 threads 84 s.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, cores - round(load)))


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is None:
        if "OMP_NUM_THREADS" in os.environ:
            return  # the environment already chose
        threads = default_threads()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _read(args: argparse.Namespace, *, channels: list[str] | None, timestamp: str | None, path: str | None = None):
    from oryx_ts.datasets import read

    try:
        return read(path or args.data, timestamp=timestamp, channels=channels, step=args.step,
                    duplicates=args.duplicates, time_format=args.time_format)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e


def _step_seconds(stream) -> int | None:
    return None if stream.step is None else int(stream.step / np.timedelta64(1, "s"))


def _load_config(path: str):
    from oryx_ts.config import OryxConfig

    try:
        return OryxConfig.load(path)
    except OSError as e:
        raise ValueError(f"cannot read --config {path}: {e.strerror or e}") from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"--config {path}: {e}") from e


def _cmd_demo(args: argparse.Namespace) -> int:
    from oryx_ts.demo import run_demo

    _set_threads(args.threads)
    run_demo(args.out, steps=args.steps, length=args.length, progress=not args.quiet)
    return 0


# train flags that set a config field: flag -> (field, what it must be, check)
TRAIN_FLAGS = {
    "horizon": ("head.horizon", "a whole number of steps >= 1", lambda v: v >= 1),
    "patch_len": ("tokenizer.patch_len", "a whole number of steps >= 1", lambda v: v >= 1),
    "val_fraction": ("train.val_fraction", "a fraction in (0, 1)", lambda v: 0 < v < 1),
    "patience": ("train.patience", "a number of validation evaluations >= 0 (0 = no early stopping)", lambda v: v >= 0),
}


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """`section.key=value` items for the train flags given; raises `ValueError` for a bad value or a field also `--set`."""
    items, fields = [], {item.partition("=")[0].strip() for item in args.set or []}
    for name, (key, expected, ok) in TRAIN_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not ok(value):
            raise ValueError(f"{flag} must be {expected}, got {value:g}")
        if key in fields:
            raise ValueError(f"{flag} sets {key}, and --set {key}=... sets it too; give one of them")
        items.append(f"{key}={value}")
    return items


def _check_init_shape(init: str, stored, config, args: argparse.Namespace) -> None:
    """Refuse flags that would change the shape of the weights a fine-tune starts from."""
    for name, key, have, want in (("horizon", "head.horizon", stored.head.horizon, config.head.horizon),
                                  ("patch_len", "tokenizer.patch_len", stored.tokenizer.patch_len, config.tokenizer.patch_len)):
        if have != want:
            flag = "--" + name.replace("_", "-") if getattr(args, name) is not None else f"--set {key}"
            raise ValueError(f"{flag} {want}: the checkpoint {init} has {key}={have}, and its weights have that shape; "
                             "--init keeps it (train a new model, without --init, for another value)")


def _cmd_train(args: argparse.Namespace) -> int:
    from oryx_ts.checkpoint import DataInfo, load, read_config, read_data
    from oryx_ts.config import parse_overrides, preset
    from oryx_ts.train import train

    if args.init and (args.config or args.preset):
        raise ValueError("--init starts from a checkpoint's config; give it without --config or --preset")
    if args.config and args.preset:
        raise ValueError("give --config or --preset, not both")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.val_data and args.val_fraction is not None:
        raise ValueError("give --val-data (a separate validation file) or --val-fraction (the tail of --data), not both")
    if args.val_data and args.workers != 1:
        raise ValueError("--val-data is not supported with --workers; the workers validate on the tail (--val-fraction)")
    overrides = _flag_overrides(args) + (args.set or [])
    _set_threads(args.threads)
    init_data = read_data(args.init) if args.init else None
    channels = args.channels.split(",") if args.channels else (list(init_data.channels) if init_data else None)
    timestamp = args.timestamp or (init_data.timestamp if init_data else None)
    stream = _read(args, channels=channels, timestamp=timestamp)
    values, columns = stream.values, list(stream.channels)
    if init_data is not None:
        init_data.check(columns, _step_seconds(stream), source=args.data)
    data = DataInfo(channels=tuple(columns), step_seconds=_step_seconds(stream), timestamp=timestamp,
                    start=None if stream.start is None else str(stream.start))
    val_values = None
    if args.val_data:
        val_stream = _read(args, channels=columns, timestamp=timestamp, path=args.val_data)
        data.check(list(val_stream.channels), _step_seconds(val_stream), source=f"--val-data {args.val_data}")
        val_values = val_stream.values

    model = None
    if args.init:
        stored = read_config(args.init)
        config = parse_overrides(stored, overrides)
        _check_init_shape(args.init, stored, config, args)
        model = load(args.init, config=config)
    else:
        base = _load_config(args.config) if args.config else preset(args.preset or "debug")
        config = parse_overrides(base.replace(tokenizer={"channels": values.shape[1]}), overrides)
    if config.tokenizer.channels != values.shape[1]:
        raise ValueError(f"the model has {config.tokenizer.channels} channels, {args.data} has {values.shape[1]} ({', '.join(columns)})")
    print(f"training on {values.shape[0]} steps x {values.shape[1]} channels ({', '.join(columns)})"
          + (f" from {args.init}" if args.init else "")
          + f"; horizon {config.head.horizon} steps, patches of {config.tokenizer.patch_len}")
    if args.workers != 1:
        from oryx_ts.tune.train_ray import train_command
        return train_command(args, config, values, model=model, data=data)
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    result = train(config, values, val_values=val_values, model=model, out_dir=args.out, progress=not args.quiet, data=data,
                   max_seconds=max_seconds)
    budget = result.time_budget
    if budget is not None and budget["fitted_steps"] < config.train.steps:
        print(f"time budget {args.max_minutes:g} min: the schedule fitted to {budget['fitted_steps']} of {config.train.steps} steps "
              f"({budget['seconds_per_step']:.2f} s per step)" + (", and the budget ran out at step "
                                                                   f"{budget['steps']}" if budget["stopped_early"] else ""))
    v = result.validation
    where = f"{args.val_data} ({v['rows']} rows)" if args.val_data else f"the last {v['rows']} rows"
    if v["window_tokens"] < config.train.window_tokens:
        where += f", in windows of {v['window_tokens']} patches (training's have {config.train.window_tokens})"
    print(f"validation on {where}: loss {result.val_losses[0]:.4f} -> {result.val_losses[-1]:.4f}, best {v['best_val_loss']:.4f} "
          f"at step {v['best_step']}" + (f"; stopped early at step {result.steps}: {config.train.patience} evaluations "
                                          "without a new best" if v["stopped"] == "patience" else ""))
    kept = "the best step's" if config.train.keep_best else "the last step's"
    print(f"{result.steps} steps in {result.seconds:.0f}s; checkpoint ({kept} weights): {result.checkpoint}")
    return 0


def _resolve_origins(tokens: list[str], stream, patch_len: int) -> list[int]:
    """Row indices of the stream (its regular grid) for `--origins`: indices (negative from the end) or timestamps."""
    rows = len(stream)
    origins = []
    for token in (t.strip() for item in tokens for t in item.split(",")):
        if not token:
            continue
        try:
            row = int(token)
        except ValueError:
            if stream.start is None:
                raise ValueError(f"--origins {token!r}: the file has no timestamp column, so origins are row indices") from None
            try:
                at = np.datetime64(token, "s")
            except ValueError:
                raise ValueError(f"--origins {token!r}: neither a row index nor a timestamp like 2024-01-31T12:00") from None
            offset = (at - stream.start) / stream.step
            if offset != int(offset):
                raise ValueError(f"--origins {token!r} is not on the file's grid ({stream.start} + k x {stream.step})")
            row = int(offset)
        else:
            row = row + rows if row < 0 else row
        if not patch_len - 1 <= row < rows:
            raise ValueError(f"--origins {token!r}: row {row} is outside [{patch_len - 1}, {rows - 1}] "
                             f"(an origin needs one whole patch of {patch_len} rows up to it)")
        origins.append(row)
    if not origins:
        raise ValueError("--origins names no origin")
    return sorted(set(origins))


def forecast_at(model, values: np.ndarray, origins: list[int], *, attention_every: int = 4,
                context: int | None = None) -> np.ndarray:
    """Forecasts `(len(origins), Hz, C, Q)` made at rows `origins` of a `(L, C)` stream (data units).

    For an origin at row r the model reads the longest whole number of patches that ends at r (at
    most `context` tokens), i.e. the head rows before it are dropped, under the fixed schedule
    (token n attends when n % attention_every == attention_every - 1; 0 = all-recurrent). Origins
    that share a patch phase share one causal forward, which gives each the same forecast as a
    forward over its own stream alone.
    """
    import torch

    from oryx_ts.train import fixed_schedule

    P = model.config.tokenizer.patch_len
    x_LC = torch.as_tensor(np.asarray(values, dtype=np.float32))
    out: dict[int, np.ndarray] = {}
    groups: dict[int, list[int]] = {}
    for r in origins:
        groups.setdefault((r + 1) % P if context is None else r, []).append(r)
    with torch.no_grad():
        for key, rows in groups.items():
            end = max(rows) + 1
            start = key if context is None else max(end % P, end - context * P)
            T = (end - start) // P
            modes = torch.zeros(T) if attention_every == 0 else fixed_schedule(T, attention_every)
            forecasts = model(x_LC[None, start:end], modes)[0].numpy()
            for r in rows:
                out[r] = forecasts[(r + 1 - start) // P - 1]
    return np.stack([out[r] for r in origins])


def _forecast_frame(forecasts: np.ndarray, origins: list[int], stream, quantiles: tuple[float, ...]):
    import polars as pl

    N, Hz, C, Q = forecasts.shape
    origin = np.repeat(np.asarray(origins), Hz * C)
    step = np.tile(np.repeat(np.arange(1, Hz + 1), C), N)
    columns = {"origin_row": origin}
    if stream.start is not None:
        columns["origin"] = (stream.start + origin * stream.step).astype("datetime64[us]")
        columns["timestamp"] = (stream.start + (origin + step) * stream.step).astype("datetime64[us]")
    else:
        columns["timestamp"] = origin + step
    columns |= {"channel": np.tile(np.asarray(stream.channels), N * Hz), "step": step}
    flat = forecasts.reshape(N * Hz * C, Q)
    columns |= {f"q{q:g}": flat[:, i] for i, q in enumerate(quantiles)}
    return pl.DataFrame(columns)


def _fan_chart(path: Path, stream, forecasts: np.ndarray, origins: list[int], quantiles: tuple[float, ...]) -> Path:
    """A fan chart per channel (rows) and origin (columns, the last four): 4 horizons of history, then the quantile bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N, Hz, C, Q = forecasts.shape
    shown = list(range(N))[-4:]
    mid = min(range(Q), key=lambda i: abs(quantiles[i] - 0.5))
    fig, axes = plt.subplots(C, len(shown), figsize=(4 + 3.5 * len(shown), 2.4 * C), squeeze=False)
    for j, n in enumerate(shown):
        r = origins[n]
        past = np.arange(max(0, r - 4 * Hz), min(len(stream), r + Hz + 1))
        ahead = np.arange(r + 1, r + Hz + 1)
        origin = f"row {r}" if stream.start is None else str(stream.start + r * stream.step)
        for c in range(C):
            ax = axes[c, j]
            ax.plot(past, stream.values[past, c], color="black", lw=1, label="observed")
            for lo in range(mid):
                ax.fill_between(ahead, forecasts[n, :, c, lo], forecasts[n, :, c, Q - 1 - lo], color="tab:blue", lw=0,
                                alpha=0.15 + 0.15 * lo, label=f"{quantiles[lo]:g}-{quantiles[Q - 1 - lo]:g}")
            ax.plot(ahead, forecasts[n, :, c, mid], color="tab:blue", lw=1.2, label=f"q{quantiles[mid]:g}")
            ax.axvline(r, color="tab:red", alpha=0.5, lw=0.8)
            if j == 0:
                ax.set_ylabel(stream.channels[c])
            if c == 0:
                ax.set_title(f"origin {origin}", fontsize=9)
    axes[0, 0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"forecasts {Hz} steps ahead (rows of the file's grid on the x axis)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cmd_forecast(args: argparse.Namespace) -> int:
    from oryx_ts.checkpoint import load, read_data
    from oryx_ts.config import parse_retention

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"--out {args.out}: unknown format {out.suffix or '(no suffix)'!r}; expected .csv or .parquet")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: the fan chart is written as PNG; give a .png path")
    if args.attention_every < 0:
        raise ValueError(f"--attention-every must be >= 0, got {args.attention_every}")
    if args.context is not None and args.context < 1:
        raise ValueError(f"--context must be >= 1 token, got {args.context}")
    _set_threads(args.threads)
    model = load(args.model, **(parse_retention(args.retention) if args.retention else {}))
    info = read_data(args.model)
    channels = args.channels.split(",") if args.channels else (list(info.channels) if info else None)
    timestamp = args.timestamp or (info.timestamp if info else None)
    stream = _read(args, channels=channels, timestamp=timestamp)
    if info is not None:
        info.check(list(stream.channels), _step_seconds(stream), source=args.data)
    elif stream.n_channels != model.config.tokenizer.channels:
        raise ValueError(f"{args.data} has {stream.n_channels} channels {list(stream.channels)}, "
                         f"the model reads {model.config.tokenizer.channels}")
    P = model.config.tokenizer.patch_len
    origins = _resolve_origins(args.origins or ["-1"], stream, P)
    # a univariate model (`DataInfo.univariate`) forecasts each column as a series of its own
    columns = ([stream.values] if stream.n_channels == model.config.tokenizer.channels
               else [stream.values[:, c : c + 1] for c in range(stream.n_channels)])
    forecasts = np.concatenate([forecast_at(model, v, origins, attention_every=args.attention_every, context=args.context)
                                for v in columns], axis=2)
    frame = _forecast_frame(forecasts, origins, stream, model.config.head.quantiles)
    if out is None:
        sys.stdout.write(frame.write_csv())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        if TABLE_SUFFIXES[out.suffix.lower()] == "csv":
            frame.write_csv(out)
        else:
            frame.write_parquet(out)
        print(f"wrote {out}: {len(origins)} origin(s) x {model.config.head.horizon} steps x {stream.n_channels} channels")
    if args.plot:
        print(f"plot: {_fan_chart(Path(args.plot), stream, forecasts, origins, model.config.head.quantiles)}")
    return 0


def _add_reading(parser: argparse.ArgumentParser, *, defaults: str = "all numeric") -> None:
    parser.add_argument("--timestamp", default=None, help="timestamp column (must be increasing; not a channel)")
    parser.add_argument("--step", default=None, help="resampling step, e.g. 1m or 15min (default: inferred)")
    parser.add_argument("--channels", default=None, help=f"comma-separated channel columns (default: {defaults})")
    parser.add_argument("--duplicates", choices=DUPLICATES, default="error",
                        help="repeated timestamps: refuse (default), keep the first or last, or average them")
    parser.add_argument("--time-format", default=None, help="strftime format of the timestamp column, e.g. '%%d/%%m/%%Y %%H:%%M'")


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $OMP_NUM_THREADS if set, else the cores left idle by the load average)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oryx-ts", description="Oryx multi-mixer streaming forecaster")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and stream on an embedded synthetic telemetry stream")
    demo.add_argument("--out", default="runs/demo", help="output directory (checkpoint, plot)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the debug preset's)")
    demo.add_argument("--length", type=int, default=24_000, help="steps of the generated stream")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads(demo)
    demo.set_defaults(func=_cmd_demo)

    tr = sub.add_parser("train", help="train on a CSV or Parquet file (numeric columns are channels)")
    tr.add_argument("--data", required=True, help="CSV or Parquet file")
    _add_reading(tr, defaults="all numeric, or those of --init")
    tr.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model and training preset (default: debug)")
    tr.add_argument("--config", default=None, help="JSON config file (instead of a preset)")
    tr.add_argument("--init", default=None, metavar="DIR",
                    help="resume or fine-tune from a checkpoint: its config is the base (--set applies), its weights the start")
    tr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="override a config field, parsed by its type, e.g. block.mixer=mamba2, block.rope=false, train.lr=1e-3")
    tr.add_argument("--horizon", type=int, default=None, metavar="STEPS", help="forecast steps (head.horizon; default: the preset's)")
    tr.add_argument("--patch-len", type=int, default=None, metavar="STEPS",
                    help="steps per token (tokenizer.patch_len; default: the preset's)")
    tr.add_argument("--val-data", default=None, metavar="FILE",
                    help="validate on this CSV or Parquet file (same columns and step) and train on all of --data")
    tr.add_argument("--val-fraction", type=float, default=None, metavar="F",
                    help="validate on the last F of --data (train.val_fraction; default: the preset's, 0.15)")
    tr.add_argument("--patience", type=int, default=None, metavar="N",
                    help="stop after N validations in a row without a new best (train.patience; default 0 = off); "
                         "the checkpoint holds the best validation step's weights either way (train.keep_best)")
    tr.add_argument("--max-minutes", type=float, default=None, metavar="M",
                    help="time budget: the step count is cut so that the schedule ends within M minutes")
    tr.add_argument("--out", default="runs/train", help="checkpoint directory")
    tr.add_argument("--workers", type=int, default=1, metavar="N",
                    help="N > 1: data-parallel training on N Ray Train workers (DDP; gloo on CPU, NCCL on GPUs; needs the tune extra)")
    tr.add_argument("--quiet", action="store_true")
    _add_threads(tr)
    tr.set_defaults(func=_cmd_train)

    fc = sub.add_parser("forecast", help="quantile forecasts from a checkpoint on a CSV or Parquet file")
    fc.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (from train or demo)")
    fc.add_argument("--data", required=True, help="CSV or Parquet file with the model's channels")
    _add_reading(fc, defaults="the columns the model was trained on")
    fc.add_argument("--origins", nargs="+", default=None, metavar="ORIGIN",
                    help="forecast origins: row indices of the file's grid (negative: from the end) or timestamps "
                         "(default: the last row)")
    fc.add_argument("--out", default=None, help="write the forecasts here (.csv or .parquet; default: CSV on stdout)")
    fc.add_argument("--plot", default=None, metavar="PNG", help="also draw a fan chart of the forecasts")
    fc.add_argument("--attention-every", type=int, default=4, metavar="K",
                    help="fixed schedule: every K-th token attends (default 4; 0 = all-recurrent, 1 = all-attention)")
    fc.add_argument("--context", type=int, default=None, metavar="TOKENS", help="read at most this many patches before each origin")
    fc.add_argument("--retention", default=None, metavar="SPEC",
                    help="KV-cache retention of the trained weights: all, or bounded[:WINDOW[:PINNED]] in tokens "
                         "(default: the checkpoint's)")
    _add_threads(fc)
    fc.set_defaults(func=_cmd_forecast)

    add_data_parser(sub)
    add_sweep_parser(sub)
    add_serve_parser(sub)
    add_backtest_parser(sub)
    return parser


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help or a usage error it has already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except ValueError as e:
        print(f"oryx-ts: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"oryx-ts: error: {_one_line(f'{e.strerror or e}: {e.filename}' if e.filename else str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("oryx-ts: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
