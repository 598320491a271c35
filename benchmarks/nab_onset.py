"""NAB onsets: what a causal router could see at the first tokens of each labelled window, and how it ranks.

Loads the forecaster and label-free router that `benchmarks/routing.py --stream nab` saved (`--model`),
streams the NAB machine-temperature series through the engine with the learned router and with the
surprise heuristic at `--fraction` (budget window 128, reserve 0.5, spike_z 3: the routing benchmark's
controller for real data), recording every token's score and surprise features
(`evaluation.onset.onset_trace`), and computes causal statistics of the raw signal
(`evaluation.onset.signal_statistics`). Per window and token 0..`--tokens`-1 it prints each score's value
and its top share (the share of the series' tokens scoring at least as high; a 10% rate catches a token
only at a top share of at most 0.10) over the whole series and over the 128 tokens before it, and how many
attention tokens the budget window through each window's first token had already spent, and (replaying the
controller) the share of tokens that asked for attention and what let them in. `--threshold` picks the
controller's threshold (`BudgetConfig.threshold`).
Writes `onset.json` and `onset.png` (one panel per window: the signal with token boundaries, ~100 tokens
before the window's first token and 20 into it, and the scores' local ranks with the attention tokens).

    python benchmarks/nab_onset.py [--model runs/routing-nab/model] [--out runs/nab-onset]
"""

import argparse
import json
from pathlib import Path

import torch

import oryx_ts
from oryx_ts.checkpoint import load_router
from oryx_ts.config import BudgetConfig
from oryx_ts.evaluation.onset import SIGNAL_STATISTICS, budget_fill, decision_shares, onset_rows, onset_trace, plot_onsets, rank_tables, signal_statistics
from oryx_ts.evaluation.routing import real_stream
from oryx_ts.routers import SurpriseRouter

FEATURES = {0: "mean error", 1: "worst-channel error", 2: "outside interval", 3: "error trend", 5: "dispersion", 6: "flatness"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/routing-nab/model", help="a checkpoint with its learned router (routing.py --stream nab)")
    ap.add_argument("--out", default="runs/nab-onset")
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--window", type=int, default=128, help="budget window, and the span of the local ranks")
    ap.add_argument("--threshold", choices=("ema", "window"), default="ema", help="BudgetConfig.threshold")
    ap.add_argument("--tokens", type=int, default=6, help="first tokens of each window to tabulate")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, router = oryx_ts.load(args.model), load_router(args.model)
    if router is None:
        raise SystemExit(f"{args.model} holds no learned router")
    P = model.config.tokenizer.patch_len
    stream = real_stream("nab", P)
    budget = BudgetConfig(fraction=args.fraction, window=args.window, reserve=0.5, spike_z=3.0, threshold=args.threshold)
    traces = {"learned": onset_trace(model, router, budget, stream.values), "surprise": onset_trace(model, SurpriseRouter(), budget, stream.values)}
    series = {"learned score": traces["learned"].scores_T, "surprise score": traces["surprise"].scores_T}
    series |= {f"f{j} {name}": traces["learned"].surprise_TF[:, j] for j, name in FEATURES.items()}
    series |= {f"raw {k}": v for k, v in signal_statistics(stream.values, P).items()}
    tables = rank_tables(series, args.window)
    rows = onset_rows(tables, stream.windows, P, args.tokens)

    print(f"NAB at {args.fraction:.0%}: attention rate learned {traces['learned'].modes_T.mean():.3f}, "
          f"surprise {traces['surprise'].modes_T.mean():.3f}; top share = share of the {len(traces['learned'].scores_T)} tokens "
          f"scoring at least as high (local: of the {args.window} tokens up to it)")
    print("| window | token | attention (learned) | learned score (top, local) | surprise score (top, local) | "
          "best surprise feature (top) | best raw statistic (top) |\n|" + "---|" * 7)
    for r in rows:
        g = r["start"] // P + r["token"]
        feats = min((k for k in series if k.startswith("f")), key=lambda k: r[k]["top"])
        raw = min((f"raw {k}" for k in SIGNAL_STATISTICS), key=lambda k: r[k]["top"])
        print(f"| {r['window']} | {r['token']} | {'yes' if traces['learned'].modes_T[g] else '-'} | "
              f"{r['learned score']['value']:.3f} ({r['learned score']['top']:.3f}, {r['learned score']['local']:.3f}) | "
              f"{r['surprise score']['value']:.3f} ({r['surprise score']['top']:.3f}, {r['surprise score']['local']:.3f}) | "
              f"{feats} {r[feats]['value']:.2f} ({r[feats]['top']:.3f}) | {raw} {r[raw]['value']:.2f} ({r[raw]['top']:.3f}) |")
    fill = {k: budget_fill(t.modes_T, stream.windows, P, args.window) for k, t in traces.items()}
    print(f"\nAttention tokens among the {args.window - 1} before each window's first token (the budget window pays for about "
          f"{args.fraction * args.window:.1f}): " + "; ".join(f"{k} {v}" for k, v in fill.items()))
    shares = {k: decision_shares(t, budget, model.config) for k, t in traces.items()}
    print("Share of tokens that asked (passed the threshold), ran ordinary attention, ran as spikes past the ordinary budget: "
          + "; ".join(f"{k} {v['asked']:.3f}, {v['ordinary']:.3f}, {v['spike']:.3f} (attention {v['attention']:.3f})" for k, v in shares.items()))
    print("\nPer window, the best top share any series reaches among its first 3 tokens:")
    for i in range(1, len(stream.windows) + 1):
        first3 = [r for r in rows if r["window"] == i and r["token"] < 3]
        best = {k: min(r[k]["top"] for r in first3) for k in series}
        print(f"window {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(best.items(), key=lambda kv: kv[1])))
    (out / "onset.json").write_text(json.dumps({"model": args.model, "budget": budget.fraction, "window": args.window, "rows": rows,
                                                "attention_rate": {k: float(t.modes_T.mean()) for k, t in traces.items()}, "budget_fill": fill, "decisions": shares,
                                                "threshold": args.threshold}, indent=2))
    plot_onsets(out / "onset.png", stream.values, stream.windows, P, traces, window=args.window)
    print(f"\nwrote {out / 'onset.json'}, {out / 'onset.png'}")


if __name__ == "__main__":
    main()
