"""Label windows and the in-memory stream container shared by every dataset source.

A stream is `values` of shape (L, C) float32 on a fixed time grid (NaN = missing) plus a list of
labelled windows. Timestamps are never stored per step: a stream on a fixed grid is described by
its `start` and `step`, and `timestamps` is computed on demand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LabelWindow:
    """A labelled span of raw steps, half-open: `[start, end)`."""

    start: int
    end: int
    kind: str

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"label window needs 0 <= start < end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


def windows_from_mask(mask: np.ndarray, kind: str, offset: int = 0) -> list[LabelWindow]:
    """Turn a boolean mask of shape (L,) into the maximal runs of True, as windows of `kind`."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 1:
        raise ValueError(f"mask must be 1-D, got shape {mask.shape}")
    edges = np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [LabelWindow(int(s) + offset, int(e) + offset, kind) for s, e in zip(starts, ends)]


def mask_from_windows(
    windows: Iterable[LabelWindow], length: int, kind: str | Iterable[str] | None = None
) -> np.ndarray:
    """Boolean mask (length,) that is True inside every window of `kind` (all kinds if None)."""
    kinds = None if kind is None else ({kind} if isinstance(kind, str) else set(kind))
    mask = np.zeros(length, dtype=bool)
    for w in windows:
        if kinds is None or w.kind in kinds:
            mask[max(w.start, 0) : min(w.end, length)] = True
    return mask


def _format_span(seconds: float) -> str:
    days, rem = divmod(int(seconds), 86400)
    hours, rem = divmod(rem, 3600)
    minutes = rem // 60
    return f"{days}d {hours:02d}h{minutes:02d}m"


@dataclass
class TelemetryStream:
    """A multivariate stream on a fixed grid.

    values: float32 (L, C), NaN marks a missing observation.
    labels: labelled windows in raw steps.
    channels: one name per column of `values`.
    start, step: the grid (`numpy.datetime64` and `numpy.timedelta64`), or None for streams that
        only have a step index (then `timestamps` is None).
    meta: free-form provenance (source, licence, split points).
    """

    values: np.ndarray
    labels: list[LabelWindow] = field(default_factory=list)
    channels: tuple[str, ...] = ()
    start: np.datetime64 | None = None
    step: np.timedelta64 | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 2:
            raise ValueError(f"values must have shape (L, C), got {self.values.shape}")
        if self.values.dtype != np.float32:
            self.values = self.values.astype(np.float32)
        if not self.channels:
            self.channels = tuple(f"ch{i}" for i in range(self.values.shape[1]))
        if len(self.channels) != self.values.shape[1]:
            raise ValueError(f"{len(self.channels)} channel names for {self.values.shape[1]} columns")
        for w in self.labels:
            if w.end > len(self):
                raise ValueError(f"label {w} ends after the stream (length {len(self)})")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.values.shape[1])

    @property
    def timestamps(self) -> np.ndarray | None:
        """datetime64 array (L,) of the grid, or None when the stream has no clock."""
        if self.start is None or self.step is None:
            return None
        return self.start + np.arange(len(self)) * self.step

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({w.kind for w in self.labels}))

    def label_mask(self, kind: str | Iterable[str] | None = None) -> np.ndarray:
        """Boolean (L,) mask of the steps inside windows of `kind` (any kind if None)."""
        return mask_from_windows(self.labels, len(self), kind)

    def slice(self, begin: int, end: int | None = None) -> TelemetryStream:
        """Steps `[begin, end)` as a new stream (values are a view); labels are clipped."""
        end = len(self) if end is None else end
        if not 0 <= begin < end <= len(self):
            raise ValueError(f"slice [{begin}, {end}) outside a stream of length {len(self)}")
        labels = [
            LabelWindow(max(w.start, begin) - begin, min(w.end, end) - begin, w.kind)
            for w in self.labels
            if w.start < end and w.end > begin
        ]
        start = None if self.start is None or self.step is None else self.start + begin * self.step
        return TelemetryStream(
            self.values[begin:end], labels, self.channels, start, self.step, self.name, dict(self.meta)
        )

    def split(self, at: int | float) -> tuple[TelemetryStream, TelemetryStream]:
        """Cut at step `at` (or at that fraction of the length when a float in (0, 1))."""
        index = int(round(at * len(self))) if isinstance(at, float) else int(at)
        if not 0 < index < len(self):
            raise ValueError(f"split point {at!r} must fall strictly inside length {len(self)}")
        return self.slice(0, index), self.slice(index)

    def describe(self) -> dict[str, Any]:
        """Summary: rows, channels, span, missing share, label counts and coverage per kind."""
        span = None
        if self.start is not None and self.step is not None:
            first = self.start.astype("datetime64[s]")
            last = (self.start + (len(self) - 1) * self.step).astype("datetime64[s]")
            seconds = (len(self) - 1) * self.step / np.timedelta64(1, "s")
            span = f"{first} .. {last} ({_format_span(seconds)})"
        missing = np.isnan(self.values)
        counts = Counter(w.kind for w in self.labels)
        return {
            "name": self.name,
            "rows": len(self),
            "channels": self.n_channels,
            "channel_names": list(self.channels),
            "step": None if self.step is None else str(self.step.astype("timedelta64[s]")),
            "span": span,
            "missing_share": float(missing.mean()) if missing.size else 0.0,
            "missing_share_per_channel": missing.mean(axis=0).round(6).tolist(),
            "labels": {k: counts[k] for k in sorted(counts)},
            "label_coverage": {k: float(self.label_mask(k).mean()) for k in sorted(counts)},
        }

    def plot(self, path: str, begin: int = 0, length: int | None = None, max_channels: int = 8) -> str:
        """Save a PNG of steps `[begin, begin + length)`, one panel per channel, labels shaded."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        end = len(self) if length is None else min(len(self), begin + length)
        part = self.slice(begin, end)
        channels = min(part.n_channels, max_channels)
        x = part.timestamps if part.timestamps is not None else np.arange(begin, end)
        fig, axes = plt.subplots(channels, 1, figsize=(12, 1.6 * channels + 0.6), sharex=True, squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        kind_color = {k: colors[i % len(colors)] for i, k in enumerate(part.kinds)}
        for c in range(channels):
            ax = axes[c, 0]
            ax.plot(x, part.values[:, c], lw=0.6, color="black")
            ax.set_ylabel(part.channels[c], rotation=0, ha="right", fontsize=8)
            for w in part.labels:
                ax.axvspan(x[w.start], x[w.end - 1], color=kind_color[w.kind], alpha=0.25, lw=0)
        handles = [plt.Rectangle((0, 0), 1, 1, color=kind_color[k], alpha=0.4) for k in part.kinds]
        if handles:
            fig.legend(handles, part.kinds, loc="upper right", fontsize=8, ncols=min(4, len(handles)))
        fig.suptitle(f"{self.name or 'stream'}: steps {begin}..{end}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
