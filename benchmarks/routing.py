"""Routing benchmark: which router spends an expected-FLOPs budget where the stream needs attention.

Three labelled synthetic streams (`--stream`):
- `anomalies` (default): anomaly windows covering about 3% of the steps, plus regime switches. It
  trains the `debug` forecaster, 300 steps. Event windows are the anomaly windows.
- `programs`: the same, plus recurring program runs (a distinctive waveform that replaces a channel
  group's daily cycle and plays again 64-512 steps later, twice) on about 6% of the steps. It trains
  the `debug` forecaster without RoPE by a recall curriculum: 2,000 steps all in attention mode on
  `recall_stream` (waveforms played several times in a row), so that attention learns to look the
  past up, then 2,000 mixed-mode steps on telemetry whose program runs repeat often. Event windows
  are all labelled windows: anomalies, regime switches, first plays and repeats of program runs.
- `daily`: the anomalies, plus daily jobs on about 6% of the steps: a waveform added to 2-4
  channels for 96 steps at the same time of day, 7 days in a row, so that a repeat is what ran one
  day (36 tokens) earlier. It trains the `debug` forecaster with 16 key dims and RoPE base 100 for
  3,000 mixed-mode steps, half the chunks in attention mode, on telemetry whose jobs cover 30% of
  the steps. Event windows are all labelled windows.
Then it trains a learned router without labels and streams a held-out stream (a fresh seed, cut
into consecutive segments, each replayed as its own series through the streaming engine, the
service's code path: `evaluation.backtest.backtest_streams`) through every router at budgets of
5%, 10% and 25% of the attention surcharge. The controller's reserve and spike threshold are chosen first
on a validation stream (a third seed) with the learned router at 10%, then used unchanged for
every router on the evaluation stream. The learned router is trained without labels (forecast
loss plus the self-supervised surprise objective of `train_router`); a second one
(`learned+labels`) also fits the training stream's labels. Per router and budget it prints window
recall (an attention token among a window's first 3 tokens) over event windows and
over anomaly windows, token precision, realized FLOPs over the allowance, and MAE/CRPS inside event
windows, inside anomaly windows, inside repeats and overall; all-recurrent and all-attention run
as references. Last, at 10%, the learned, surprise and random routers on three further fresh
streams (seeds 3-5), on which nothing was chosen: windows recalled and MAE inside event windows.
Writes `results.json`, `routing.png`, `stream.png` and the
trained model with its label-free router (`model/`).

    python benchmarks/routing.py [--stream anomalies|programs|daily] [--out runs/routing] [--quick]
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import oryx_ts
from oryx_ts.config import BudgetConfig, preset
from oryx_ts.datasets.labels import mask_from_windows
from oryx_ts.datasets.synthetic import ANOMALY_KINDS, KINDS, SyntheticConfig, generate, recall_stream
from oryx_ts.evaluation.audit import rare_regime_audit, token_mask
from oryx_ts.evaluation.backtest import backtest_streams
from oryx_ts.evaluation.metrics import crps_quantiles, horizon_targets, mae
from oryx_ts.flops import mode_costs
from oryx_ts.routers import FixedRouter, LearnedRouter, OracleRouter, RandomRouter, RoutedForecaster, SurpriseRouter
from oryx_ts.train import train, train_router

BUDGETS = (0.05, 0.10, 0.25)
# controller settings tried on a validation stream (seed 2) with the learned router at 10%; the
# best one (most windows recalled, then the first listed) serves every router on the evaluation stream
CONTROLLER_GRID = ((0.3, 2.0), (0.3, 3.0), (0.5, 2.0), (0.5, 3.0))  # (reserve, spike_z)
WARMUP = 16  # tokens of each segment left out of the error metrics while normalization settles
# fresh streams on which nothing (features, router training, controller) was chosen: at 10% they
# show how far the evaluation stream's recall and in-window error carry to other streams
FURTHER_SEEDS = (3, 4, 5)


@dataclass(frozen=True)
class StreamSetup:
    """One benchmark stream and the forecaster training that goes with it."""

    events: tuple[str, ...]  # the labelled kinds that count as event windows
    recurring: dict  # recurring events of the evaluation streams (`SyntheticConfig` fields; empty: none)
    train_recurring: dict  # the same for the forecaster's training stream (dense repeats teach recall)
    train_length: int
    recall_steps: int  # all-attention steps on `recall_stream` before the telemetry (0: none)
    block: dict  # changes to the `debug` preset's block
    train: dict  # changes to the `debug` preset's training


_PROGRAM_RUNS = dict(recurring_replace=True, recurring_min_gap=64, recurring_max_gap=512)
# a job that runs at the same time every day (period 288 steps = 36 tokens), 96 steps long, 7 days in a row
_DAILY_JOBS = dict(recurring_repeats=6, recurring_length=(96, 96), recurring_min_gap=192, recurring_max_gap=192)
STREAMS = {
    "anomalies": StreamSetup(ANOMALY_KINDS, {}, {}, 32768, 0, block={}, train={"steps": 300}),
    "programs": StreamSetup(KINDS, dict(_PROGRAM_RUNS, recurring_rate=0.06, recurring_repeats=2),
                            dict(_PROGRAM_RUNS, recurring_rate=0.45, recurring_repeats=4), 1 << 20, 2000,
                            block={"rope": False}, train={"steps": 2000}),
    # looking a fixed distance back wants keys whose rotary angles resolve single tokens at 36 tokens:
    # 16 key dims at rope base 100 (at base 10,000 the same model learns much less of it; docs/RESULTS.md)
    "daily": StreamSetup(KINDS, dict(_DAILY_JOBS, recurring_rate=0.06), dict(_DAILY_JOBS, recurring_rate=0.3), 1 << 19, 0,
                         block={"head_dim_k": 16, "rope_base": 100.0}, train={"steps": 3000, "attention_fraction": 0.5}),
}


def labelled_stream(length: int, channels: int, seed: int, recurring: dict | None = None):
    """`(values (L, C) float32, windows)`: the project's synthetic telemetry with short, frequent
    anomalies (3% of the steps), regime switches and the given recurring events (none by default)."""
    recurring = recurring or {"recurring_rate": 0.0}
    cfg = SyntheticConfig(
        level_shift_length=(16, 96), variance_burst_length=(16, 96), fault_length=(16, 96), drift_length=(96, 288), **recurring,
    ).with_coverage(anomaly=0.03)
    s = generate(length, channels, seed=seed, config=cfg)
    return s.values, list(s.labels)


def train_forecaster(config, train_values: np.ndarray, *, recall_steps: int, progress: bool = True):
    """With `recall_steps`, the recall curriculum first: all-attention training on `recall_stream`; then mixed-mode training on telemetry."""
    model = None
    if recall_steps:
        recall = config.replace(train={"steps": recall_steps, "attention_fraction": 1.0, "full_mode_fraction": 0.0})
        values = recall_stream(len(train_values), config.tokenizer.channels, period=128, repeats=8, seed=5)
        model = train(recall, values, progress=progress).model
    return train(config, train_values, model=model, progress=progress).model


def segments(values: np.ndarray, seg_tokens: int, n_seg: int, P: int) -> torch.Tensor:
    """The first `n_seg` consecutive segments of `seg_tokens` patches as a batch of series `(n_seg, seg_tokens * P, C)`."""
    return torch.as_tensor(values[: seg_tokens * n_seg * P]).reshape(n_seg, seg_tokens * P, values.shape[1])


def window_recall(modes_T: np.ndarray, windows, P: int, kinds: tuple[str, ...], first_tokens: int = 3) -> tuple[int, int]:
    """(recalled, total) windows of these kinds: an attention token among a window's first tokens."""
    spans = [w for w in windows if w.kind in kinds and w.start // P < len(modes_T)]
    return sum(bool(modes_T[w.start // P : w.start // P + first_tokens].any()) for w in spans), len(spans)


def choose_controller(model, router, seg_tokens: int, n_seg: int, setup: StreamSetup) -> tuple[float, float]:
    """Pick (reserve, spike_z) from CONTROLLER_GRID on a validation stream (seed 2), not the evaluation stream."""
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    values, windows = labelled_stream(seg_tokens * n_seg * P + 64, C, seed=2, recurring=setup.recurring)
    x = segments(values, seg_tokens, n_seg, P)
    best, best_hits = CONTROLLER_GRID[0], -1
    for reserve, spike_z in CONTROLLER_GRID:
        modes = run_router(model, x, router, BudgetConfig(fraction=0.10, reserve=reserve, spike_z=spike_z))[1]
        hits, total = window_recall(modes, windows, P, setup.events)
        print(f"validation (seed 2), learned router at 10%: reserve {reserve}, spike_z {spike_z}: {hits}/{total} windows")
        if hits > best_hits:
            best, best_hits = (reserve, spike_z), hits
    return best


def further_streams(model, routers: dict, budget: BudgetConfig, setup: StreamSetup, seg_tokens: int, n_seg: int, seeds) -> list[dict]:
    """Per fresh stream: event-window recall and MAE inside event windows of each router at `budget`,
    with all-recurrent and all-attention for reference."""
    config = model.config
    P, C = config.tokenizer.patch_len, config.tokenizer.channels
    common = dict(patch_len=P, quantiles=np.asarray(config.head.quantiles), median_index=config.head.median_index,
                  scored=np.tile(np.arange(seg_tokens) >= WARMUP, n_seg), kinds=setup.events)
    rows = []
    for seed in tqdm(seeds, desc="further streams"):
        values, windows = labelled_stream(seg_tokens * n_seg * P + 64, C, seed=seed, recurring=setup.recurring)
        x = segments(values, seg_tokens, n_seg, P)
        row = {"seed": seed}
        with torch.no_grad():
            for name, mode in (("all-recurrent", 0.0), ("all-attention", 1.0)):
                forecast = flatten(model(x, torch.full((n_seg, seg_tokens), mode)))
                row[name] = {"mae_in": rare_regime_audit(np.full(seg_tokens * n_seg, mode), forecast, values, windows, **common).mae_in}
        for name, router in routers.items():
            forecast, modes = run_router(model, x, router, budget)[:2]
            hits, total = window_recall(modes, windows, P, setup.events)
            row[name] = {"recalled": hits, "windows": total, "mae_in": rare_regime_audit(modes, forecast, values, windows, **common).mae_in}
        rows.append(row)
    return rows


def run_router(model, x_BLC: torch.Tensor, router, budget: BudgetConfig) -> tuple[np.ndarray, ...]:
    """Stream every segment of `x_BLC` as its own series through the engine (`backtest_streams`),
    routed by `router` under `budget`; returns per token, segments one after another as `flatten`
    lays them out, `(forecast (T, Hz, C, Q), modes, flops, allowance)`.

    The segments step together in every micro-batch, in the order given, so a `(segments, tokens)`
    oracle mask reads its row of each segment.
    """
    streams = {f"seg{i}": values_LC.cpu().numpy() for i, values_LC in enumerate(x_BLC)}
    result = backtest_streams(RoutedForecaster(model, router, budget), streams)
    fields = ("forecasts_THzCQ", "modes_T", "flops_T", "allowance_T")
    return tuple(np.concatenate([getattr(result[sid], f) for sid in streams]) for f in fields)


def flatten(t: torch.Tensor) -> np.ndarray:
    """Segments (B, T, ...) back into one stream (B*T, ...)."""
    return t.reshape(-1, *t.shape[2:]).cpu().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", choices=sorted(STREAMS), default="anomalies")
    ap.add_argument("--out", default="runs/routing")
    ap.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    ap.add_argument("--checkpoint", help="reuse this trained forecaster instead of training one")
    args = ap.parse_args()
    started = time.time()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    setup = STREAMS[args.stream]
    events = setup.events
    config = preset("debug", block=setup.block, train=setup.train)
    recall_steps = setup.recall_steps
    if args.quick:
        config = config.replace(train={"steps": 20, "window_tokens": 32}, router={"steps": 10})
        recall_steps = min(recall_steps, 10)
    P, C = config.tokenizer.patch_len, config.tokenizer.channels
    seg_tokens, n_seg = (160, 2) if args.quick else (1280, 4)
    train_values, train_windows = labelled_stream(6000 if args.quick else setup.train_length, C, seed=0, recurring=setup.train_recurring)
    values, windows = labelled_stream(seg_tokens * n_seg * P + 64, C, seed=1, recurring=setup.recurring)
    L = seg_tokens * n_seg * P
    x = segments(values, seg_tokens, n_seg, P)
    T = seg_tokens * n_seg
    count = lambda *kinds: sum(w.kind in kinds for w in windows)  # noqa: E731
    print(f"eval stream: {L} steps x {C} channels as {n_seg} segments; event windows cover {token_mask(windows, T, P, kinds=events).mean():.1%} "
          f"of tokens, anomaly windows {token_mask(windows, T, P, kinds=ANOMALY_KINDS).mean():.1%}; {count(*ANOMALY_KINDS)} anomaly, "
          f"{count('regime_switch')} regime-switch, {count('recurring_first')} first-play and {count('recurring_repeat')} repeat windows of recurring events")

    if args.checkpoint:
        model = oryx_ts.load(args.checkpoint)
    else:
        model = train_forecaster(config, train_values, recall_steps=recall_steps)
    router = train_router(model, train_values, progress=True).router
    labelled = model.config.replace(router={"label_weight": 1.0})
    supervised = train_router(model, train_values, router=LearnedRouter(labelled.block.d_model, labelled.router),
                              label_mask=mask_from_windows(train_windows, len(train_values), kind=events), progress=True).router
    oryx_ts.save(model, out / "model", router=router)
    print(f"trained forecaster and routers ({time.time() - started:.0f}s); checkpoint {out / 'model'}")

    reserve, spike_z = choose_controller(model, router, seg_tokens, n_seg, setup)
    print(f"controller for every router: reserve {reserve}, spike_z {spike_z}")

    quantiles, mid = np.asarray(config.head.quantiles), config.head.median_index
    scored = np.tile(np.arange(seg_tokens) >= WARMUP, n_seg)
    rec_T = np.tile(mode_costs(config, 0, seg_tokens).recurrent_T, n_seg)
    ends = np.arange(T) * P + P - 1
    target = horizon_targets(values, ends, config.head.horizon)

    def overall(forecast):
        return mae(forecast[scored][..., mid], target[scored]), crps_quantiles(forecast[scored], target[scored], quantiles)

    def row(budget, name, modes, forecast, flops=None, allow=None):
        common = dict(patch_len=P, quantiles=quantiles, median_index=mid, scored=scored)
        in_events = rare_regime_audit(modes, forecast, values, windows, flops_T=flops, allowance_T=allow, recurrent_T=rec_T,
                                   kinds=events, **common)
        anomalies = rare_regime_audit(modes, forecast, values, windows, kinds=ANOMALY_KINDS, **common)
        repeats = rare_regime_audit(modes, forecast, values, windows, kinds=("recurring_repeat",), **common)
        return {"budget": budget, "router": name, **in_events.to_dict(), "anomaly_recall": anomalies.window_recall,
                "mae_anomaly": anomalies.mae_in, "mae_repeat": repeats.mae_in, **dict(zip(("mae_all", "crps_all"), overall(forecast)))}

    rows, decisions = [], {}
    with torch.no_grad():
        for name, modes in (("all-recurrent", 0.0), ("all-attention", 1.0)):
            forecast = flatten(model(x, torch.full((n_seg, seg_tokens), modes)))
            rows.append(row(None, name, np.full(T, modes), forecast))
    oracle = OracleRouter(token_mask(windows, T, P, kinds=events).reshape(n_seg, seg_tokens))
    runs = [(f, name) for f in BUDGETS for name in ("fixed 1-in-k", "random", "surprise", "learned", "learned+labels", "oracle")]
    for f, name in tqdm(runs, desc="routing runs"):
        budget = BudgetConfig(fraction=f, reserve=reserve, spike_z=spike_z)
        r = {"fixed 1-in-k": FixedRouter(round(1 / f)), "random": RandomRouter(f, seed=1), "surprise": SurpriseRouter(),
             "learned": router, "learned+labels": supervised, "oracle": oracle}[name]
        forecast, modes, flops, allow = run_router(model, x, r, budget)
        rows.append(row(f, name, modes, forecast, flops, allow))
        decisions[(f, name)] = modes

    header = ("| budget | router | event recall | anomaly recall | token precision | FLOPs / budget | surcharge / budget | "
              "MAE events | CRPS events | MAE anomalies | MAE repeats | MAE all | CRPS all |")
    lines = [header, "|" + "---|" * 13]
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for r in rows:
        b = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        lines.append(f"| {b} | {r['router']} | {fmt(r['window_recall'])} | {fmt(r['anomaly_recall'])} | {fmt(r['token_precision'])} | "
                     f"{fmt(r['realized_over_budget'])} | {fmt(r['surcharge_over_budget'])} | {fmt(r['mae_in'])} | {fmt(r['crps_in'])} | "
                     f"{fmt(r['mae_anomaly'])} | {fmt(r['mae_repeat'])} | {fmt(r['mae_all'])} | {fmt(r['crps_all'])} |")
    table = "\n".join(lines)
    print("\n" + table)

    seeds = FURTHER_SEEDS[:1] if args.quick else FURTHER_SEEDS
    further = further_streams(model, {"learned": router, "surprise": SurpriseRouter(), "random": RandomRouter(0.10, seed=1)},
                              BudgetConfig(fraction=0.10, reserve=reserve, spike_z=spike_z), setup, seg_tokens, n_seg, seeds)
    print("\nAt 10% on further fresh streams (nothing was chosen on them): event windows recalled, MAE inside event windows")
    print("| seed | all-recurrent MAE | all-attention MAE | learned recall | learned MAE | surprise recall | random recall |\n|" + "---|" * 7)
    for r in further:
        rec = lambda name: f"{r[name]['recalled']}/{r[name]['windows']}"  # noqa: E731
        print(f"| {r['seed']} | {r['all-recurrent']['mae_in']:.3f} | {r['all-attention']['mae_in']:.3f} | {rec('learned')} | "
              f"{r['learned']['mae_in']:.3f} | {rec('surprise')} | {rec('random')} |")
    (out / "results.json").write_text(json.dumps({"rows": rows, "controller": {"reserve": reserve, "spike_z": spike_z},
                                                  "further_streams": further, "seconds": time.time() - started}, indent=2))
    plot_summary(out / "routing.png", rows)
    plot_stream(out / "stream.png", values, windows, decisions[(0.10, "learned")], P, seg_tokens)
    print(f"\nwrote {out / 'results.json'}, {out / 'routing.png'}, {out / 'stream.png'} ({time.time() - started:.0f}s)")


def plot_summary(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({r["router"] for r in rows if r["budget"] is not None})
    for name in names:
        sel = [r for r in rows if r["router"] == name]
        a1.plot([100 * r["budget"] for r in sel], [r["window_recall"] for r in sel], marker="o", label=name)
        a2.plot([100 * r["budget"] for r in sel], [r["mae_in"] for r in sel], marker="o", label=name)
    for r, style in zip([r for r in rows if r["budget"] is None], ("--", ":")):
        a2.axhline(r["mae_in"], color="gray", ls=style, label=r["router"])
    a1.set(xlabel="budget (% of attention surcharge)", ylabel="event window recall", title="recall of event windows", ylim=(0, 1.05))
    a2.set(xlabel="budget (% of attention surcharge)", ylabel="MAE at event origins", title="forecast error inside event windows")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stream(path: Path, values: np.ndarray, windows, modes: np.ndarray, P: int, seg_tokens: int) -> None:
    """Every channel (standardized, stacked) of the segment with the most labelled windows, with the attention tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_seg = max(1, len(modes) // seg_tokens)
    L = seg_tokens * P
    busiest = max(range(n_seg), key=lambda k: sum(k * L <= w.start < (k + 1) * L for w in windows))
    span = (busiest * L, (busiest + 1) * L)
    t = np.arange(*span)
    seg = values[t]
    z = (seg - np.nanmean(seg, 0)) / (np.nanstd(seg, 0) + 1e-9)
    fig, ax = plt.subplots(figsize=(14, 5))
    for c in range(z.shape[1]):
        ax.plot(t, z[:, c] - 6 * c, color="black", lw=0.5)
    for w in windows:
        if w.start < span[1] and w.end > span[0]:
            ax.axvspan(w.start, w.end, color="orange" if w.kind in ANOMALY_KINDS else "tab:green", alpha=0.25)
    for n in np.flatnonzero(modes[busiest * seg_tokens : (busiest + 1) * seg_tokens] > 0):
        ax.axvline(span[0] + n * P + P - 1, color="tab:red", alpha=0.5, lw=0.6)
    ax.plot([], [], color="tab:red", label="attention token (learned, 10% budget)")
    ax.fill_between([], [], color="orange", alpha=0.25, label="anomaly window")
    ax.fill_between([], [], color="tab:green", alpha=0.25, label="regime switch or recurring event")
    ax.set(xlabel="step", yticks=[], title=f"segment {busiest + 1} of {n_seg} of the evaluation stream, every channel standardized")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
