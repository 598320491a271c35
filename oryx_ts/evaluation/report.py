"""The backtest report: a markdown page and its PNGs, from a `job.BacktestResult`.

Legend: N scored origins, Hz horizon, C channels, Q quantile levels.

PNGs: `fan_charts.png` (oryx's quantile bands around its worst and best origins, with the best
peer's median), `error_by_horizon.png`, `regimes.png` (MASE inside vs outside labelled windows),
`routing.png` (realized FLOPs against the allowance, attention tokens and state bytes over the test
tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oryx_ts.evaluation.metrics import weighted_quantile_loss

if TYPE_CHECKING:
    from oryx_ts.evaluation.job import BacktestResult

__all__ = ["write_report"]

COLORS = {"oryx": "tab:blue", "oryx_frozen": "tab:cyan", "seasonal_naive": "tab:gray", "nhits": "tab:green",
          "patchtst": "tab:orange", "deepar": "tab:purple"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def origin_crps(f_NHzCQ: np.ndarray, target_NHzC: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """Weighted quantile loss of each origin `(N,)` (NaN where nothing is observed)."""
    return np.array([weighted_quantile_loss(f_NHzCQ[i : i + 1], target_NHzC[i : i + 1], quantiles) for i in range(len(f_NHzCQ))])


def best_peer(summary: dict) -> str | None:
    peers = [p for p in summary["scores"] if p not in ("oryx", "oryx_frozen")]
    ranked = sorted((summary["scores"][p]["overall"].get("crps") or np.inf, p) for p in peers)
    return ranked[0][1] if ranked else None


def _fan_charts(result: BacktestResult, path: Path) -> Path:
    plt = _plt()
    s = result.summary
    q = tuple(s["quantiles"])
    mid = int(np.argmin(np.abs(np.asarray(q) - 0.5)))
    f, y, ends = result.forecasts["oryx"], result.target_NHzC, result.ends_N
    err = origin_crps(f, y, q)
    order = np.argsort(np.where(np.isfinite(err), err, -np.inf))
    picks = [("worst", int(order[-1])), ("best", int(np.argsort(np.where(np.isfinite(err), err, np.inf))[0]))]
    peer = best_peer(s)
    C = min(3, y.shape[2])
    H = y.shape[1]
    fig, axes = plt.subplots(C, 2, figsize=(12, 2.6 * C), squeeze=False)
    values = result.stream.values
    for j, (label, i) in enumerate(picks):
        e = int(ends[i])
        past = np.arange(max(0, e - 3 * H), min(len(values), e + H + 1))
        ahead = np.arange(e + 1, e + H + 1)
        for c in range(C):
            ax = axes[c, j]
            ax.plot(past, values[past, c], color="black", lw=0.9, label="observed")
            for lo in range(mid):
                ax.fill_between(ahead, f[i, :, c, lo], f[i, :, c, len(q) - 1 - lo], color="tab:blue", alpha=0.15 + 0.15 * lo,
                                lw=0, label=f"oryx {q[lo]:g}-{q[len(q) - 1 - lo]:g}")
            ax.plot(ahead, f[i, :, c, mid], color="tab:blue", lw=1.2, label="oryx median")
            if peer is not None:
                ax.plot(ahead, result.forecasts[peer][i, :, c, mid], color=COLORS.get(peer, "tab:red"), lw=1, ls="--",
                        label=f"{peer} median")
            for w in result.windows:
                if w.end > past[0] and w.start < past[-1]:
                    ax.axvspan(max(w.start, past[0]), min(w.end, past[-1]), color="tab:red", alpha=0.08, lw=0)
            ax.axvline(e, color="tab:red", lw=0.8, alpha=0.5)
            if c == 0:
                ax.set_title(f"{label} origin (row {e}, oryx CRPS {err[i]:.3f})", fontsize=9)
            if j == 0:
                ax.set_ylabel(result.stream.channels[c], fontsize=8)
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle("oryx forecasts around its worst and best test origins (red: labelled windows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _by_horizon(result: BacktestResult, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for name, sc in result.summary["scores"].items():
        h = np.arange(1, len(sc["by_horizon"]) + 1)
        for ax, key in zip(axes, ("mase", "crps")):
            ax.plot(h, [r.get(key) if r.get(key) is not None else np.nan for r in sc["by_horizon"]], label=name,
                    color=COLORS.get(name), marker=".", lw=1)
    for ax, key in zip(axes, ("MASE", "CRPS (weighted quantile loss)")):
        ax.set_xlabel("horizon step")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _regimes(result: BacktestResult, path: Path) -> Path:
    plt = _plt()
    names = list(result.summary["scores"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    x = np.arange(len(names))
    for ax, key in zip(axes, ("mase", "crps")):
        for k, (where, shift) in enumerate((("inside_windows", -0.2), ("outside_windows", 0.2))):
            vals = [(result.summary["scores"][n][where] or {}).get(key) for n in names]
            ax.bar(x + shift, [v if v is not None else 0 for v in vals], width=0.4, label=where.replace("_", " "),
                   color=("tab:red", "tab:gray")[k], alpha=0.8)
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.set_title(key.upper(), fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"error inside vs outside labelled windows ({result.summary['labels']['source'].split(' (')[0]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _routing(result: BacktestResult, path: Path) -> Path:
    plt = _plt()
    t = result.tokens
    rows = t["origin_row"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 6.5), sharex=True)
    k = max(1, len(rows) // 200)
    kernel = np.ones(k) / k
    smooth = lambda v: np.convolve(v, kernel, mode="same")  # noqa: E731
    axes[0].plot(rows, smooth(t["flops_T"]), lw=1, label=f"realized FLOPs per token (mean over {k})")
    if np.isfinite(t["allowance_T"]).all():
        axes[0].plot(rows, smooth(t["allowance_T"]), lw=1, label="allowance")
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("FLOPs")
    att = rows[t["modes_T"] > 0]
    axes[1].eventplot([att], lineoffsets=0.5, linelengths=0.8, linewidths=0.6, colors="tab:blue")
    for w in result.windows:
        if w.end > rows[0] and w.start < rows[-1]:
            axes[1].axvspan(max(w.start, rows[0]), min(w.end, rows[-1]), color="tab:red", alpha=0.15, lw=0)
    axes[1].set_yticks([])
    axes[1].set_ylabel("attention\ntokens")
    sb = t["state_bytes_T"].astype(float)
    sb[sb < 0] = np.nan
    axes[2].plot(rows, sb / 1024, lw=1)
    axes[2].set_ylabel("state KiB")
    axes[2].set_xlabel("row of the stream (origin of each test token)")
    fig.suptitle(f"oryx routing over the test part: {result.summary['oryx']['router']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


TARGET_VS_NAIVE = {"mase": 0.75, "crps": 0.55}  # the accuracy targets, as shares of seasonal naive's score


def targets(scores: dict[str, Any], model: str = "oryx") -> list[dict[str, Any]]:
    """`model` against the accuracy targets: MASE and CRPS at or below the best peer's, overall and inside
    the windows, and at most `TARGET_VS_NAIVE` of seasonal naive's. Each row: `target`, `value`, `bound`,
    `holds`, `margin` (value / bound - 1: negative holds, positive misses by that share), `peer`.
    Peers are every scored model not named oryx*; rows whose scores are missing are left out."""
    peers = {n: sc for n, sc in scores.items() if not n.startswith("oryx")}
    if model not in scores or not peers:
        return []
    rows = []
    for part, label in (("overall", ""), ("inside_windows", " in windows")):
        mine = scores[model].get(part) or {}
        for key in ("mase", "crps"):
            got = {n: (sc.get(part) or {}).get(key) for n, sc in peers.items()}
            got = {n: v for n, v in got.items() if v is not None and np.isfinite(v)}
            if mine.get(key) is None or not got:
                continue
            best = min(got, key=got.get)
            rows.append({"target": f"{key.upper()}{label} <= best peer", "value": mine[key], "bound": got[best], "peer": best})
    naive = (scores.get("seasonal_naive") or {}).get("overall") or {}
    for key, share in TARGET_VS_NAIVE.items():
        if naive.get(key) and scores[model]["overall"].get(key) is not None:
            rows.append({"target": f"{key.upper()} <= {share:g} x seasonal naive", "value": scores[model]["overall"][key],
                         "bound": share * naive[key], "peer": "seasonal_naive"})
    for r in rows:
        r["holds"] = bool(r["value"] <= r["bound"])
        r["margin"] = float(r["value"] / r["bound"] - 1) if r["bound"] else None
    return rows


def _targets_md(rows: list[dict[str, Any]], model: str) -> list[str]:
    if not rows:
        return []
    lines = [f"Targets ({model}):", "", "| target | value | bound | | by |", "| --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        verdict = "holds" if r["holds"] else "missed"
        by = "" if r["margin"] is None else f"{r['margin']:+.1%}"
        lines.append(f"| {r['target']} | {_fmt(r['value'])} | {_fmt(r['bound'])} ({r['peer']}) | {verdict} | {by} |")
    return lines + [""]


def _markdown(result: BacktestResult, files: dict[str, str]) -> str:
    s = result.summary
    d, sp, o = s["dataset"], s["split"], s["origins"]
    naive = s["vs_seasonal_naive"]
    lines = [f"# Backtest: {d['name'] or d['source']} ({s['date']})", ""]
    replay = s["oryx"]["replay"]
    path = ("engine (`backtest_streams`, the service's code path)" if replay["path"] == "engine" else
            f"engine, with the first {replay['history_rows']:,} of the {replay['tokens'] * o['patch_len']:,} rows replayed "
            "prefilled in parallel chunks (`Engine.prefill`; the whole stream when adaptation is off)")
    model = s["oryx"]["model"]
    per_series = replay.get("series")
    trained = (f"preset `{model['preset']}` trained here on rows [0, {sp['validation'][1]}) for {model['steps']} steps "
               f"({model['seconds']:.0f} s; validation loss {model['val_loss_first']:.3f} -> {model['val_loss_last']:.3f}"
               + (f", best {model['best_val_loss']:.3f} at step {model['best_step']}"
                  + (", whose weights are used)" if model["config"]["train"].get("keep_best", True) else ")")
                  if model.get("best_step") is not None else ")")
               if model.get("preset") else f"checkpoint `{model['source']}`")
    if per_series:
        trained = f"one 1-channel model for all {per_series} channels (each channel a series of its own in the engine), {trained}"
    lines += [
        "| setup | |", "| --- | --- |",
        f"| data | `{d['source']}`: {d['rows']:,} rows x {len(d['channels'])} channels"
        + (f", step {d['step_seconds']} s" if d["step_seconds"] else ", index clock")
        + (f" (means of {d['aggregate']} raw steps)" if d["aggregate"] > 1 else "") + " |",
        f"| split | train [0, {sp['train'][1]}), validation [{sp['validation'][0]}, {sp['validation'][1]}), test [{sp['test'][0]}, {sp['test'][1]}) |",
        f"| origins | {o['count']:,} (rows {o['first']}..{o['last']}, every {o['stride_tokens']} token(s) of {o['patch_len']} steps); "
        f"{o['warmup_tokens']} warm-up tokens before the test part |",
        f"| horizon, levels | {s['horizon']} steps; quantiles {', '.join(f'{q:g}' for q in s['quantiles'])} |",
        f"| MASE scale | seasonal naive error at lag {s['season']} on the training rows |",
        f"| labels | {s['labels']['source']}: {s['labels']['windows']} windows ({', '.join(s['labels']['kinds']) or 'none'}), "
        f"{s['labels']['test_rows_inside']} test rows inside |",
        f"| oryx | {trained}; {s['oryx']['router']}; adaptation {'on' if s['oryx']['adaptation'] else 'off'} |",
        f"| oryx path | {path} |",
        "",
        "CRPS is gluonts' mean weighted quantile loss over the levels above; coverage is the share of targets inside the "
        f"outermost interval (nominal {s['quantiles'][-1] - s['quantiles'][0]:.0%}); MASE uses the median.", "",
        "| model | MAE | RMSE | MASE | CRPS | coverage | MASE in windows | MASE outside | CRPS in windows | MASE / naive | CRPS / naive | training |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, sc in s["scores"].items():
        ov, ins, outs = sc["overall"], sc["inside_windows"] or {}, sc["outside_windows"]
        if name == "oryx":
            budget = f"{model.get('steps', '-')} steps, {model.get('seconds', 0):.0f} s" if model.get("preset") else "checkpoint"
        elif name == "oryx_frozen":
            budget = "same model, adapter off"
        else:
            p = s["peers"][name]
            budget = f"{p.get('training', '')} ({p.get('fit_seconds', 0):.0f} s)"
        lines.append(f"| {name} | {_fmt(ov['mae'])} | {_fmt(ov['rmse'])} | {_fmt(ov['mase'])} | {_fmt(ov['crps'])} | "
                     f"{_fmt(ov.get('coverage'), 2)} | {_fmt(ins.get('mase'))} | {_fmt(outs.get('mase'))} | {_fmt(ins.get('crps'))} | "
                     f"{_fmt(naive[name]['mase'], 2)} | {_fmt(naive[name]['crps'], 2)} | {budget} |")
    lines += [""] + _targets_md(targets(s["scores"]), "oryx")
    lines += ["MASE per channel:", "", "| model | " + " | ".join(d["channels"]) + " |",
              "| --- |" + " ---: |" * len(d["channels"])]
    for name, sc in s["scores"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(sc["per_channel"][c]["mase"]) for c in d["channels"]) + " |")
    audit = replay.get("audit", {})
    lines += ["", "Oryx over the test tokens: attention rate " + _fmt(s["oryx"]["attention_rate_test"])
              + ", realized FLOPs / allowance " + _fmt(s["oryx"]["realized_over_allowance_test"])
              + (f", adaptation gain {_fmt(audit.get('adaptation_gain'))} (pinball, served vs frozen, all replayed tokens), "
                 f"{audit.get('adapter_rollbacks', 0)} rollbacks" if s["oryx"]["adaptation"] else "")
              + f"; replay {replay['seconds']:.1f} s for {replay['tokens']:,} tokens.", ""]
    lines += ["Seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()), ""]
    for key in ("fan_charts", "error_by_horizon", "regimes", "routing"):
        if key in files:
            lines.append(f"![{key}]({Path(files[key]).name})")
    return "\n".join(lines) + "\n"


def write_report(result: BacktestResult, out: str | Path) -> dict[str, str]:
    """Write the PNGs and `report.md` under `out`; returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "fan_charts": str(_fan_charts(result, out / "fan_charts.png")),
        "error_by_horizon": str(_by_horizon(result, out / "error_by_horizon.png")),
        "regimes": str(_regimes(result, out / "regimes.png")),
        "routing": str(_routing(result, out / "routing.png")),
    }
    (out / "report.md").write_text(_markdown(result, files))
    files["report"] = str(out / "report.md")
    return files
