"""Routers scored on labelled streams (`datasets.scenarios`): recall of event windows, error inside
them, realized FLOPs against the budget.

Legend: B segments, T tokens, L raw steps, P patch length, Hz horizon, C channels, Q quantiles.

A labelled stream is cut into B consecutive segments of the same number of tokens; each segment is
replayed as its own series (`run_router`: the engine, the service's code path) or run through the
parallel forward with fixed modes (`forced_forecast`). Per-token results are laid out segment after
segment (`flatten`). The first `WARMUP` tokens of every segment are left out of the error metrics
while normalization settles (`scored_tokens`).
"""

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from oryx_ts.config import BudgetConfig, OryxConfig
from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.datasets.scenarios import VALIDATION_SEED, Scenario
from oryx_ts.datasets.synthetic import ANOMALY_KINDS
from oryx_ts.evaluation.audit import rare_regime_audit, token_mask
from oryx_ts.evaluation.backtest import backtest_streams
from oryx_ts.evaluation.metrics import crps_quantiles, horizon_targets, mae
from oryx_ts.flops import mode_costs
from oryx_ts.model import OryxForecaster
from oryx_ts.routers import RoutedForecaster, Router

__all__ = [
    "CONTROLLER_GRID",
    "WARMUP",
    "REAL_STREAMS",
    "RealStream",
    "attention_ceiling",
    "choose_controller",
    "copy_forecast",
    "event_mae",
    "flatten",
    "forced_forecast",
    "fresh_streams",
    "lookup",
    "lookup_share",
    "lookup_tokens",
    "real_routing",
    "real_stream",
    "routing_scores",
    "run_router",
    "scored_tokens",
    "segments",
    "target_gaps",
    "window_recall",
]

WARMUP = 16  # tokens of each segment left out of the error metrics while normalization settles
# controller settings tried on a validation stream with the learned router at 10%: (reserve, spike_z)
CONTROLLER_GRID = ((0.3, 2.0), (0.3, 3.0), (0.5, 2.0), (0.5, 3.0))


def segments(values_LC: np.ndarray, seg_tokens: int, n_seg: int, patch_len: int) -> torch.Tensor:
    """The first `n_seg` consecutive segments of `seg_tokens` patches as a batch of series `(n_seg, seg_tokens * P, C)`.

    Raises `ValueError` when the stream is shorter than the segments.
    """
    L = seg_tokens * n_seg * patch_len
    if values_LC.shape[0] < L:
        raise ValueError(f"{n_seg} segments of {seg_tokens} tokens of {patch_len} steps need {L} steps, got {values_LC.shape[0]}")
    return torch.as_tensor(values_LC[:L]).reshape(n_seg, seg_tokens * patch_len, values_LC.shape[1])


def flatten(t: torch.Tensor) -> np.ndarray:
    """Segments (B, T, ...) back into one stream (B*T, ...)."""
    return t.reshape(-1, *t.shape[2:]).cpu().numpy()


def scored_tokens(seg_tokens: int, n_seg: int, warmup: int = WARMUP) -> np.ndarray:
    """Booleans `(n_seg * seg_tokens,)`: the tokens scored, every segment's first `warmup` left out."""
    return np.tile(np.arange(seg_tokens) >= warmup, n_seg)


def window_recall(modes_T: np.ndarray, windows: Iterable[LabelWindow], patch_len: int, kinds: Iterable[str],
                  first_tokens: int = 3) -> tuple[int, int]:
    """`(recalled, total)` windows of these kinds that start within the tokens: a window is recalled
    when an attention token is among the `first_tokens` tokens from the one its start falls in.

    Unlike `rare_regime_audit`'s `window_recall`, those tokens may lie past the end of a short window.
    """
    kinds = set(kinds)
    spans = [w for w in windows if w.kind in kinds and w.start // patch_len < len(modes_T)]
    return sum(bool(modes_T[w.start // patch_len : w.start // patch_len + first_tokens].any()) for w in spans), len(spans)


def forced_forecast(model: OryxForecaster, x_BLC: torch.Tensor, modes: float | np.ndarray) -> np.ndarray:
    """Forecasts `(B*T, Hz, C, Q)` of the parallel forward with fixed modes: one mode for every token
    (0 all-recurrent, 1 all-attention) or one per token laid out as `flatten` lays them out."""
    B, T = x_BLC.shape[0], x_BLC.shape[1] // model.config.tokenizer.patch_len
    if np.ndim(modes) == 0:
        modes_BT = torch.full((B, T), float(modes))
    else:
        modes_BT = torch.as_tensor(np.asarray(modes, dtype=np.float32)).reshape(B, T)
    device = next(model.parameters()).device  # the forecaster may live on a GPU; the forecasts come back to the host
    with torch.no_grad():
        return flatten(model(x_BLC.to(device), modes_BT.to(device)))


def run_router(model: OryxForecaster, x_BLC: torch.Tensor, router: Router, budget: BudgetConfig) -> tuple[np.ndarray, ...]:
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


def event_mae(forecasts_THzCQ: np.ndarray, values_LC: np.ndarray, windows: Sequence[LabelWindow], *, config: OryxConfig,
              seg_tokens: int, kinds: Iterable[str]) -> float:
    """MAE of the scored forecasts (`scored_tokens`) made inside windows of `kinds` (NaN when there are none)."""
    T = forecasts_THzCQ.shape[0]
    return rare_regime_audit(np.zeros(T), forecasts_THzCQ, values_LC, windows, patch_len=config.tokenizer.patch_len,
                             quantiles=np.asarray(config.head.quantiles), median_index=config.head.median_index,
                             scored=scored_tokens(seg_tokens, T // seg_tokens), kinds=kinds).mae_in


def routing_scores(modes_T: np.ndarray, forecasts_THzCQ: np.ndarray, values_LC: np.ndarray, windows: Sequence[LabelWindow], *,
                   config: OryxConfig, seg_tokens: int, events: Iterable[str], flops_T: np.ndarray | None = None,
                   allowance_T: np.ndarray | None = None) -> dict:
    """One router's scores on a segmented stream: `rare_regime_audit` over the windows of `events`
    (recall, precision, FLOPs over the allowance and over the attention surcharge when `flops_T`
    and `allowance_T` are given, MAE/CRPS inside and outside), plus recall and MAE over anomaly
    windows (`anomaly_recall`, `mae_anomaly`), MAE inside repeats of recurring events
    (`mae_repeat`) and MAE/CRPS over every scored token (`mae_all`, `crps_all`)."""
    T, P = len(modes_T), config.tokenizer.patch_len
    n_seg = T // seg_tokens
    quantiles, mid = np.asarray(config.head.quantiles), config.head.median_index
    scored = scored_tokens(seg_tokens, n_seg)
    rec_T = np.tile(mode_costs(config, 0, seg_tokens).recurrent_T, n_seg)
    target = horizon_targets(values_LC, np.arange(T) * P + P - 1, config.head.horizon)
    common = dict(patch_len=P, quantiles=quantiles, median_index=mid, scored=scored)
    in_events = rare_regime_audit(modes_T, forecasts_THzCQ, values_LC, windows, flops_T=flops_T, allowance_T=allowance_T,
                                  recurrent_T=rec_T, kinds=events, **common)
    anomalies = rare_regime_audit(modes_T, forecasts_THzCQ, values_LC, windows, kinds=ANOMALY_KINDS, **common)
    repeats = rare_regime_audit(modes_T, forecasts_THzCQ, values_LC, windows, kinds=("recurring_repeat",), **common)
    return {**in_events.to_dict(), "anomaly_recall": anomalies.window_recall, "mae_anomaly": anomalies.mae_in,
            "mae_repeat": repeats.mae_in, "mae_all": mae(forecasts_THzCQ[scored][..., mid], target[scored]),
            "crps_all": crps_quantiles(forecasts_THzCQ[scored], target[scored], quantiles)}


def choose_controller(model: OryxForecaster, router: Router, scenario: Scenario, seg_tokens: int, n_seg: int, *,
                      fraction: float = 0.10, seed: int = VALIDATION_SEED, grid: Sequence[tuple[float, float]] = CONTROLLER_GRID,
                      budget: BudgetConfig | None = None) -> tuple[tuple[float, float], list[dict]]:
    """Pick `(reserve, spike_z)` from `grid` on a validation stream of `scenario` (`seed`), not the evaluation stream.

    Runs `router` at `fraction` under each setting (the rest of the budget, window and hold, from
    `budget`, default `BudgetConfig()`); the best recalls most event windows
    (`window_recall`), the first listed among equals. Returns the best and, per setting,
    `{"reserve", "spike_z", "recalled", "windows"}`.
    """
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    values, windows = scenario.stream(seg_tokens * n_seg * P + 64, C, seed=seed)
    x = segments(values, seg_tokens, n_seg, P)
    best, best_hits, trials = grid[0], -1, []
    for reserve, spike_z in grid:
        trial = dataclasses.replace(budget or BudgetConfig(), fraction=fraction, reserve=reserve, spike_z=spike_z)
        modes = run_router(model, x, router, trial)[1]
        hits, total = window_recall(modes, windows, P, scenario.events)
        trials.append({"reserve": reserve, "spike_z": spike_z, "recalled": hits, "windows": total})
        if hits > best_hits:
            best, best_hits = (reserve, spike_z), hits
    return best, trials


def fresh_streams(model: OryxForecaster, routers: Mapping[str, Router], budget: BudgetConfig, scenario: Scenario,
                  seg_tokens: int, n_seg: int, seeds: Iterable[int]) -> list[dict]:
    """Per stream of `scenario` (one per seed): event-window recall and MAE inside event windows of each
    router at `budget`, with all-recurrent and all-attention for reference.

    Returns per seed `{"seed", "all-recurrent": {"mae_in"}, "all-attention": {"mae_in"},
    <router>: {"recalled", "windows", "mae_in"}}`.
    """
    config = model.config
    P, C = config.tokenizer.patch_len, config.tokenizer.channels
    score = dict(config=config, seg_tokens=seg_tokens, kinds=scenario.events)
    rows = []
    for seed in tqdm(list(seeds), desc="further streams"):
        values, windows = scenario.stream(seg_tokens * n_seg * P + 64, C, seed=seed)
        x = segments(values, seg_tokens, n_seg, P)
        row = {"seed": seed}
        for name, mode in (("all-recurrent", 0.0), ("all-attention", 1.0)):
            row[name] = {"mae_in": event_mae(forced_forecast(model, x, mode), values, windows, **score)}
        for name, router in routers.items():
            forecast, modes = run_router(model, x, router, budget)[:2]
            hits, total = window_recall(modes, windows, P, scenario.events)
            row[name] = {"recalled": hits, "windows": total, "mae_in": event_mae(forecast, values, windows, **score)}
        rows.append(row)
    return rows


def attention_ceiling(model: OryxForecaster, scenario: Scenario, seed: int, seg_tokens: int, n_seg: int) -> dict[str, float]:
    """How far attention itself lowers the error inside event windows on one stream of `scenario`:
    MAE inside event windows with every token recurrent (`rec`), every token in attention (`att`)
    and attention on exactly the event tokens with no budget (`oracle`)."""
    config = model.config
    P, C = config.tokenizer.patch_len, config.tokenizer.channels
    values, windows = scenario.stream(seg_tokens * n_seg * P + 64, C, seed=seed)
    x = segments(values, seg_tokens, n_seg, P)
    events = token_mask(windows, seg_tokens * n_seg, P, kinds=scenario.events).astype(np.float32)
    T = seg_tokens * n_seg
    maes = {}
    for mode, modes in (("rec", np.zeros(T, np.float32)), ("att", np.ones(T, np.float32)), ("oracle", events)):
        maes[mode] = event_mae(forced_forecast(model, x, modes), values, windows, config=config, seg_tokens=seg_tokens,
                               kinds=scenario.events)
    return maes


def target_gaps(mae_rec: float, mae_att: float, mae_routed: float) -> dict[str, float]:
    """How a routed forecaster's error inside event windows stands against the two references:
    `below_rec`, its share below all-recurrent (`1 - routed / rec`); `over_att`, its share above
    all-attention (`routed / att - 1`); `recovered`, the share of all-attention's gain over
    all-recurrent that it keeps (`(rec - routed) / (rec - att)`, NaN when attention gains nothing)."""
    gain = mae_rec - mae_att
    return {"below_rec": 1.0 - mae_routed / mae_rec, "over_att": mae_routed / mae_att - 1.0,
            "recovered": (mae_rec - mae_routed) / gain if gain > 0 else math.nan}


def lookup_tokens(pairs: Sequence[tuple[LabelWindow, LabelWindow]], seg_tokens: int, n_seg: int, patch_len: int,
                  warmup: int = WARMUP) -> np.ndarray:
    """Int `(T,)`: per token (segments laid out as `flatten` lays them out) the index in `pairs` of the
    repeat its patch overlaps, -1 for none. Only tokens that can look the earlier play up count: scored
    (`scored_tokens`) and in the segment that holds the whole earlier play."""
    T = seg_tokens * n_seg
    owner = np.full(T, -1, dtype=np.int64)
    scored = scored_tokens(seg_tokens, n_seg, warmup)
    for i, (earlier, repeat) in enumerate(pairs):
        for g in range(repeat.start // patch_len, min(T, -(-repeat.end // patch_len))):
            seg_start = g // seg_tokens * seg_tokens * patch_len
            if scored[g] and earlier.start >= seg_start:
                owner[g] = i
    return owner


def copy_forecast(values_LC: np.ndarray, pairs: Sequence[tuple[LabelWindow, LabelWindow]], owner_T: np.ndarray,
                  fallback_THzC: np.ndarray, patch_len: int) -> np.ndarray:
    """Point forecasts `(T, Hz, C)` of an exact copy of each repeat's earlier play.

    At a token that `owner_T` (`lookup_tokens`) gives a repeat, every horizon step inside that repeat
    is the value `lag = repeat.start - earlier.start` steps before it, shifted per channel by the mean
    of `x[u] - x[u - lag]` over the token's own steps `u` inside the repeat (the level the two plays
    differ by, observed by then; NaN steps skipped). Other steps and tokens keep `fallback_THzC`.
    """
    out = np.array(fallback_THzC, dtype=np.float64, copy=True)
    Hz, L = out.shape[1], values_LC.shape[0]
    for g in np.flatnonzero(owner_T >= 0):
        earlier, repeat = pairs[owner_T[g]]
        lag = repeat.start - earlier.start
        seen = np.arange(max(g * patch_len, repeat.start), min((g + 1) * patch_len, repeat.end))
        diff = values_LC[seen] - values_LC[seen - lag]
        seen_C = (~np.isnan(diff)).sum(0)
        shift = np.where(seen_C > 0, np.nansum(diff, 0) / np.maximum(seen_C, 1), 0.0)
        steps = (g + 1) * patch_len + np.arange(Hz)
        inside = (steps >= repeat.start) & (steps < min(repeat.end, L))
        out[g, inside] = values_LC[steps[inside] - lag] + shift
    return out


def lookup_share(mae_rec: float, mae_att: float, mae_copy: float) -> float:
    """The share of an exact copy's gain over recurrence that attention recovers:
    `(rec - att) / (rec - copy)`; NaN when the copy gains nothing."""
    gain = mae_rec - mae_copy
    return (mae_rec - mae_att) / gain if gain > 0 else math.nan


def lookup(model: OryxForecaster, scenario: Scenario, seed: int, seg_tokens: int, n_seg: int) -> dict:
    """The look-up on one stream of `scenario`: MAE inside repeats (`lookup_tokens`) of the forecaster
    all-recurrent (`rec`), all-attention (`att`) and of the exact copy of the earlier play
    (`copy_forecast`, all-recurrent where it has nothing to copy), the share of the copy's gain that
    attention recovers (`share`, `lookup_share`) and the counts of `repeats` and `tokens` scored."""
    config = model.config
    P, C, mid = config.tokenizer.patch_len, config.tokenizer.channels, config.head.median_index
    length = seg_tokens * n_seg * P + 64
    values, _ = scenario.stream(length, C, seed=seed)
    pairs = scenario.repeats(length, C, seed=seed)
    x = segments(values, seg_tokens, n_seg, P)
    owner = lookup_tokens(pairs, seg_tokens, n_seg, P)
    sel = owner >= 0
    target = horizon_targets(values, np.arange(len(owner)) * P + P - 1, config.head.horizon)
    rec, att = (forced_forecast(model, x, mode)[..., mid] for mode in (0.0, 1.0))
    copy = copy_forecast(values, pairs, owner, rec, P)
    maes = {name: mae(f[sel], target[sel]) for name, f in (("rec", rec), ("att", att), ("copy", copy))}
    return {**maes, "share": lookup_share(maes["rec"], maes["att"], maes["copy"]), "repeats": len(set(owner[sel].tolist())),
            "tokens": int(sel.sum())}


REAL_STREAMS = ("nab", "household")
HOUSEHOLD_TRAIN, HOUSEHOLD_EVAL = 1 << 19, 40_960  # minutes: about a year to train on, then 28 days to route


@dataclass(frozen=True)
class RealStream:
    """Real telemetry to route: `train_values` for the forecaster and router (no labelled window in
    them), `values` streamed as one series and scored against its `windows` (all kinds count)."""

    name: str
    train_values: np.ndarray  # (L_train, C) float32
    values: np.ndarray  # (L, C) float32, L a multiple of the patch length
    windows: list[LabelWindow]
    label_source: str


def real_stream(name: str, patch_len: int, cache: str | None = None) -> RealStream:
    """One of `REAL_STREAMS` from the packaged data (`oryx_ts.datasets.load`).

    - `nab`: NAB machine temperature (22,683 steps of 5 minutes, 4 labelled failure windows). The
      forecaster trains on steps 5,000-15,000, between the second and third window; the whole
      series is routed.
    - `household`: UCI household power (7 channels, one-minute steps). The forecaster trains on the
      first `HOUSEHOLD_TRAIN` minutes; the next `HOUSEHOLD_EVAL` are routed, with windows derived as
      the backtests derive them (`evaluation.job.derive_labels`: outages where every channel is
      missing, extremes outside the training part's 0.1-99.9% quantiles).
    Raises `ValueError` for another name.
    """
    from oryx_ts.datasets import load

    if name == "nab":
        s = load("nab_machine_temperature", cache)
        L = s.values.shape[0] // patch_len * patch_len
        return RealStream(name, s.values[5000:15000].astype(np.float32), s.values[:L].astype(np.float32),
                          [w for w in s.labels if w.start < L], "NAB labels (known failures)")
    if name == "household":
        from oryx_ts.evaluation.job import derive_labels

        s = load("household_power", cache)
        span = s.values[: HOUSEHOLD_TRAIN + HOUSEHOLD_EVAL].astype(np.float32)
        derived = derive_labels(span, HOUSEHOLD_TRAIN)
        windows = [LabelWindow(w.start - HOUSEHOLD_TRAIN, w.end - HOUSEHOLD_TRAIN, w.kind) for w in derived if w.start >= HOUSEHOLD_TRAIN]
        return RealStream(name, span[:HOUSEHOLD_TRAIN], span[HOUSEHOLD_TRAIN:], windows,
                          "derived: outage (every channel missing), extreme (outside the training 0.1-99.9% quantiles)")
    raise ValueError(f"unknown real stream {name!r}; choose from {REAL_STREAMS}")


def real_routing(model: OryxForecaster, routers: Mapping[str, Router], budgets: Iterable[BudgetConfig], stream: RealStream, *,
                 first_tokens: int = 3) -> list[dict]:
    """Each router under each budget on `stream.values` streamed as one series through the engine.

    Per run: `recalled`/`windows` (an attention token among a window's first `first_tokens` tokens,
    `window_recall`), the same per window kind (`by_kind`: kind -> [recalled, windows]), `first_attention` (per window, tokens from its start to its first attention
    token inside it, None when none), attention rate, realized FLOPs over the allowance and the
    attention surcharge spent over the surcharge allowed.
    """
    P = model.config.tokenizer.patch_len
    x = torch.as_tensor(stream.values)[None]
    kinds = {w.kind for w in stream.windows}
    rec_T = mode_costs(model.config, 0, x.shape[1] // P).recurrent_T
    rows = []
    for budget in budgets:
        for name, router in routers.items():
            _, modes, flops, allow = run_router(model, x, router, budget)
            hits, total = window_recall(modes, stream.windows, P, kinds, first_tokens)
            by_kind = {k: list(window_recall(modes, stream.windows, P, (k,), first_tokens)) for k in sorted(kinds)}
            firsts = []
            for w in stream.windows:
                on = np.flatnonzero(modes[w.start // P : -(-w.end // P)])
                firsts.append(int(on[0]) if len(on) else None)
            rows.append({"budget": budget.fraction, "router": name, "recalled": hits, "windows": total, "by_kind": by_kind,
                         "first_attention": firsts,
                         "attention_rate": float(modes.mean()), "realized_over_budget": float(flops.sum() / allow.sum()),
                         "surcharge_over_budget": float((flops - rec_T).sum() / (allow - rec_T).sum())})
    return rows
