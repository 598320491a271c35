"""A series' labelled windows in token terms, for the engine's audits: which tokens lie in a window
`[a, b)` (timestamps), and which windows got attention among their first tokens (recall).

Vectorized over a series' tokens (a prefilled run holds thousands), with the windows kept as arrays
on the series once its grid is known. A series here is the engine's per-series record: `labels`
(sorted by start), `regularizer`, `first_index`, `windows` (the cache), `windows_seen`, `windows_recalled`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["labelled", "recall", "token_spans"]


def token_spans(s, P: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last timestamp of each token of `s` (int64 arrays), or None before the grid is known."""
    reg = s.regularizer
    if reg.origin is None or reg.step is None:
        return None
    first = reg.origin + ((s.first_index or 0) + np.asarray(tokens, dtype=np.int64) * P) * reg.step
    return first, first + (P - 1) * reg.step


def label_arrays(s, P: int) -> tuple[np.ndarray, ...] | None:
    """The series' labels as arrays (a_L, b_L sorted by start; b_max_L the latest end so far; first_L the token
    holding each start, at least 0), built once the grid and the first step are known; None before."""
    if s.windows is None and s.labels and s.first_index is not None and token_spans(s, P, np.zeros(1)) is not None:
        reg = s.regularizer
        a_L, b_L = np.asarray(s.labels, dtype=np.int64).reshape(-1, 2).T
        first_L = np.maximum(((a_L - reg.origin) // reg.step - (s.first_index or 0)) // P, 0)
        s.windows = (a_L, b_L, np.maximum.accumulate(b_L), first_L)
    return s.windows


def labelled(batch: list, tokens: np.ndarray, P: int) -> np.ndarray:
    """Whether each (series, token) overlaps one of the series' labelled windows [a, b)."""
    out = np.zeros(len(batch), dtype=bool)
    for s, rows in _by_series(batch):
        if (w := label_arrays(s, P)) is None:
            continue
        a_L, _, b_max, _ = w
        t0, t1 = token_spans(s, P, np.asarray(tokens)[rows])
        k = np.searchsorted(a_L, t1, side="right")  # windows starting at or before the token's end
        out[rows] = (k > 0) & (b_max[np.maximum(k - 1, 0)] > t0)
    return out


def recall(batch: list, tokens: np.ndarray, modes: np.ndarray, P: int, first_tokens: int = 3) -> None:
    """Mark the windows seen, and recalled when one of their first `first_tokens` tokens ran attention.

    Each series' tokens in `batch` must come in increasing order (one per micro-batch step, or a
    prefilled run)."""
    tokens, modes = np.asarray(tokens), np.asarray(modes)
    for s, rows in _by_series(batch):
        if (w := label_arrays(s, P)) is None:
            continue
        a_L, b_L, _, first_L = w
        mine, mine_modes = tokens[rows].astype(np.int64), modes[rows]
        # only windows whose first tokens reach into these tokens can count
        lo = int(np.searchsorted(first_L, mine[0] - first_tokens + 1, side="left"))
        hi = int(np.searchsorted(first_L, mine[-1], side="right"))
        if lo >= hi:
            continue
        n_LJ = first_L[lo:hi, None] + np.arange(first_tokens)
        at = np.minimum(np.searchsorted(mine, n_LJ), len(mine) - 1)
        t0, t1 = token_spans(s, P, n_LJ)
        counts = (mine[at] == n_LJ) & (a_L[lo:hi, None] <= t1) & (t0 < b_L[lo:hi, None])
        for k in np.flatnonzero(counts.any(1)).tolist():
            s.windows_seen.add(lo + k)
            if (mine_modes[at[k][counts[k]]] > 0).any():
                s.windows_recalled.add(lo + k)


def _by_series(batch: list) -> list[tuple[object, list[int]]]:
    """Rows of `batch` per labelled series (a series may fill several rows: a prefilled run)."""
    groups: dict[int, tuple[object, list[int]]] = {}
    for i, s in enumerate(batch):
        if s.labels:
            groups.setdefault(id(s), (s, []))[1].append(i)
    return list(groups.values())
