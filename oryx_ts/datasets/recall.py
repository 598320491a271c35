"""`recall_stream`: unlabelled streams of repeated waveforms for teaching a forecaster's attention to look the past up."""

from __future__ import annotations

import numpy as np

from oryx_ts.datasets.synthetic import _rng

__all__ = ["recall_stream"]


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

    blocks, n = [], 0
    while n < length:
        wave = walk(period)
        fresh_C = None  # channels that do not repeat in this block
        if partial > 0 and channels > 1 and rng.random() < partial:
            kept = int(rng.integers(-(-channels // 2), channels))
            fresh_C = np.sort(rng.permutation(channels)[kept:])
        if max_gap == 0 and fresh_C is None:
            blocks.append(np.tile(wave, (repeats, 1)) + noise * rng.standard_normal((period * repeats, channels)))
            n += period * repeats
            continue
        for _ in range(repeats):
            gap = int(rng.integers(0, max_gap // gap_step + 1)) * gap_step if max_gap else 0
            play = play_of(wave, fresh_C)
            play = np.concatenate([walk(gap), play]) if gap else play
            blocks.append(play + noise * rng.standard_normal(play.shape))
            n += len(play)
    return np.concatenate(blocks)[:length].astype(np.float32)
