"""The Pareto front of a sweep, computed by us from its trials (Ray Tune has none), and its report.

A trial enters only when it completed: its last result carries `complete: True` and every
objective (trials that ASHA stopped early, errored or never finished are left out). Dominance is
the usual one: a point dominates another when it is no worse in every objective and strictly
better in at least one, so exact ties are all on the front.

Outputs: a markdown table (every complete trial, front and chosen point marked), a JSON file, and
a PNG of validation CRPS against realized FLOPs as a share of all-attention, window recall as
colour, the front drawn as a step line and the chosen point starred.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OBJECTIVES", "complete_rows", "pareto_mask", "choose", "front_report", "write_report"]

# what the sweep minimizes or maximizes; the first two draw the plot
OBJECTIVES: dict[str, str] = {"crps": "min", "flops_share": "min", "window_recall": "max"}
PLOT_OBJECTIVES = ("crps", "flops_share")


def pareto_mask(points: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """Non-dominated rows of `points` (N, K) under `senses` ("min"/"max" per column); a boolean (N,).

    NaN in a row makes it worse than any number in that column. O(N^2 K), fine for sweeps.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != len(senses):
        raise ValueError(f"points must be (N, {len(senses)}), got {points.shape}")
    bad = [s for s in senses if s not in ("min", "max")]
    if bad:
        raise ValueError(f"senses must be 'min' or 'max', got {bad}")
    sign = np.array([1.0 if s == "min" else -1.0 for s in senses])
    cost = np.where(np.isnan(points), np.inf, points * sign)  # every column minimized
    mask = np.ones(len(cost), dtype=bool)
    for i in range(len(cost)):
        no_worse = (cost <= cost[i]).all(axis=1)
        better = (cost < cost[i]).any(axis=1)
        mask[i] = not (no_worse & better).any()
    return mask


def complete_rows(results: Sequence[Mapping[str, Any]], objectives: Mapping[str, str] = OBJECTIVES) -> list[dict]:
    """The results of trials that completed (`complete` true and every objective finite)."""
    rows = []
    for r in results:
        if not r.get("complete"):
            continue
        if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in objectives):
            rows.append(dict(r))
    return rows


def choose(rows: Sequence[Mapping[str, Any]], front: np.ndarray, *, tolerance: float = 0.02,
           min_recall: float | None = None) -> int | None:
    """Index of the operating point: the cheapest front point (least `flops_share`) whose CRPS is
    within `tolerance` (relative) of the best CRPS, and whose recall is at least `min_recall` if given.
    Ties in FLOPs go to the lower CRPS. None when no row qualifies."""
    if not len(rows):
        return None
    best = min(r["crps"] for r in rows)
    ok = [i for i, r in enumerate(rows) if front[i] and r["crps"] <= best * (1 + tolerance)
          and (min_recall is None or r["window_recall"] >= min_recall)]
    return min(ok, key=lambda i: (rows[i]["flops_share"], rows[i]["crps"])) if ok else None


def front_report(results: Sequence[Mapping[str, Any]], *, objectives: Mapping[str, str] | None = None,
                 tolerance: float = 0.02, min_recall: float | None = None) -> dict[str, Any]:
    """The front of the complete trials in `results` (dicts of metrics and `config/...` params).

    `objectives` defaults to the plot's two (CRPS and FLOPs share): the front the plot draws.
    Returns `{"objectives", "rows" (complete trials sorted by FLOPs, each with `on_front`),
    "chosen" (index into rows or None), "excluded" (trials left out), "rule"}`.
    """
    objectives = dict(objectives or {k: OBJECTIVES[k] for k in PLOT_OBJECTIVES})
    rows = complete_rows(results, {**objectives, **OBJECTIVES})
    rows.sort(key=lambda r: (r["flops_share"], r["crps"]))
    front = pareto_mask(np.array([[r[k] for k in objectives] for r in rows]).reshape(len(rows), len(objectives)),
                        list(objectives.values())) if rows else np.zeros(0, dtype=bool)
    every = pareto_mask(np.array([[r[k] for k in OBJECTIVES] for r in rows]).reshape(len(rows), len(OBJECTIVES)),
                        list(OBJECTIVES.values())) if rows else np.zeros(0, dtype=bool)
    for r, f, g in zip(rows, front, every):
        r["on_front"], r["on_front_with_recall"] = bool(f), bool(g)
    chosen = choose(rows, front, tolerance=tolerance, min_recall=min_recall)
    rule = f"the cheapest front point (realized FLOPs) with CRPS within {tolerance:.0%} of the best"
    if min_recall is not None:
        rule += f" and window recall >= {min_recall:g}"
    return {"objectives": objectives, "rows": rows, "chosen": chosen, "excluded": len(results) - len(rows), "rule": rule}


def _params(row: Mapping[str, Any]) -> str:
    items = [(k.removeprefix("config/"), v) for k, v in row.items() if k.startswith("config/")]
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(items))


def markdown_table(report: Mapping[str, Any]) -> str:
    """Every complete trial, cheapest first; front points (CRPS and FLOPs; and with recall as a third
    objective) and the chosen point marked."""
    head = ("| settings | CRPS | MAE | FLOPs / token | share of all-attention | surcharge share | window recall "
            "| state bytes | front | front with recall |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for i, r in enumerate(report["rows"]):
        mark = "**chosen**" if i == report["chosen"] else ("yes" if r["on_front"] else "")
        lines.append(f"| {_params(r)} | {r['crps']:.4f} | {r.get('mae', float('nan')):.4f} | {r.get('flops_per_token', float('nan')):,.0f} "
                     f"| {r['flops_share']:.4f} | {r.get('surcharge_share', float('nan')):.3f} | {r['window_recall']:.3f} "
                     f"| {r.get('state_bytes', 0):,} | {mark} | {'yes' if r['on_front_with_recall'] else ''} |")
    return "\n".join(lines)


def plot(report: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """CRPS against realized FLOPs (share of all-attention), recall as colour, front and chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if rows:
        x = np.array([r["flops_share"] for r in rows])
        y = np.array([r["crps"] for r in rows])
        c = np.array([r["window_recall"] for r in rows])
        sc = ax.scatter(x, y, c=c, cmap="viridis", vmin=0, vmax=1, s=40, zorder=3, edgecolors="k", linewidths=0.4)
        fig.colorbar(sc, ax=ax, label="window recall (labelled anomalies)")
        on = np.array([r["on_front"] for r in rows])
        order = np.argsort(x[on])
        ax.step(x[on][order], y[on][order], where="post", color="tab:red", lw=1.2, label="Pareto front", zorder=2)
        for r, xi, yi in zip(rows, x, y):
            label = r.get("config/budget.fraction")
            if label is not None:
                ax.annotate(f"{label:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if report["chosen"] is not None:
            k = report["chosen"]
            ax.scatter([x[k]], [y[k]], marker="*", s=260, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                       zorder=4, label="chosen")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("realized FLOPs / all-attention FLOPs (validation stream)")
    ax.set_ylabel("validation CRPS (normalized units)")
    ax.set_title(title or "accuracy against realized FLOPs (labels: budget fraction)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Sequence[Mapping[str, Any]], out_dir: str | Path, *, name: str = "sweep", title: str = "",
                 tolerance: float = 0.02, min_recall: float | None = None) -> dict[str, Path]:
    """Write `<name>_pareto.md`, `.json` and `.png` to `out_dir`; returns their paths by suffix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = front_report(results, tolerance=tolerance, min_recall=min_recall)
    chosen = report["chosen"]
    text = markdown_table(report)
    if chosen is not None:
        text += f"\n\nChosen: {_params(report['rows'][chosen])} ({report['rule']})."
    text += f"\n{len(report['rows'])} complete trials; {report['excluded']} left out (stopped early, errored or unfinished).\n"
    paths = {suffix: out / f"{name}_pareto.{suffix}" for suffix in ("md", "json", "png")}
    paths["md"].write_text(text)
    paths["json"].write_text(json.dumps(report, indent=2, default=_json_default))
    plot(report, paths["png"], title=title)
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
