"""`recall_stream`: unlabelled streams of repeated waveforms for teaching a forecaster's attention to look the past up.

`recall_plays` gives the same stream with where each play lies, and `RecallScenario` holds a
curriculum's settings as a stream with `stream` and `repeats` (the two methods of
`datasets.scenarios.Scenario` that `evaluation.routing.lookup` reads), so the look-up can be
measured on the curriculum itself: how much of an exact copy's gain attention recovers inside
its plays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.datasets.synthetic import _rng

__all__ = ["RecallScenario", "recall_plays", "recall_stream"]


def recall_stream(length: int, channels: int, *, period: int = 128, repeats: int = 8, noise: float = 0.05,
                  seed: int = 0, max_gap: int = 0, gap_step: int = 8, partial: float = 0.0) -> np.ndarray:
    """An unlabelled `(length, channels)` float32 stream for teaching a model to look the past up.

    Back-to-back blocks, each one random waveform of `period` steps (a normalized random walk per
    channel) played `repeats` times with fresh noise: after the first play, the rest of a block is
    predictable only by recalling the play before. Training a forecaster's attention on it first
    (a curriculum) is what lets the model later use attention on repeats of rare patterns in real
    telemetry, which a small model does not learn from their rare occurrences alone.

    With `max_gap > 0` every play comes after a gap of distractors: an unrelated normalized random
    walk whose length is drawn uniformly from the multiples of `gap_step` up to `max_gap` (0
    included), so the earlier play must be found by its content at a varying distance. Plays and
    gaps keep to multiples of `gap_step` steps (patch-aligned when it is the patch length).
    `max_gap=0` gives the stream of back-to-back plays.

    With `partial > 0` that share of the blocks repeats on a random subset of the channels only (at
    least half of them, never all): on the others every play carries a fresh random walk, as a
    program run in telemetry replaces only some channels' cycle, so the earlier play must be found
    by part of a token. Needs 2 or more channels to have an effect. `partial=0` draws nothing more:
    the stream is the one without it.
    """
    return recall_plays(length, channels, period=period, repeats=repeats, noise=noise, seed=seed, max_gap=max_gap,
                        gap_step=gap_step, partial=partial)[0]


def recall_plays(length: int, channels: int, *, period: int = 128, repeats: int = 8, noise: float = 0.05, seed: int = 0,
                 max_gap: int = 0, gap_step: int = 8, partial: float = 0.0) -> tuple[np.ndarray, list[list[LabelWindow]]]:
    """`(recall_stream(...), plays)`: the same stream (same arguments, bit for bit) and, per block, the
    windows of its plays in order (`recurring_first`, then `recurring_repeat`), each `period` steps
    and inside `[0, length)`; a play cut by the stream's end is left out, and so are its block's later ones."""
    if length < 1 or channels < 1 or period < 1 or repeats < 1:
        raise ValueError(f"length, channels, period and repeats must be >= 1, got {(length, channels, period, repeats)}")
    if max_gap < 0 or gap_step < 1:
        raise ValueError(f"need max_gap >= 0 and gap_step >= 1, got {max_gap}, {gap_step}")
    if not 0.0 <= partial <= 1.0:
        raise ValueError(f"partial must be in [0, 1], got {partial}")
    rng = _rng(seed, 99)

    def walk(n: int) -> np.ndarray:
        w = np.cumsum(rng.standard_normal((n, channels)), axis=0)
        return (w - w.mean(0)) / (w.std(0) + 1e-6)

    def play_of(wave: np.ndarray, fresh_C: np.ndarray | None) -> np.ndarray:
        if fresh_C is None:
            return wave
        out = wave.copy()
        out[:, fresh_C] = walk(period)[:, fresh_C]
        return out

    def window(start: int, i: int) -> LabelWindow:
        return LabelWindow(start, start + period, "recurring_first" if i == 0 else "recurring_repeat")

    blocks, n, plays = [], 0, []
    while n < length:
        wave = walk(period)
        fresh_C = None  # channels that do not repeat in this block
        if partial > 0 and channels > 1 and rng.random() < partial:
            kept = int(rng.integers(-(-channels // 2), channels))
            fresh_C = np.sort(rng.permutation(channels)[kept:])
        if max_gap == 0 and fresh_C is None:
            plays.append([window(n + i * period, i) for i in range(repeats)])
            blocks.append(np.tile(wave, (repeats, 1)) + noise * rng.standard_normal((period * repeats, channels)))
            n += period * repeats
            continue
        block = []
        for i in range(repeats):
            gap = int(rng.integers(0, max_gap // gap_step + 1)) * gap_step if max_gap else 0
            play = play_of(wave, fresh_C)
            play = np.concatenate([walk(gap), play]) if gap else play
            block.append(window(n + gap, i))
            blocks.append(play + noise * rng.standard_normal(play.shape))
            n += len(play)
        plays.append(block)
    inside = [[w for w in block if w.end <= length] for block in plays]
    return np.concatenate(blocks)[:length].astype(np.float32), [block for block in inside if block]


@dataclass(frozen=True)
class RecallScenario:
    """A recall curriculum as a stream to score the look-up on (`evaluation.routing.lookup`):
    `recall_stream` under `settings` (its keyword arguments but `seed`), the seed given per stream."""

    settings: Mapping[str, Any] = field(default_factory=dict)

    def stream(self, length: int, channels: int, seed: int) -> tuple[np.ndarray, list[LabelWindow]]:
        """`(values (L, C) float32, windows)`: the stream and every play's window, sorted by start."""
        values, plays = recall_plays(length, channels, **self.settings, seed=seed)
        return values, sorted((w for block in plays for w in block), key=lambda w: w.start)

    def repeats(self, length: int, channels: int, seed: int) -> list[tuple[LabelWindow, LabelWindow]]:
        """`(earlier play, repeat)` per repeat of `stream(length, channels, seed)`: each play after a block's
        first with the play just before it. Sorted by the repeat's start."""
        plays = recall_plays(length, channels, **self.settings, seed=seed)[1]
        return sorted(((a, b) for block in plays for a, b in zip(block, block[1:])), key=lambda p: p[1].start)
