"""What a causal router can see at the onset of labelled windows, and how it ranks among every token.

Legend: T tokens, L raw steps, P patch length, C channels, F surprise features, S signal statistics.

A routed run (`onset_trace`) records, per token, what the router saw and what it made of it: its
score, the causal surprise features (`routers.features`) and the mode the controller chose. Beside
them, `signal_statistics` gives label-free, causal statistics of the raw signal per token (how far
the patch's level, its change and its spread lie from the tokens before it). `rank_tables` then
ranks every token's values among all tokens of the series: a token's *top share* is the share of
tokens whose value is at least its own (1/T for the largest), so a score that sends the top 10% of
tokens to attention catches it only when its top share is at most 0.10. The local top share
compares it only with the `window` tokens before it, as an adaptive threshold over a budget window does.
`onset_rows` reads the first tokens of each window out of those tables, `budget_fill` counts what the
budget window through a window's first token had already spent, `decision_shares` replays the controller
to tell how many tokens asked and what let them in, and `plot_onsets` draws them.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from oryx_ts.config import BudgetConfig, OryxConfig
from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.model import OryxForecaster
from oryx_ts.routers import Router, RouterInputs
from oryx_ts.routers.budget import ControllerState, HoldState, RankState, controller_run

__all__ = ["OnsetTrace", "RecordingRouter", "SIGNAL_STATISTICS", "budget_fill", "decision_shares", "local_top_share", "onset_rows", "onset_trace", "plot_onsets",
           "rank_tables", "signal_statistics", "top_share"]

SIGNAL_STATISTICS = ("level", "deviation", "change", "spread")


class RecordingRouter:
    """A router that scores as `router` does and keeps what every call saw: scores and surprise features."""

    def __init__(self, router: Router):
        self.router, self.needs_surprise = router, router.needs_surprise
        self.scores_BT: list[torch.Tensor] = []
        self.surprise_BTF: list[torch.Tensor] = []

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        s = self.router.scores(inputs)
        self.scores_BT.append(s.detach().float().cpu())
        self.surprise_BTF.append(inputs.surprise_BTF.detach().float().cpu())
        return s


@dataclass(frozen=True)
class OnsetTrace:
    """One series routed token by token: what the router saw (`surprise_TF`), its `scores_T` and the `modes_T` it got."""

    scores_T: np.ndarray
    surprise_TF: np.ndarray
    modes_T: np.ndarray


def onset_trace(model: OryxForecaster, router: Router, budget: BudgetConfig, values_LC: np.ndarray) -> OnsetTrace:
    """Stream `values_LC` as one series through the engine (`evaluation.routing.run_router`) and record every token.

    Raises `ValueError` for a router that does not read surprise (its tokens are scored in one
    parallel call, not one call per token, so there is nothing per token to record).
    """
    from oryx_ts.evaluation.routing import run_router

    if not router.needs_surprise:
        raise ValueError(f"{type(router).__name__} reads no surprise: record a router that streams")
    recorder = RecordingRouter(router)
    modes = run_router(model, torch.as_tensor(values_LC)[None], recorder, budget)[1]
    scores = torch.cat(recorder.scores_BT, dim=1)[0].numpy()
    surprise = torch.cat(recorder.surprise_BTF, dim=1)[0].numpy()
    assert scores.shape == modes.shape, (scores.shape, modes.shape)
    return OnsetTrace(scores, surprise, np.asarray(modes))


def signal_statistics(values_LC: np.ndarray, patch_len: int, history: int = 100) -> dict[str, np.ndarray]:
    """Causal statistics `(T,)` of each token's patch against the `history` tokens before it (NaN steps skipped):

    - `level`: two-sided rank of the patch mean among the patch means of every earlier token:
      `max(q, 1 - q)` with q the share of earlier means below it (1 = a level never seen before);
    - `deviation`: |patch mean - mean of the history's patch means| over their standard deviation;
    - `change`: |patch mean - the previous patch mean| over the median of that change over the history;
    - `spread`: the patch's standard deviation over the median of the history's.
    The worst channel counts. The first token (no history) gets 0 everywhere.
    """
    L, C = values_LC.shape
    T = L // patch_len
    patches = np.asarray(values_LC[: T * patch_len], dtype=np.float64).reshape(T, patch_len, C)
    mean_TC, std_TC = np.nanmean(patches, axis=1), np.nanstd(patches, axis=1)
    step_TC = np.abs(np.diff(mean_TC, axis=0, prepend=mean_TC[:1]))
    out = {k: np.zeros(T) for k in SIGNAL_STATISTICS}
    tiny = 1e-9
    for n in range(1, T):
        past = slice(max(0, n - history), n)
        q = (mean_TC[:n] < mean_TC[n]).mean(0)
        out["level"][n] = np.max(np.maximum(q, 1 - q))
        out["deviation"][n] = np.max(np.abs(mean_TC[n] - mean_TC[past].mean(0)) / (mean_TC[past].std(0) + tiny))
        if n >= 2:
            out["change"][n] = np.max(step_TC[n] / (np.median(step_TC[max(1, n - history) : n], axis=0) + tiny))
        out["spread"][n] = np.max(std_TC[n] / (np.median(std_TC[past], axis=0) + tiny))
    return out


def top_share(values_T: np.ndarray) -> np.ndarray:
    """`(T,)`: per token, the share of tokens whose value is at least its own (1/T for the largest, 1 for the smallest)."""
    v = np.asarray(values_T, dtype=np.float64)
    ranked = np.sort(v)
    return (len(v) - np.searchsorted(ranked, v, side="left")) / len(v)


def local_top_share(values_T: np.ndarray, window: int) -> np.ndarray:
    """`(T,)`: per token, the share of itself and the `window - 1` tokens before it whose value is at least its own."""
    v = np.asarray(values_T, dtype=np.float64)
    return np.array([(v[max(0, n - window + 1) : n + 1] >= v[n]).mean() for n in range(len(v))])


def rank_tables(series: dict[str, np.ndarray], window: int) -> dict[str, dict[str, np.ndarray]]:
    """Per named `(T,)` series: its `value`, `top` share among all tokens and `local` top share over `window` tokens."""
    return {name: {"value": np.asarray(v, dtype=np.float64), "top": top_share(v), "local": local_top_share(v, window)}
            for name, v in series.items()}


def onset_rows(tables: dict[str, dict[str, np.ndarray]], windows: Sequence[LabelWindow], patch_len: int,
               tokens: int = 6) -> list[dict]:
    """Per window, its first `tokens` tokens (0 = the token its start falls in): every series' value and top shares.

    Returns `[{"window": i, "start": step, "token": n, <name>: {"value", "top", "local"}, ...}]`.
    """
    rows = []
    for i, w in enumerate(windows):
        first = w.start // patch_len
        for n in range(tokens):
            g = first + n
            rows.append({"window": i + 1, "start": w.start, "token": n,
                         **{name: {k: float(t[k][g]) for k in t} for name, t in tables.items()}})
    return rows


def decision_shares(trace: OnsetTrace, budget: BudgetConfig, config: OryxConfig) -> dict[str, float]:
    """Replay a trace's scores through the controller (`routers.budget.controller_run`) and give the share of
    tokens that `asked` (passed the threshold), ran as `ordinary` attention, or ran as a `spike` past the
    ordinary budget, and the `attention` rate. Raises `ValueError` when the replay does not give the trace's
    modes (a budget other than the run's, or one with a spike feature, whose signal a trace does not keep)."""
    if budget.spike_feature >= 0:
        raise ValueError("a trace keeps no spike signal: replay only budgets without a spike feature")
    why: dict[str, np.ndarray] = {}
    modes = controller_run(trace.scores_T[None].astype(np.float64), ControllerState.init(1, budget.window), budget, config, 0,
                           HoldState.init(1), rank=RankState.init(1, budget.window), why=why)[0][0]
    if not np.array_equal(modes, trace.modes_T):
        raise ValueError("the replay does not give the trace's modes: is this the budget it ran under?")
    return {"attention": float(modes.mean()), **{k: float(v.mean()) for k, v in why.items()}}


def budget_fill(modes_T: np.ndarray, windows: Sequence[LabelWindow], patch_len: int, window: int) -> list[int]:
    """Per labelled window, the attention tokens among the `window - 1` tokens before its first token: what a
    budget window through that token has already spent (at a rate f it pays for about `f * window` in all)."""
    firsts = [w.start // patch_len for w in windows]
    return [int(np.asarray(modes_T)[max(0, g - window + 1) : g].sum()) for g in firsts]


def plot_onsets(path, values_LC: np.ndarray, windows: Sequence[LabelWindow], patch_len: int, traces: dict[str, OnsetTrace], *,
                before: int = 100, after: int = 20, window: int = 128) -> None:
    """One panel per window: the raw signal from `before` tokens ahead of the window's first token to `after`
    tokens into it, token boundaries marked, the window shaded, and below it each trace's local top share
    of its score (the score's rank over the `window` tokens before it) with its attention tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P = patch_len
    fig, axes = plt.subplots(2 * len(windows), 1, figsize=(13, 4.2 * len(windows)), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1] * len(windows)})
    colors = ("tab:red", "tab:blue", "tab:green", "tab:purple")
    for i, w in enumerate(windows):
        top, bottom = axes[2 * i, 0], axes[2 * i + 1, 0]
        first = w.start // P
        lo, hi = max(0, first - before), min(values_LC.shape[0] // P, first + after)
        steps = np.arange(lo * P, hi * P)
        for c in range(values_LC.shape[1]):
            top.plot(steps, values_LC[steps, c], color="black", lw=0.7)
        for g in range(lo, hi + 1):
            top.axvline(g * P, color="gray", lw=0.2 if g < first else 0.5, alpha=0.6)
        top.axvspan(w.start, min(w.end, hi * P), color="orange", alpha=0.25, label="labelled window")
        top.axvspan(first * P, (first + 3) * P, color="tab:red", alpha=0.12, label="its first 3 tokens")
        for (name, tr), color in zip(traces.items(), colors):
            on = np.flatnonzero(tr.modes_T[lo:hi] > 0) + lo
            bottom.plot(np.arange(lo, hi) * P + P / 2, local_top_share(tr.scores_T, window)[lo:hi], color=color, lw=0.8, label=name)
            bottom.scatter(on * P + P / 2, np.full(len(on), 1.05 + 0.08 * list(traces).index(name)), color=color, marker="|", s=40)
        bottom.axhline(0.10, color="gray", ls="--", lw=0.7)
        bottom.set(ylim=(0, 1.3), xlim=(lo * P, hi * P), ylabel=f"score top share\n(last {window} tokens)")
        top.set(xlim=(lo * P, hi * P), title=f"window {i + 1}: steps {w.start}-{w.end}, first token {first}", ylabel="value")
        top.legend(loc="lower left", fontsize=7)
        bottom.legend(loc="upper left", fontsize=7, ncol=len(traces))
    axes[-1, 0].set_xlabel("step (bars above 1: attention tokens; dashed: a 10% rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=75)
    plt.close(fig)
