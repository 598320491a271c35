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
Real data (`--stream nab|household`, `evaluation.routing.real_stream`): the `debug` forecaster and the
label-free router trained on a part of the series without labelled windows, the rest streamed as one
series at every budget: windows reached within their first 3 patches, first attention token per window,
realized FLOPs.
The label-free router's target is `--target`: `gain` (default; where attention lowers the frozen
forecaster's own loss, `routers.training.train_gain_router`, with the surprise term beside it) or
`surprise` (the earlier objective). `--window` (budget window W, 0 = a whole segment), `--hold`
(hysteresis), `--spike-feature` (a surprise feature whose own spikes may spend the reserve,
`BudgetConfig.spike_feature`) and `--threshold` (`ema`, the running threshold, or `window`, the
budget window's own quantile lowered by the attention it has left unspent, `BudgetConfig.threshold`)
set the budget of every run. Then the budget window's effect: the learned, surprise and
oracle routers at 10% under each of `--windows`. Last, the targets table: per stream (evaluation
seed and fresh seeds) the learned router's in-window MAE against all-recurrent and all-attention, the
share of all-attention's gain it keeps and event recall, each against its target with the miss; on
streams with repeats, before it, the look-up inside repeats (`evaluation.routing.lookup`: the share of
an exact copy's gain over all-recurrent that all-attention recovers) on the same seeds.
`--checkpoint DIR` streams a trained forecaster instead of training one (its own config is scored;
`benchmarks/checkpoints/programs-lookup` and `daily-lookup` are trained on a GPU by
`benchmarks/train_lookup.py`); the routers are trained against it, frozen, either way. On real data,
`--checkpoint-router` routes with the learned router saved beside the checkpoint instead of training
one (so that two runs of the same model and router differ only in their budget), and `--reserve` sets
the controller's reserve (0.5 unless given; the synthetic streams choose theirs on validation).
Writes `results.json`, `routing.png`, `stream.png` and the
trained model with its label-free router (`model/`). The streams are `oryx_ts.datasets.scenarios`,
the training recipes `oryx_ts.routers.training`, the scoring `oryx_ts.evaluation.routing`.

    python benchmarks/routing.py [--stream anomalies|programs|daily] [--out runs/routing] [--quick] [--threads 1] [--checkpoint DIR]
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import oryx_ts
from oryx_ts.checkpoint import load_router
from oryx_ts.config import BudgetConfig, preset
from oryx_ts.datasets.scenarios import EVALUATION_SEED, FRESH_SEEDS, SCENARIOS, VALIDATION_SEED
from oryx_ts.datasets.synthetic import ANOMALY_KINDS
from oryx_ts.evaluation.audit import token_mask
from oryx_ts.evaluation.routing import (
    REAL_STREAMS,
    choose_controller,
    forced_forecast,
    fresh_streams,
    lookup,
    real_routing,
    real_stream,
    routing_scores,
    run_router,
    segments,
    target_gaps,
    window_recall,
)
from oryx_ts.routers import FixedRouter, OracleRouter, RandomRouter, SurpriseRouter
from oryx_ts.routers.training import RECIPES, train_forecaster, train_label_free, train_routers

BUDGETS = (0.05, 0.10, 0.25)
# issue targets at 10%: in-window MAE >= 15% below all-recurrent, <= 5% above all-attention, >= 70% of its gain kept;
# anomaly stream: window recall >= 90% averaged over the fresh seeds
BELOW_REC, OVER_ATT, RECOVERED, ANOMALY_RECALL = 0.15, 0.05, 0.70, 0.90


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", choices=sorted(SCENARIOS) + list(REAL_STREAMS), default="anomalies",
                    help="a labelled synthetic scenario, or real data: nab (NAB machine temperature), household (UCI household power)")
    ap.add_argument("--out", default="runs/routing")
    ap.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    ap.add_argument("--checkpoint", help="reuse this trained forecaster instead of training one")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--target", choices=("gain", "surprise"), default="gain", help="the label-free router's target (RouterConfig.target)")
    ap.add_argument("--gain-lookahead", type=int, default=0, help="RouterConfig.gain_lookahead")
    ap.add_argument("--window", type=int, default=128, help="budget window W in tokens (0: a whole segment)")
    ap.add_argument("--hold", type=int, default=0, help="BudgetConfig.hold: tokens held in attention after a score sends one")
    ap.add_argument("--spike-feature", type=int, default=-1,
                    help="BudgetConfig.spike_feature: a surprise feature whose own spikes may spend the reserve (1: the worst channel's error; -1 off)")
    ap.add_argument("--threshold", choices=("ema", "window"), default="ema",
                    help="BudgetConfig.threshold: the running threshold (ema) or the budget window's quantile (window)")
    ap.add_argument("--reserve", type=float, default=0.5,
                    help="real data: BudgetConfig.reserve (default 0.5, the anomaly stream's choice; synthetic streams choose it on validation)")
    ap.add_argument("--checkpoint-router", action="store_true",
                    help="real data: route with the learned router saved beside --checkpoint instead of training one")
    ap.add_argument("--windows", type=ints, default=(128, 1024, 0), help="budget windows whose effect is measured at 10%% (0: a whole segment)")
    ap.add_argument("--fresh-seeds", type=ints, default=FRESH_SEEDS, help="further fresh streams, at 10%%")
    args = ap.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stream in REAL_STREAMS:
        return route_real_data(args, out, started)

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

    quick = {"steps": config.router.steps} if args.quick else {}  # the routers' training at the --quick size, a checkpoint's too
    if args.checkpoint:
        model = oryx_ts.load(args.checkpoint)
        if (model.config.tokenizer, model.config.head) != (config.tokenizer, config.head):
            raise SystemExit(f"{args.checkpoint}: its tokenizer and head differ from the {args.stream} recipe's, so its scores would not compare")
        config = model.config  # scores and FLOPs of the model that runs
    else:
        model = train_forecaster(config, train_values, recall_steps=recall_steps)
    router_config = dataclasses.replace(model.config.router, target=args.target, gain_lookahead=args.gain_lookahead, **quick)
    router, supervised = train_routers(model, train_values, train_windows, events, router=router_config)
    learned = {"learned": router, "learned+labels": supervised}
    if args.target != "surprise":  # the earlier label-free objective, side by side
        learned["learned (surprise)"] = train_label_free(model, train_values, router=dataclasses.replace(router_config, target="surprise"))
    oryx_ts.save(model, out / "model", router=router)
    print(f"trained forecaster and routers ({time.time() - started:.0f}s); checkpoint {out / 'model'}")

    window = args.window or seg_tokens
    base = BudgetConfig(window=window, hold=args.hold, spike_feature=args.spike_feature, threshold=args.threshold)
    print(f"label-free router: target {args.target}, gain lookahead {args.gain_lookahead}; budget window {window} tokens, hold {args.hold}, "
          f"spike feature {args.spike_feature}, threshold {args.threshold}")
    (reserve, spike_z), trials = choose_controller(model, router, scenario, seg_tokens, n_seg, budget=base)
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
    runs = [(f, name) for f in BUDGETS for name in ("fixed 1-in-k", "random", "surprise", *learned, "oracle")]
    for f, name in tqdm(runs, desc="routing runs"):
        budget = dataclasses.replace(base, fraction=f, reserve=reserve, spike_z=spike_z)
        r = {"fixed 1-in-k": FixedRouter(round(1 / f)), "random": RandomRouter(f, seed=1), "surprise": SurpriseRouter(),
             "oracle": oracle, **learned}[name]
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

    at10 = dataclasses.replace(base, fraction=0.10, reserve=reserve, spike_z=spike_z)
    effect = []
    compared = {k: v for k, v in learned.items() if k != "learned+labels"}
    for w, hold in [(w, h) for w in args.windows for h in sorted({0, args.hold})]:
        b = dataclasses.replace(at10, window=w or seg_tokens, hold=hold)
        for name, r in (*compared.items(), ("oracle", oracle)):
            forecast, modes, flops, allow = run_router(model, x, r, b)
            effect.append({"window": b.window, "hold": hold, "router": name,
                           **routing_scores(modes, forecast, values, windows, flops_T=flops, allowance_T=allow, **score)})
    if effect:
        print(f"\nThe budget window and the hold at 10% (reserve {reserve}, spike_z {spike_z}), evaluation stream:")
        print("| window (tokens) | hold | router | event recall | FLOPs / budget | MAE events | MAE repeats | MAE all |\n|" + "---|" * 8)
        for r in effect:
            print(f"| {r['window']} | {r['hold']} | {r['router']} | {fmt(r['window_recall'])} | {fmt(r['realized_over_budget'])} | "
                  f"{fmt(r['mae_in'])} | {fmt(r['mae_repeat'])} | {fmt(r['mae_all'])} |")

    seeds = args.fresh_seeds[:1] if args.quick else args.fresh_seeds
    further = fresh_streams(model, {**compared, "surprise": SurpriseRouter(), "random": RandomRouter(0.10, seed=1)},
                            at10, scenario, seg_tokens, n_seg, seeds)
    print("\nAt 10% on further fresh streams (nothing was chosen on them): event windows recalled, MAE inside event windows")
    names = [*compared, "surprise", "random"]
    print("| seed | all-recurrent MAE | all-attention MAE | " + " | ".join(f"{n} recall | {n} MAE" for n in names) + " |\n|"
          + "---|" * (3 + 2 * len(names)))
    for r in further:
        cells = " | ".join(f"{r[n]['recalled']}/{r[n]['windows']} | {r[n]['mae_in']:.3f}" for n in names)
        print(f"| {r['seed']} | {r['all-recurrent']['mae_in']:.3f} | {r['all-attention']['mae_in']:.3f} | {cells} |")
    looked_up = []
    if "recurring_repeat" in events:
        print("\nThe look-up inside repeats (MAE all-recurrent, all-attention, exact copy of the earlier play; share of the copy's gain):")
        print("| seed | repeats | all-recurrent | all-attention | exact copy | share recovered |\n|" + "---|" * 6)
        for seed in (EVALUATION_SEED, *seeds):
            r = {"seed": seed, **lookup(model, scenario, seed, seg_tokens, n_seg)}
            looked_up.append(r)
            print(f"| {seed} | {r['repeats']} | {r['rec']:.3f} | {r['att']:.3f} | {r['copy']:.3f} | {r['share']:.1%} |")
    recalled = window_recall(decisions[(0.10, "learned")], windows, P, events)
    targets = print_targets(rows, further, args.stream, EVALUATION_SEED, recalled)
    (out / "results.json").write_text(json.dumps({
        "rows": rows,
        "controller": {"reserve": reserve, "spike_z": spike_z, "window": window, "hold": args.hold, "spike_feature": args.spike_feature,
                       "threshold": args.threshold},
        "router": {"target": args.target, "gain_lookahead": args.gain_lookahead}, "window_effect": effect,
        "further_streams": further, "targets": targets, "lookup": looked_up, "checkpoint": args.checkpoint,
        "seconds": time.time() - started}, indent=2))
    plot_summary(out / "routing.png", rows)
    plot_stream(out / "stream.png", values, windows, decisions[(0.10, "learned")], P, seg_tokens)
    print(f"\nwrote {out / 'results.json'}, {out / 'routing.png'}, {out / 'stream.png'} ({time.time() - started:.0f}s)")


def route_real_data(args: argparse.Namespace, out: Path, started: float) -> None:
    """`--stream nab|household`: the `debug` forecaster and the label-free router trained on the stream's
    training part, then the whole evaluation part streamed as one series at every budget."""
    config = preset("debug")
    stream = real_stream(args.stream, config.tokenizer.patch_len)
    P, C = config.tokenizer.patch_len, stream.values.shape[1]
    config = preset("debug", tokenizer={"channels": C})
    if args.quick:
        config = config.replace(train={"steps": 20, "window_tokens": 32}, router={"steps": 10})
        stream = dataclasses.replace(stream, values=stream.values[: 400 * P], windows=[w for w in stream.windows if w.start < 400 * P])
    T = stream.values.shape[0] // P
    print(f"{args.stream}: routing {stream.values.shape[0]} steps x {C} channels ({T} tokens) as one series; "
          f"{len(stream.windows)} windows ({stream.label_source}); forecaster and router trained on {stream.train_values.shape[0]} other steps")
    if args.checkpoint_router and (not args.checkpoint or load_router(args.checkpoint) is None):
        raise SystemExit("--checkpoint-router needs a --checkpoint saved with its learned router")
    model = oryx_ts.load(args.checkpoint) if args.checkpoint else train_forecaster(config, stream.train_values)
    if args.checkpoint_router:
        router = load_router(args.checkpoint)
    else:
        router = train_label_free(model, stream.train_values, router=dataclasses.replace(model.config.router, target=args.target,
                                                                                            gain_lookahead=args.gain_lookahead))
    oryx_ts.save(model, out / "model", router=router)
    # no validation stream here: the anomaly stream's controller choice, reserve 0.5 (unless --reserve) and spike_z 3
    base = BudgetConfig(window=args.window or T, hold=args.hold, reserve=args.reserve, spike_z=3.0, spike_feature=args.spike_feature,
                        threshold=args.threshold)
    rows = []
    for f in tqdm(BUDGETS, desc="budgets"):
        routers = {"fixed 1-in-k": FixedRouter(round(1 / f)), "random": RandomRouter(f, seed=1), "surprise": SurpriseRouter(), "learned": router}
        rows += real_routing(model, routers, [dataclasses.replace(base, fraction=f)], stream)
    print(f"\nbudget window {base.window} tokens, hold {base.hold}, reserve {base.reserve}, spike_z {base.spike_z}, "
          f"spike feature {base.spike_feature}, threshold {base.threshold}; recall: an attention token among a window's first 3 tokens")
    print("| budget | router | windows recalled | first attention token per window | attention rate | FLOPs / budget | surcharge / budget |\n|"
          + "---|" * 7)
    for r in rows:
        firsts = ", ".join("-" if v is None else str(v) for v in r["first_attention"]) if len(r["first_attention"]) <= 8 else "(many)"
        print(f"| {r['budget']:.0%} | {r['router']} | {r['recalled']}/{r['windows']} | {firsts} | {r['attention_rate']:.3f} | "
              f"{r['realized_over_budget']:.3f} | {r['surcharge_over_budget']:.3f} |")
    for r in rows:
        if len(r["by_kind"]) > 1:
            print(f"{r['budget']:.0%} {r['router']}: " + ", ".join(f"{k} {h}/{n}" for k, (h, n) in r["by_kind"].items()))
    (out / "results.json").write_text(json.dumps({"stream": args.stream, "label_source": stream.label_source, "rows": rows,
                                                  "controller": dataclasses.asdict(base), "seconds": time.time() - started}, indent=2))
    print(f"\nwrote {out / 'results.json'} ({time.time() - started:.0f}s)")


def print_targets(rows: list[dict], further: list[dict], stream: str, eval_seed: int, recalled: tuple[int, int]) -> list[dict]:
    """The issue's targets at 10% per stream, each measured figure with its miss; returns the rows.

    `recalled` is the learned router's `(recalled, total)` event windows on the evaluation stream."""
    ref = {r["router"]: r for r in rows if r["budget"] is None}
    (learned,) = [r for r in rows if r["budget"] == 0.10 and r["router"] == "learned"]
    per_seed = [{"seed": eval_seed, "rec": ref["all-recurrent"]["mae_in"], "att": ref["all-attention"]["mae_in"],
                 "learned": learned["mae_in"], "recalled": recalled[0], "windows": recalled[1]}]
    per_seed += [{"seed": r["seed"], "rec": r["all-recurrent"]["mae_in"], "att": r["all-attention"]["mae_in"],
                  "learned": r["learned"]["mae_in"], "recalled": r["learned"]["recalled"], "windows": r["learned"]["windows"]}
                 for r in further]
    miss = lambda short: "-" if np.isnan(short) else "held" if short <= 0 else f"missed by {100 * short:.1f} pt"  # noqa: E731
    print(f"\nTargets at 10% (seed {eval_seed}: the evaluation stream; the others: fresh streams, nothing chosen on them)")
    print(f"| seed | all-recurrent MAE | all-attention MAE | learned MAE | below all-recurrent (>= {BELOW_REC:.0%}) | "
          f"above all-attention (<= {OVER_ATT:.0%}) | gain kept (>= {RECOVERED:.0%}) | event recall |\n|" + "---|" * 8)
    for r in per_seed:
        r.update(target_gaps(r["rec"], r["att"], r["learned"]))
        kept = "no gain" if np.isnan(r["recovered"]) else f"{r['recovered']:.1%}, {miss(RECOVERED - r['recovered'])}"
        print(f"| {r['seed']} | {r['rec']:.3f} | {r['att']:.3f} | {r['learned']:.3f} | {r['below_rec']:.1%}, {miss(BELOW_REC - r['below_rec'])} | "
              f"{r['over_att']:+.1%}, {miss(r['over_att'] - OVER_ATT)} | {kept} | {r['recalled']}/{r['windows']} |")
    fresh = [r["recalled"] / r["windows"] for r in per_seed[1:] if r["windows"]]  # the fresh seeds only
    if stream == "anomalies" and fresh:
        mean = float(np.mean(fresh))
        print(f"anomaly window recall over {len(fresh)} fresh seeds: {mean:.1%} (target {ANOMALY_RECALL:.0%}: {miss(ANOMALY_RECALL - mean)})")
    return per_seed


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
