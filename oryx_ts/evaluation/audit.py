"""Rare-regime audit: does routing spend attention on the labelled windows, and does it pay off there?

Legend: T tokens (forecast origins), L raw steps, P patch length, Hz horizon, C channels, Q quantiles.

A token is *labelled* when its patch overlaps a labelled window. A window is *recalled* when at
least one of its first `first_tokens` labelled tokens ran attention. Forecast error inside windows
is measured at labelled origins (the forecasts that routing can change), outside at the others.
"""

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from oryx_ts.evaluation.metrics import crps_quantiles, horizon_targets, mae


@dataclass(frozen=True)
class AuditResult:
    n_windows: int
    window_recall: float  # share of windows with an attention token among their first tokens
    token_recall: float  # share of labelled tokens that ran attention
    token_precision: float  # share of attention tokens that are labelled
    attention_rate: float
    realized_over_budget: float  # FLOPs spent / allowance, summed over tokens (NaN without a budget)
    surcharge_over_budget: float  # attention FLOPs spent / attention FLOPs allowed above the recurrent cost
    mae_in: float
    mae_out: float
    crps_in: float
    crps_out: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_spans(windows: Iterable, n_tokens: int, patch_len: int, offset: int = 0, kinds: Iterable[str] | None = None) -> list[np.ndarray]:
    """For each window (objects with `start`, `end`, `kind`, in raw steps) the token indices whose patch overlaps it.

    Token n covers raw steps `offset + n P .. offset + (n + 1) P - 1`; windows outside the tokens are dropped.
    """
    keep = None if kinds is None else set(kinds)
    spans = []
    for w in windows:
        if keep is not None and w.kind not in keep:
            continue
        a = max(0, (w.start - offset) // patch_len)
        b = min(n_tokens, -(-(w.end - offset) // patch_len))
        if a < b:
            spans.append(np.arange(a, b))
    return spans


def token_mask(windows: Iterable, n_tokens: int, patch_len: int, offset: int = 0, kinds: Iterable[str] | None = None) -> np.ndarray:
    """Boolean `(T,)`: tokens whose patch overlaps a window."""
    mask = np.zeros(n_tokens, dtype=bool)
    for span in token_spans(windows, n_tokens, patch_len, offset, kinds):
        mask[span] = True
    return mask


def rare_regime_audit(
    modes_T: np.ndarray,
    forecasts_THzCQ: np.ndarray,
    values_LC: np.ndarray,
    windows: Iterable,
    *,
    patch_len: int,
    quantiles: np.ndarray,
    median_index: int,
    flops_T: np.ndarray | None = None,
    allowance_T: np.ndarray | None = None,
    recurrent_T: np.ndarray | None = None,
    first_tokens: int = 3,
    kinds: Iterable[str] | None = None,
    scored: np.ndarray | None = None,
) -> AuditResult:
    """Audit one routed stream of T tokens over `values_LC` (token n covers steps `n P .. n P + P - 1`).

    `flops_T`, `allowance_T` and `recurrent_T` (the all-recurrent cost) give the FLOPs ratios;
    `scored` (T,) booleans restricts the error metrics to some origins (e.g. after a warm-up).
    """
    modes = np.asarray(modes_T) > 0
    T = modes.shape[0]
    windows = list(windows)
    spans = token_spans(windows, T, patch_len, kinds=kinds)
    labelled = token_mask(windows, T, patch_len, kinds=kinds)
    recalled = [bool(modes[s[:first_tokens]].any()) for s in spans]
    nan = float("nan")
    ratio = lambda a, b: float(a / b) if b else nan  # noqa: E731
    realized = surcharge = nan
    if flops_T is not None and allowance_T is not None:
        flops, allow = np.asarray(flops_T, np.float64), np.asarray(allowance_T, np.float64)
        realized = ratio(flops.sum(), allow.sum())
        if recurrent_T is not None:
            rec = np.asarray(recurrent_T, np.float64)
            surcharge = ratio((flops - rec).sum(), (allow - rec).sum())
    ends = np.arange(T) * patch_len + patch_len - 1
    target = horizon_targets(values_LC, ends, forecasts_THzCQ.shape[1])
    scored = np.ones(T, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    errors = {}
    for name, sel in (("in", labelled & scored), ("out", ~labelled & scored)):
        if sel.any():
            errors[name] = (mae(forecasts_THzCQ[sel][..., median_index], target[sel]), crps_quantiles(forecasts_THzCQ[sel], target[sel], quantiles))
        else:
            errors[name] = (nan, nan)
    return AuditResult(
        n_windows=len(spans),
        window_recall=ratio(sum(recalled), len(spans)),
        token_recall=ratio((modes & labelled).sum(), labelled.sum()),
        token_precision=ratio((modes & labelled).sum(), modes.sum()),
        attention_rate=float(modes.mean()) if T else nan,
        realized_over_budget=realized,
        surcharge_over_budget=surcharge,
        mae_in=errors["in"][0],
        mae_out=errors["out"][0],
        crps_in=errors["in"][1],
        crps_out=errors["out"][1],
    )
