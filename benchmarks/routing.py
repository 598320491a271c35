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
trained model with its label-free router (`model/`). The streams are `oryx_ts.datasets.scenarios`,
the training recipes `oryx_ts.routers.training`, the scoring `oryx_ts.evaluation.routing`.

    python benchmarks/routing.py [--stream anomalies|programs|daily] [--out runs/routing] [--quick]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import oryx_ts
from oryx_ts.config import BudgetConfig
from oryx_ts.datasets.scenarios import EVALUATION_SEED, FRESH_SEEDS, SCENARIOS, VALIDATION_SEED
from oryx_ts.datasets.synthetic import ANOMALY_KINDS
from oryx_ts.evaluation.audit import token_mask
from oryx_ts.evaluation.routing import choose_controller, forced_forecast, fresh_streams, routing_scores, run_router, segments
from oryx_ts.routers import FixedRouter, OracleRouter, RandomRouter, SurpriseRouter
from oryx_ts.routers.training import RECIPES, train_forecaster, train_routers

BUDGETS = (0.05, 0.10, 0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", choices=sorted(SCENARIOS), default="anomalies")
    ap.add_argument("--out", default="runs/routing")
    ap.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    ap.add_argument("--checkpoint", help="reuse this trained forecaster instead of training one")
    args = ap.parse_args()
    started = time.time()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    scenario, recipe = SCENARIOS[args.stream], RECIPES[args.stream]
    events = scenario.events
    config = recipe.config()
    recall_steps = recipe.recall_steps
    if args.quick:
        config = config.replace(train={"steps": 20, "window_tokens": 32}, router={"steps": 10})
        recall_steps = min(recall_steps, 10)
    P, C = config.tokenizer.patch_len, config.tokenizer.channels
    seg_tokens, n_seg = (160, 2) if args.quick else (1280, 4)
    train_values, train_windows = scenario.train_stream(C, length=6000 if args.quick else None)
    values, windows = scenario.stream(seg_tokens * n_seg * P + 64, C, seed=EVALUATION_SEED)
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
    router, supervised = train_routers(model, train_values, train_windows, events)
    oryx_ts.save(model, out / "model", router=router)
    print(f"trained forecaster and routers ({time.time() - started:.0f}s); checkpoint {out / 'model'}")

    (reserve, spike_z), trials = choose_controller(model, router, scenario, seg_tokens, n_seg)
    for t in trials:
        print(f"validation (seed {VALIDATION_SEED}), learned router at 10%: reserve {t['reserve']}, spike_z {t['spike_z']}: "
              f"{t['recalled']}/{t['windows']} windows")
    print(f"controller for every router: reserve {reserve}, spike_z {spike_z}")

    score = dict(config=config, seg_tokens=seg_tokens, events=events)
    rows, decisions = [], {}
    for name, mode in (("all-recurrent", 0.0), ("all-attention", 1.0)):
        forecast = forced_forecast(model, x, mode)
        rows.append({"budget": None, "router": name, **routing_scores(np.full(T, mode), forecast, values, windows, **score)})
    oracle = OracleRouter(token_mask(windows, T, P, kinds=events).reshape(n_seg, seg_tokens))
    runs = [(f, name) for f in BUDGETS for name in ("fixed 1-in-k", "random", "surprise", "learned", "learned+labels", "oracle")]
    for f, name in tqdm(runs, desc="routing runs"):
        budget = BudgetConfig(fraction=f, reserve=reserve, spike_z=spike_z)
        r = {"fixed 1-in-k": FixedRouter(round(1 / f)), "random": RandomRouter(f, seed=1), "surprise": SurpriseRouter(),
             "learned": router, "learned+labels": supervised, "oracle": oracle}[name]
        forecast, modes, flops, allow = run_router(model, x, r, budget)
        scores = routing_scores(modes, forecast, values, windows, flops_T=flops, allowance_T=allow, **score)
        rows.append({"budget": f, "router": name, **scores})
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

    seeds = FRESH_SEEDS[:1] if args.quick else FRESH_SEEDS
    further = fresh_streams(model, {"learned": router, "surprise": SurpriseRouter(), "random": RandomRouter(0.10, seed=1)},
                            BudgetConfig(fraction=0.10, reserve=reserve, spike_z=spike_z), scenario, seg_tokens, n_seg, seeds)
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
