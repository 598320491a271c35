"""`recall_stream`: unlabelled streams of repeated waveforms for teaching a forecaster's attention to look the past up."""

from __future__ import annotations

import numpy as np

from oryx_ts.datasets.synthetic import _rng

__all__ = ["recall_stream"]


def recall_stream(length: int, channels: int, *, period: int = 128, repeats: int = 8, noise: float = 0.05,
                  seed: int = 0, max_gap: int = 0, gap_step: int = 8) -> np.ndarray:
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
    """
    if length < 1 or channels < 1 or period < 1 or repeats < 1:
        raise ValueError(f"length, channels, period and repeats must be >= 1, got {(length, channels, period, repeats)}")
    if max_gap < 0 or gap_step < 1:
        raise ValueError(f"need max_gap >= 0 and gap_step >= 1, got {max_gap}, {gap_step}")
    rng = _rng(seed, 99)

    def walk(n: int) -> np.ndarray:
        w = np.cumsum(rng.standard_normal((n, channels)), axis=0)
        return (w - w.mean(0)) / (w.std(0) + 1e-6)

    blocks, n = [], 0
    while n < length:
        wave = walk(period)
        if max_gap == 0:
            blocks.append(np.tile(wave, (repeats, 1)) + noise * rng.standard_normal((period * repeats, channels)))
            n += period * repeats
            continue
        for _ in range(repeats):
            gap = int(rng.integers(0, max_gap // gap_step + 1)) * gap_step
            play = np.concatenate([walk(gap), wave]) if gap else wave
            blocks.append(play + noise * rng.standard_normal(play.shape))
            n += len(play)
    return np.concatenate(blocks)[:length].astype(np.float32)
