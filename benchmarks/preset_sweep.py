"""Preset sweep: which model shape to train by default on real telemetry, chosen on validation data.

Each candidate is the `debug` preset with some fields changed (`CANDIDATES`; `--candidates` picks
some). Per dataset the rows are split by time as in `oryx-ts backtest` (train `[0, a)`, validation
`[a, b)`, test `[b, L)`), and every candidate is trained by the backtest's own `fit_model` on `[0, b)`
(its validation tail for early stopping is `[a, b)`) under the same wall-clock budget
(`--minutes`), so the sweep answers "what is best for this much CPU time". It is then scored on the
validation part only: the rows `[0, b)` are replayed through the streams engine (`backtest_streams`,
parallel prefill, a fixed 1-in-10 attention schedule), and every token whose origin lies in
`[a - 1, b)` with its whole horizon before `b` is scored (MASE scaled by the seasonal naive error on
`[0, a)`, CRPS as gluonts' weighted quantile loss). The test part is never read, so a backtest of
the chosen preset stays a fair test.

    python benchmarks/preset_sweep.py --dataset household_power --aggregate 60 --horizon 24 --minutes 1.5
    python benchmarks/preset_sweep.py --dataset household_power --rows 200000 --horizon 60 --minutes 1.5

`--merge earlier/preset_sweep.json` adds an earlier run's results (other candidates, same datasets)
to the table. Writes `<out>/preset_sweep.{json,md,png}` (the PNG: validation CRPS and MASE per candidate as ratios
to `debug`'s, one bar per dataset). Several datasets (`--dataset a,b` with one `--aggregate`, `--rows` and
`--horizon` per dataset, comma-separated) share one table; the chosen candidate is the one with the
lowest mean of its CRPS ratios to the `debug` candidate's over the datasets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from oryx_ts.evaluation.backtest import backtest_streams
from oryx_ts.evaluation.job import BacktestSpec, fit_model, load_stream, season_of, split_rows
from oryx_ts.evaluation.metrics import horizon_targets, score_forecasts, seasonal_scale
from oryx_ts.routers import FixedRouter, RoutedForecaster

# name -> overrides of the `debug` preset (d_model 64, 2 layers, patch 8, batch 8 x 128 tokens, lr 3e-3)
CANDIDATES: dict[str, list[str]] = {
    "debug": [],
    "wide": ["block.d_model=128", "block.head_dim_k=16", "block.head_dim_v=32"],
    "deep": ["block.n_layers=4"],
    "patch4": ["tokenizer.patch_len=4", "train.window_tokens=256"],
    "patch16": ["tokenizer.patch_len=16", "train.window_tokens=64"],
    "lr1e-3": ["train.lr=1e-3"],
    "narrow": ["block.d_model=32", "block.head_dim_k=8", "block.head_dim_v=8"],
    "wd0.1": ["train.weight_decay=0.1"],
    "batch16": ["train.batch_size=16"],
    # univariate ("uni"): one 1-channel model learns from every channel, each channel a series of its own
    "uni": [],
    "uni-patch16": ["tokenizer.patch_len=16", "train.window_tokens=64"],
    "uni-deep": ["block.n_layers=4"],
    "uni-patch16-phase": ["tokenizer.patch_len=16", "train.window_tokens=64", "train.any_phase=true"],
    "uni-wide": ["block.d_model=128", "block.head_dim_k=16", "block.head_dim_v=32"],
    "wide-deep": ["block.d_model=128", "block.head_dim_k=16", "block.head_dim_v=32", "block.n_layers=3"],
}


def validation_scores(model, values_LC: np.ndarray, a: int, b: int, horizon: int, period: int) -> dict:
    """Scores of `model` on the validation part `[a, b)`, from a replay of `[0, b)` alone."""
    P = model.config.tokenizer.patch_len
    s = b % P
    x = values_LC[s:b]
    routed = RoutedForecaster(model, FixedRouter(10))
    C = x.shape[1]
    streams = {"v": x} if model.config.tokenizer.channels == C else {str(c): x[:, c : c + 1] for c in range(C)}
    got = backtest_streams(routed, streams, history=len(x))
    forecasts = np.concatenate([got[sid].forecasts_THzCQ for sid in streams], axis=2)
    T = len(x) // P
    ends_T = s + (np.arange(T) + 1) * P - 1
    keep = np.flatnonzero((ends_T >= a - 1) & (ends_T + horizon <= b - 1))
    target = horizon_targets(values_LC[:b], ends_T[keep], horizon)
    pred = forecasts[keep, :horizon]
    scores = score_forecasts(pred, target, tuple(model.config.head.quantiles), scale_C=seasonal_scale(values_LC[:a], period))
    return {k: float(v) for k, v in scores.items()} | {"origins": int(len(keep))}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    datasets = args.dataset.split(",")
    n = len(datasets)

    def per(value: str, cast):
        items = [None if v in ("", "none") else cast(v) for v in value.split(",")]
        return items * n if len(items) == 1 else items

    aggregates, rows, horizons = per(args.aggregate, int), per(args.rows, int), per(args.horizon, int)
    names = args.candidates.split(",") if args.candidates else list(CANDIDATES)
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    bar = tqdm(total=n * len(names), desc="preset sweep")
    for ds, agg, nrows, hz in zip(datasets, aggregates, rows, horizons):
        spec0 = BacktestSpec(dataset=ds, aggregate=agg or 1, rows=nrows, horizon=hz, progress=False)
        stream = load_stream(spec0)
        L = len(stream)
        a, b = split_rows(L, spec0.split)
        period = season_of(stream, None, a)
        label = f"{ds}" + (f" /{agg}" if agg and agg > 1 else "") + (f" [:{nrows}]" if nrows else "")
        for name in names:
            spec = BacktestSpec(dataset=ds, aggregate=agg or 1, rows=nrows, horizon=hz, overrides=tuple(CANDIDATES[name]),
                                univariate=name.startswith("uni"),
                                max_minutes=args.minutes, train_steps=args.steps, progress=False, out=str(out / "models" / f"{ds}-{name}"))
            began = time.perf_counter()
            model, info = fit_model(spec, stream, a, b, Path(spec.out))
            trained = time.perf_counter() - began
            scores = validation_scores(model, stream.values, a, b, hz, period)
            results.append({"dataset": label, "candidate": name, "overrides": CANDIDATES[name], "rows": L, "split": [a, b],
                            "horizon": hz, "season": period, "steps": info["steps"], "train_seconds": round(trained, 1),
                            "best_step": info["best_step"], "best_val_loss": info["best_val_loss"],
                            "parameters": sum(p.numel() for p in model.parameters()), **scores})
            bar.set_postfix_str(f"{label} {name}: CRPS {scores['crps']:.4f}")
            bar.update()
    bar.close()
    if args.merge:  # results of an earlier run (other candidates on the same datasets) join the table
        earlier = json.loads(Path(args.merge).read_text())["results"]
        results = [r for r in earlier if (r["dataset"], r["candidate"]) not in {(q["dataset"], q["candidate"]) for q in results}] + results
        names = list(dict.fromkeys(r["candidate"] for r in results))
    labels = list(dict.fromkeys(r["dataset"] for r in results))
    base = {r["dataset"]: r["crps"] for r in results if r["candidate"] == "debug"}
    ratio = {c: float(np.mean([r["crps"] / base[r["dataset"]] for r in results if r["candidate"] == c])) for c in names} if len(base) == len(labels) else {}
    chosen = min(ratio, key=ratio.get) if ratio else None
    report = {"date": time.strftime("%Y-%m-%d"), "minutes_per_candidate": args.minutes, "threads": args.threads,
              "results": results, "crps_vs_debug": ratio, "chosen": chosen}
    (out / "preset_sweep.json").write_text(json.dumps(report, indent=2))
    write_md(report, out / "preset_sweep.md")
    plot(results, labels, names, out / "preset_sweep.png")
    return report


def write_md(report: dict, path: Path) -> None:
    lines = ["| dataset | candidate | changes to `debug` | parameters | steps | best step | validation MASE | validation CRPS | coverage | CRPS / debug |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["dataset"]: r["crps"] for r in report["results"] if r["candidate"] == "debug"}
    for r in report["results"]:
        rel = f"{r['crps'] / base[r['dataset']]:.3f}" if r["dataset"] in base else "-"
        lines.append(f"| {r['dataset']} | {r['candidate']} | {', '.join(r['overrides']) or '-'} | {r['parameters']:,} | {r['steps']} | "
                     f"{r['best_step']} | {r['mase']:.3f} | {r['crps']:.4f} | {r['coverage']:.2f} | {rel} |")
    if report["crps_vs_debug"]:
        lines += ["", "Mean CRPS ratio to `debug` over the datasets: "
                  + ", ".join(f"{c} {v:.3f}" for c, v in sorted(report["crps_vs_debug"].items(), key=lambda kv: kv[1]))
                  + f". Chosen: **{report['chosen']}**."]
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], labels: list[str], names: list[str], path: Path) -> None:
    """Validation CRPS and MASE of every candidate as a ratio to the `debug` candidate's on the same dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        rows = {r["candidate"]: r for r in results if r["dataset"] == label}
        x = np.arange(len(names)) + j * width
        for ax, key in zip(axes, ("crps", "mase")):
            base = rows["debug"][key] if "debug" in rows else np.nan
            ax.bar(x, [rows[c][key] / base if c in rows else np.nan for c in names], width, label=label)
    for ax, key in zip(axes, ("validation CRPS / debug's", "validation MASE / debug's")):
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(names)) + width * (len(labels) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylabel(key)
        ax.set_ylim(0.8, 1.15)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("preset candidates, same training time each, scored on the validation part (below 1: better than debug)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="household_power", help="comma-separated datasets (packaged names or files)")
    p.add_argument("--aggregate", default="60", help="per dataset, comma-separated (1: raw)")
    p.add_argument("--rows", default="none", help="per dataset: keep the first rows after aggregation (none: all)")
    p.add_argument("--horizon", default="24", help="per dataset, comma-separated")
    p.add_argument("--candidates", default=None, help=f"comma-separated subset of {', '.join(CANDIDATES)}")
    p.add_argument("--minutes", type=float, default=1.5, help="training wall-clock budget per candidate")
    p.add_argument("--steps", type=int, default=5000, help="planned steps (the time budget fits the schedule to it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/preset_sweep")
    p.add_argument("--merge", default=None, help="preset_sweep.json of an earlier run whose results join this one's table")
    args = p.parse_args()
    report = run(args)
    print((Path(args.out) / "preset_sweep.md").read_text())
    print(f"chosen: {report['chosen']}")


if __name__ == "__main__":
    main()
