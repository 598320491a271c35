"""Labelled routing scenarios: synthetic telemetry whose event windows say where attention should pay.

Every scenario is the project's synthetic telemetry (`synthetic.generate`) with short, frequent
anomalies (3% of the steps) and regime switches, plus its own recurring events (`SCENARIOS`):
- `anomalies`: none. Event windows are the anomaly windows.
- `programs`: recurring program runs (a distinctive waveform that replaces a channel group's daily
  cycle and plays again 64-512 steps later, twice) on about 6% of the steps. Event windows are all
  labelled windows: anomalies, regime switches, first plays and repeats of program runs.
- `daily`: daily jobs on about 6% of the steps: a waveform added to 2-4 channels for 96 steps at the
  same time of day, 7 days in a row, so that a repeat is what ran one day (288 steps) earlier.
  Event windows are all labelled windows.
The forecaster's training stream has the same kinds of events, with recurring ones much denser
(dense repeats teach recall). Seeds: `TRAIN_SEED` for training, `EVALUATION_SEED` for the stream
that is scored, `VALIDATION_SEED` for choices made before scoring, `FRESH_SEEDS` for streams on
which nothing was chosen; `CURRICULUM_SEED_BASE` and above for further training telemetry (never scored).

Legend: L raw steps, C channels.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.datasets.synthetic import ANOMALY_KINDS, KINDS, SyntheticConfig, SyntheticStream, generate

__all__ = [
    "CURRICULUM_SEED_BASE",
    "EVALUATION_SEED",
    "FRESH_SEEDS",
    "SCENARIOS",
    "TRAIN_SEED",
    "VALIDATION_SEED",
    "Scenario",
    "labelled_stream",
    "recurring_plays",
    "repeat_pairs",
]

TRAIN_SEED, EVALUATION_SEED, VALIDATION_SEED = 0, 1, 2
FRESH_SEEDS = (3, 4, 5)
# telemetry drawn for training beyond the training stream (a curriculum of the scenario's own kind of stream,
# `routers.training.curriculum_plays`) takes seeds from here on: the generator draws a stream's noise from its seed
# alone, so a curriculum at an evaluation seed would be that evaluation stream's sample path
CURRICULUM_SEED_BASE = 1000


def labelled_stream(length: int, channels: int, seed: int,
                    recurring: Mapping[str, Any] | None = None) -> tuple[np.ndarray, list[LabelWindow]]:
    """`(values (L, C) float32, windows)`: the project's synthetic telemetry with short, frequent
    anomalies (3% of the steps), regime switches and the given recurring events (`SyntheticConfig`
    `recurring_*` fields; none when `recurring` is empty or None).

    Windows are `[start, end)` in steps, sorted by start, every one inside `[0, length)`.
    The same arguments give the same stream, bit for bit.
    """
    s = _generate(length, channels, seed, recurring)
    return s.values, list(s.labels)


def recurring_plays(length: int, channels: int, seed: int,
                    recurring: Mapping[str, Any] | None = None) -> tuple[np.ndarray, list[list[LabelWindow]]]:
    """`(values, plays)`: `labelled_stream(length, channels, seed, recurring)`'s values (bit for bit) and, per
    recurring pattern, the windows of its plays in order (the first play, then its repeats), as
    `datasets.recall.recall_plays` gives them for a curriculum: so that the scenario's own
    telemetry can be a recall curriculum (`routers.training.curriculum_plays`), its guided
    attention (`oryx_ts.guide.guide_targets`) towards each repeat's earlier play."""
    s = _generate(length, channels, seed, recurring)
    plays: dict[LabelWindow, list[LabelWindow]] = {}
    for first, repeat in s.recurrences:
        plays.setdefault(first, [first]).append(repeat)
    ordered = sorted((sorted(seq, key=lambda w: w.start) for seq in plays.values()), key=lambda seq: seq[0].start)
    return s.values, ordered


def repeat_pairs(length: int, channels: int, seed: int, recurring: Mapping[str, Any] | None = None) -> list[tuple[LabelWindow, LabelWindow]]:
    """`(earlier, repeat)` per repeat window of `labelled_stream(length, channels, seed, recurring)`:
    `earlier` is the play of the same waveform just before it (the first play or the previous
    repeat), as long as the repeat. Sorted by the repeat's start."""
    plays = recurring_plays(length, channels, seed, recurring)[1]
    pairs = [(a, b) for seq in plays for a, b in zip(seq, seq[1:])]
    return sorted(pairs, key=lambda p: p[1].start)


def _generate(length: int, channels: int, seed: int, recurring: Mapping[str, Any] | None) -> SyntheticStream:
    recurring = recurring or {"recurring_rate": 0.0}
    cfg = SyntheticConfig(
        level_shift_length=(16, 96), variance_burst_length=(16, 96), fault_length=(16, 96), drift_length=(96, 288), **recurring,
    ).with_coverage(anomaly=0.03)
    return generate(length, channels, seed=seed, config=cfg)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One labelled routing stream: which labelled kinds count as event windows, the recurring
    events of its evaluation streams and those of its (longer) training stream."""

    events: tuple[str, ...]  # the labelled kinds that count as event windows
    recurring: Mapping[str, Any]  # recurring events of the evaluation streams (`SyntheticConfig` fields; empty: none)
    train_recurring: Mapping[str, Any]  # the same for the forecaster's training stream
    train_length: int  # steps of the full training stream

    def __post_init__(self) -> None:
        unknown = set(self.events) - set(KINDS)
        if unknown or not self.events:
            raise ValueError(f"events must be a non-empty subset of {KINDS}, got {self.events}")
        if self.train_length < 1:
            raise ValueError(f"train_length must be >= 1, got {self.train_length}")

    def stream(self, length: int, channels: int, seed: int) -> tuple[np.ndarray, list[LabelWindow]]:
        """An evaluation stream `(values (L, C) float32, windows)` of this scenario."""
        return labelled_stream(length, channels, seed=seed, recurring=self.recurring)

    def repeats(self, length: int, channels: int, seed: int) -> list[tuple[LabelWindow, LabelWindow]]:
        """`(earlier play, repeat)` pairs of the evaluation stream `stream(length, channels, seed)` (`repeat_pairs`)."""
        return repeat_pairs(length, channels, seed=seed, recurring=self.recurring)

    def train_stream(self, channels: int, length: int | None = None, seed: int = TRAIN_SEED) -> tuple[np.ndarray, list[LabelWindow]]:
        """The forecaster's training stream `(values (L, C) float32, windows)`: `train_length` steps unless `length` is given."""
        return labelled_stream(self.train_length if length is None else length, channels, seed=seed, recurring=self.train_recurring)

    def train_plays(self, channels: int, length: int | None = None, seed: int = TRAIN_SEED) -> list[list[LabelWindow]]:
        """Per recurring pattern of `train_stream(channels, length, seed)`, its plays in order (`recurring_plays`)."""
        return recurring_plays(self.train_length if length is None else length, channels, seed, self.train_recurring)[1]


_PROGRAM_RUNS = dict(recurring_replace=True, recurring_min_gap=64, recurring_max_gap=512)
# a job that runs at the same time every day (period 288 steps), 96 steps long, 7 days in a row
_DAILY_JOBS = dict(recurring_repeats=6, recurring_length=(96, 96), recurring_min_gap=192, recurring_max_gap=192)
SCENARIOS: dict[str, Scenario] = {
    "anomalies": Scenario(events=ANOMALY_KINDS, recurring={}, train_recurring={}, train_length=32768),
    "programs": Scenario(events=KINDS, recurring=dict(_PROGRAM_RUNS, recurring_rate=0.06, recurring_repeats=2),
                         train_recurring=dict(_PROGRAM_RUNS, recurring_rate=0.45, recurring_repeats=4), train_length=1 << 20),
    "daily": Scenario(events=KINDS, recurring=dict(_DAILY_JOBS, recurring_rate=0.06),
                      train_recurring=dict(_DAILY_JOBS, recurring_rate=0.3), train_length=1 << 19),
}
