"""Labelled synthetic telemetry: seasonal, correlated, noisy multichannel streams with rare regimes.

Every stream is a deterministic function of `(length, channels, seed, config)`. Generation is split
into a small *plan* (channel parameters, knots of the slow components, every event and missing
stretch, O(events) memory) and a *render* of any step range `[a, b)` from that plan. Noise is drawn
per fixed block of steps from its own seed, so rendering in chunks of any size gives bit-identical
values; that is what lets `synthetic_parquet.to_parquet` write 10M+ steps in bounded memory.

Values are built in normalized units `z` and mapped to `level + scale * z` per channel:
    z = season * regime + wander + trend + sigma(t) * eps + additive events, then faults.
Every injected effect stays inside its labelled window: outside all windows the stream equals the
same stream generated with every rate set to zero.

Legend: L raw steps, C channels, G channel groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from oryx_ts.datasets.labels import LabelWindow, TelemetryStream

__all__ = [
    "ANOMALY_KINDS",
    "EVENT_KINDS",
    "KINDS",
    "LabelWindow",
    "SyntheticConfig",
    "SyntheticStream",
    "generate",
    "iter_chunks",
]

ANOMALY_KINDS = ("spike", "level_shift", "variance_burst", "fault", "drift")
EVENT_KINDS = ("regime_switch", "recurring_first", "recurring_repeat")
KINDS = ANOMALY_KINDS + EVENT_KINDS

NOISE_BLOCK = 1 << 16  # steps per independently seeded noise block
PARQUET_META_KEY = "oryx_ts"

# Stream keys of the seed sequence: one independent generator per concern, so that switching one
# regime kind off leaves every other draw (noise, knots, other kinds' windows) unchanged.
_KEY_PARAMS, _KEY_NOISE, _KEY_MISSING = 0, 1, 2
_KEY_EVENT = {kind: 10 + i for i, kind in enumerate(("spike", "level_shift", "variance_burst", "fault",
                                                       "drift", "regime_switch", "recurring"))}


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=key))


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Shape of the synthetic telemetry. Rates are the expected share of steps inside windows of
    that kind (windows of one kind never overlap; different kinds may). Lengths are inclusive
    `(min, max)` ranges in raw steps; amplitudes are in normalized units (a channel's daily cycle
    has amplitude about `daily_amplitude`)."""

    steps_per_day: int = 288
    start: str | None = "2024-01-01T00:00:00"
    groups: int = 2
    group_correlation: float = 0.7
    daily_amplitude: float = 1.0
    weekly_amplitude: float = 0.4
    weekend_factor: float = 0.6
    wander_scale: float = 0.3
    trend_scale: float = 0.05
    noise: float = 0.12
    heteroscedasticity: float = 1.0
    missing_rate: float = 0.005
    missing_length: tuple[int, int] = (5, 200)
    spike_rate: float = 0.0005
    spike_length: tuple[int, int] = (1, 3)
    level_shift_rate: float = 0.005
    level_shift_length: tuple[int, int] = (48, 288)
    variance_burst_rate: float = 0.005
    variance_burst_length: tuple[int, int] = (32, 192)
    fault_rate: float = 0.003
    fault_length: tuple[int, int] = (32, 192)
    drift_rate: float = 0.005
    drift_length: tuple[int, int] = (288, 1152)
    regime_switch_rate: float = 0.01
    regime_switch_length: tuple[int, int] = (144, 576)
    recurring_rate: float = 0.004
    recurring_length: tuple[int, int] = (64, 160)
    recurring_min_gap: int = 2016
    recurring_max_gap: int | None = None  # steps between the end of a first occurrence and its repeat; None: any
    recurring_repeats: int = 1  # repeats after each first occurrence, each `recurring_min_gap`..`recurring_max_gap` steps after the previous one
    recurring_replace: bool = False  # the pattern replaces the daily and weekly cycle in its window (a program run) instead of adding to it

    def __post_init__(self) -> None:
        if self.steps_per_day < 4:
            raise ValueError(f"steps_per_day must be >= 4, got {self.steps_per_day}")
        if self.start is not None:
            if 86400 % self.steps_per_day:
                raise ValueError(f"steps_per_day={self.steps_per_day} must divide 86400 when start is set")
            np.datetime64(self.start)
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        for name in ("group_correlation", "missing_rate") + tuple(f"{k}_rate" for k in _rate_kinds()):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if self.total_rate() > 0.6:
            raise ValueError(f"regime rates sum to {self.total_rate():.3f}; keep them below 0.6")
        for name in ("missing_length",) + tuple(f"{k}_length" for k in _rate_kinds()):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if self.recurring_repeats < 1:
            raise ValueError(f"recurring_repeats must be >= 1, got {self.recurring_repeats}")
        if self.recurring_max_gap is not None and self.recurring_max_gap < self.recurring_min_gap:
            raise ValueError(f"recurring_max_gap ({self.recurring_max_gap}) must be >= recurring_min_gap ({self.recurring_min_gap})")
        for name in ("daily_amplitude", "weekly_amplitude", "wander_scale", "trend_scale", "noise",
                     "heteroscedasticity", "weekend_factor", "recurring_min_gap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def rate(self, kind: str) -> float:
        return getattr(self, f"{kind}_rate")

    def total_rate(self) -> float:
        return sum(self.rate(k) for k in _rate_kinds())

    def with_coverage(self, anomaly: float | None = None, event: float | None = None) -> SyntheticConfig:
        """Copy with the anomaly kinds (and/or event kinds) rescaled so their rates sum to the
        given share of steps, keeping the ratios between kinds."""
        changes: dict[str, float] = {}
        for target, kinds in ((anomaly, ANOMALY_KINDS), (event, ("regime_switch", "recurring"))):
            if target is None:
                continue
            total = sum(self.rate(k) for k in kinds)
            for k in kinds:
                changes[f"{k}_rate"] = target * (self.rate(k) / total if total else 1 / len(kinds))
        return dataclasses.replace(self, **changes)

    def without_regimes(self) -> SyntheticConfig:
        """Copy with every regime rate set to zero (same seasonality, noise and gaps)."""
        return dataclasses.replace(self, **{f"{k}_rate": 0.0 for k in _rate_kinds()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SyntheticConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown SyntheticConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _rate_kinds() -> tuple[str, ...]:
    return ("spike", "level_shift", "variance_burst", "fault", "drift", "regime_switch", "recurring")


@dataclass(frozen=True)
class _Event:
    kind: str
    start: int
    end: int
    channels: np.ndarray  # int indices of the affected channels
    amount: np.ndarray  # per affected channel: offset, factor or stuck value (kind-specific)
    extra: np.ndarray | None = None  # regime: (season factor, noise factor); recurring: pattern (len, n_ch)


@dataclass
class _Plan:
    length: int
    channels: int
    seed: int
    config: SyntheticConfig
    group_C: np.ndarray
    level_C: np.ndarray
    scale_C: np.ndarray
    daily_C: np.ndarray
    daily_phase_C: np.ndarray
    harmonic_C: np.ndarray
    harmonic_phase_C: np.ndarray
    weekly_C: np.ndarray
    weekly_phase_C: np.ndarray
    noise_C: np.ndarray
    wander_every: int
    wander_KC: np.ndarray
    trend_DC: np.ndarray
    events: list[_Event]
    event_starts: np.ndarray
    event_ends: np.ndarray
    missing: np.ndarray  # (M, 3) int64: start, end, channel (-1 = all channels)
    labels: list[LabelWindow]
    recurrences: list[tuple[LabelWindow, LabelWindow]]


def _place(rng: np.random.Generator, length: int, lengths: np.ndarray) -> np.ndarray:
    """Starts for non-overlapping, non-touching windows of the given lengths, uniformly spread."""
    n = len(lengths)
    free = length - int(lengths.sum()) - n
    if n == 0 or free < 0:
        return np.zeros(0, dtype=np.int64)
    points = np.sort(rng.integers(0, free + 1, size=n))
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
    return points + offsets


def _count(rate: float, length: int, lo: int, hi: int) -> int:
    return int(round(rate * length / ((lo + hi) / 2)))


def _sign(rng: np.random.Generator, k: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=k)


def _channel_subset(rng: np.random.Generator, channels: int, low: int, high: int) -> np.ndarray:
    k = int(rng.integers(min(low, channels), min(high, channels) + 1))
    return np.sort(rng.choice(channels, size=k, replace=False))


def _recurring_pattern(rng: np.random.Generator, n: int, channels: int) -> np.ndarray:
    """A distinctive waveform (n, channels): Gaussian bumps of both signs plus a square segment."""
    t = np.arange(n)[:, None]
    pattern = np.zeros((n, channels))
    for _ in range(int(rng.integers(3, 7))):
        centre = rng.uniform(0, n, size=channels)
        width = rng.uniform(2, max(3.0, n / 8), size=channels)
        amp = rng.choice([-1.0, 1.0], size=channels) * rng.uniform(1.0, 2.5, size=channels)
        pattern += amp * np.exp(-0.5 * ((t - centre) / width) ** 2)
    a = int(rng.integers(0, n // 2))
    b = int(rng.integers(a + max(1, n // 8), n + 1))
    pattern[a:b] += rng.choice([-1.5, 1.5], size=channels)
    return pattern.astype(np.float32)


def _plan(length: int, channels: int, seed: int, config: SyntheticConfig) -> _Plan:
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    cfg = config
    C, spd = channels, cfg.steps_per_day
    G = min(cfg.groups, C)
    rng = _rng(seed, _KEY_PARAMS)
    group_C = (np.arange(C) * G) // C
    level_C = rng.uniform(-5.0, 20.0, C)
    scale_C = np.exp(rng.normal(0.0, 0.5, C))
    daily_phase_G = rng.uniform(0, 2 * np.pi, G)
    harmonic_phase_G = rng.uniform(0, 2 * np.pi, G)
    weekly_phase_G = rng.uniform(0, 2 * np.pi, G)
    daily_C = cfg.daily_amplitude * rng.uniform(0.6, 1.4, C)
    daily_phase_C = daily_phase_G[group_C] + rng.normal(0, 0.2, C)
    harmonic_C = daily_C * rng.uniform(0.0, 0.5, C)
    harmonic_phase_C = harmonic_phase_G[group_C] + rng.normal(0, 0.2, C)
    weekly_C = cfg.weekly_amplitude * rng.uniform(0.5, 1.5, C)
    weekly_phase_C = weekly_phase_G[group_C] + rng.normal(0, 0.2, C)
    noise_C = cfg.noise * rng.uniform(0.7, 1.3, C)

    # Slow components on knots, shared within a group through `group_correlation`.
    rho = cfg.group_correlation
    wander_every = max(1, spd // 4)
    knots = length // wander_every + 2
    raw = rng.standard_normal((knots, G + C))
    wander_KC = cfg.wander_scale * (math.sqrt(rho) * raw[:, group_C] + math.sqrt(1 - rho) * raw[:, G:])
    days = length // spd + 2
    steps = rng.standard_normal((days, G + C)) * cfg.trend_scale
    trend = np.zeros((days, G + C))
    for d in range(1, days):  # AR(1) over days: a wandering trend that stays bounded
        trend[d] = 0.98 * trend[d - 1] + steps[d]
    trend_DC = math.sqrt(rho) * trend[:, group_C] + math.sqrt(1 - rho) * trend[:, G:]

    f32 = np.float32
    plan = _Plan(length, C, seed, cfg, group_C, level_C, scale_C, daily_C.astype(f32), daily_phase_C.astype(f32),
                 harmonic_C.astype(f32), harmonic_phase_C.astype(f32), weekly_C.astype(f32),
                 weekly_phase_C.astype(f32), noise_C.astype(f32), wander_every,
                 wander_KC.astype(np.float32), trend_DC.astype(np.float32), [], np.zeros(0, np.int64),
                 np.zeros(0, np.int64), np.zeros((0, 3), np.int64), [], [])

    events: list[_Event] = []
    for kind in ("spike", "level_shift", "variance_burst", "fault", "drift", "regime_switch"):
        lo, hi = getattr(cfg, f"{kind}_length")
        n = _count(cfg.rate(kind), length, lo, hi)
        if n == 0:
            continue
        erng = _rng(seed, _KEY_EVENT[kind])
        lengths = erng.integers(lo, hi + 1, size=n)
        for s, d in zip(_place(erng, length, lengths), lengths):
            s, e = int(s), int(s + d)
            if kind == "spike":
                ch = _channel_subset(erng, C, 1, 2)
                events.append(_Event(kind, s, e, ch, _sign(erng, len(ch)) * erng.uniform(3.0, 6.0, len(ch))))
            elif kind == "level_shift":
                if erng.random() < 0.5:
                    ch = np.flatnonzero(group_C == erng.integers(G))
                else:
                    ch = _channel_subset(erng, C, 1, 1)
                events.append(_Event(kind, s, e, ch, _sign(erng, 1) * erng.uniform(0.8, 1.6, len(ch))))
            elif kind == "variance_burst":
                ch = _channel_subset(erng, C, 1, max(1, C // 2))
                events.append(_Event(kind, s, e, ch, erng.uniform(3.0, 6.0, len(ch))))
            elif kind == "fault":
                ch = _channel_subset(erng, C, 2, max(2, C // 2))
                stuck = _deterministic(plan, np.array([s]))[0, ch] + erng.normal(0, 0.05, len(ch))
                events.append(_Event(kind, s, e, ch, stuck))
            elif kind == "drift":
                ch = _channel_subset(erng, C, 1, 1)
                events.append(_Event(kind, s, e, ch, _sign(erng, 1) * erng.uniform(1.0, 2.0, 1)))
            else:
                ch = np.flatnonzero(group_C == erng.integers(G))
                factors = np.array([erng.uniform(0.0, 0.3), 0.5])
                events.append(_Event(kind, s, e, ch, _sign(erng, 1) * erng.uniform(0.5, 1.5, len(ch)), factors))

    recurrences: list[tuple[LabelWindow, LabelWindow]] = []
    lo, hi = cfg.recurring_length
    R = cfg.recurring_repeats
    groups = _count(cfg.recurring_rate, length, (1 + R) * lo, (1 + R) * hi)
    if groups:
        rrng = _rng(seed, _KEY_EVENT["recurring"])
        taken: list[tuple[int, int]] = []
        placed = 0
        for _ in range(groups * 20):
            if placed == groups:
                break
            n = int(rrng.integers(lo, hi + 1))
            last_first = length - (1 + R) * n - R * cfg.recurring_min_gap
            if last_first < 0:
                break
            starts = [int(rrng.integers(0, last_first + 1))]
            for i in range(1, R + 1):  # each repeat after the previous one, leaving room for the rest
                last = length - n - (R - i) * (n + cfg.recurring_min_gap)
                if cfg.recurring_max_gap is not None:
                    last = min(last, starts[-1] + n + cfg.recurring_max_gap)
                starts.append(int(rrng.integers(starts[-1] + n + cfg.recurring_min_gap, last + 1)))
            if any(a <= s + n and s <= b for s in starts for a, b in taken):
                continue
            taken += [(s, s + n) for s in starts]
            placed += 1
            ch = _channel_subset(rrng, C, max(1, C // 2), C)
            pattern = _recurring_pattern(rrng, n, len(ch))
            first = LabelWindow(starts[0], starts[0] + n, "recurring_first")
            events.append(_Event("recurring_first", starts[0], starts[0] + n, ch, np.zeros(len(ch)), pattern))
            for s in starts[1:]:
                events.append(_Event("recurring_repeat", s, s + n, ch, np.zeros(len(ch)), pattern))
                recurrences.append((first, LabelWindow(s, s + n, "recurring_repeat")))

    events.sort(key=lambda ev: (ev.start, ev.kind))
    plan.events = events
    plan.event_starts = np.array([ev.start for ev in events], dtype=np.int64)
    plan.event_ends = np.array([ev.end for ev in events], dtype=np.int64)
    plan.labels = [LabelWindow(ev.start, ev.end, ev.kind) for ev in events]
    plan.recurrences = sorted(recurrences, key=lambda p: p[0].start)

    lo, hi = cfg.missing_length
    cells_per_stretch = (lo + hi) / 2 * (0.3 * C + 0.7)
    n_missing = int(round(cfg.missing_rate * length * C / cells_per_stretch))
    if n_missing:
        mrng = _rng(seed, _KEY_MISSING)
        d = mrng.integers(lo, hi + 1, size=n_missing)
        s = mrng.integers(0, max(1, length - lo), size=n_missing)
        ch = np.where(mrng.random(n_missing) < 0.3, -1, mrng.integers(0, C, size=n_missing))
        plan.missing = np.stack([s, np.minimum(s + d, length), ch], axis=1).astype(np.int64)
    return plan


def _interp(knots_KC: np.ndarray, t: np.ndarray, every: int) -> np.ndarray:
    """Cosine interpolation of knot rows placed every `every` steps, at integer steps t."""
    i = t // every
    w = (t % every).astype(np.float32) * np.float32(np.pi / every)
    w = (np.float32(0.5) - np.float32(0.5) * np.cos(w))[:, None]
    out = knots_KC[i + 1] - knots_KC[i]
    out *= w
    out += knots_KC[i]
    return out


def _season(plan: _Plan, t: np.ndarray) -> np.ndarray:
    cfg = plan.config
    spd = cfg.steps_per_day
    f32 = np.float32
    # Phases from t modulo the period, so float32 keeps full precision on arbitrarily long streams.
    day_phase = (t % spd).astype(f32)[:, None] * f32(2 * np.pi / spd)
    week_phase = (t % (7 * spd)).astype(f32)[:, None] * f32(2 * np.pi / (7 * spd))
    weekend = np.where((t // spd) % 7 >= 5, f32(cfg.weekend_factor), f32(1.0))[:, None]
    daily = plan.daily_C * np.sin(day_phase + plan.daily_phase_C)
    daily += plan.harmonic_C * np.sin(2 * day_phase + plan.harmonic_phase_C)
    daily *= weekend
    daily += plan.weekly_C * np.sin(week_phase + plan.weekly_phase_C)
    return daily


def _deterministic(plan: _Plan, t: np.ndarray) -> np.ndarray:
    """The noise-free, event-free part of z at steps t: (len(t), C) float32."""
    slow = _interp(plan.wander_KC, t, plan.wander_every) + _interp(plan.trend_DC, t, plan.config.steps_per_day)
    return _season(plan, t) + slow


def _noise(plan: _Plan, a: int, b: int) -> np.ndarray:
    """Unit Gaussian noise (b - a, C) for steps [a, b), correlated within groups, chunk-invariant."""
    G = int(plan.group_C.max()) + 1
    rho = plan.config.group_correlation
    parts = []
    for block in range(a // NOISE_BLOCK, (b - 1) // NOISE_BLOCK + 1):
        raw = _rng(plan.seed, _KEY_NOISE, block).standard_normal((NOISE_BLOCK, G + plan.channels), dtype=np.float32)
        lo, hi = max(a - block * NOISE_BLOCK, 0), min(b - block * NOISE_BLOCK, NOISE_BLOCK)
        parts.append(raw[lo:hi])
    raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return np.float32(math.sqrt(rho)) * raw[:, plan.group_C] + np.float32(math.sqrt(1 - rho)) * raw[:, G:]


def _render(plan: _Plan, a: int, b: int) -> np.ndarray:
    """Values (b - a, C) float32 for steps [a, b)."""
    cfg = plan.config
    t = np.arange(a, b, dtype=np.int64)
    season = _season(plan, t)
    slow = _interp(plan.wander_KC, t, plan.wander_every) + _interp(plan.trend_DC, t, cfg.steps_per_day)
    spd = cfg.steps_per_day
    day_phase = (t % spd).astype(np.float32)[:, None] * np.float32(2 * np.pi / spd)
    sigma = np.sin(day_phase + plan.daily_phase_C)
    sigma += 1
    sigma *= np.float32(0.5 * cfg.heteroscedasticity)
    sigma += 1
    sigma *= plan.noise_C

    hit = np.flatnonzero((plan.event_starts < b) & (plan.event_ends > a)) if len(plan.events) else []
    active = [plan.events[i] for i in hit]
    offset = np.zeros_like(season)
    for ev in active:  # multiplicative effects first
        s, e = max(ev.start, a) - a, min(ev.end, b) - a
        cols = ev.channels
        if ev.kind == "variance_burst":
            sigma[s:e, cols] *= ev.amount.astype(np.float32)
        elif ev.kind == "regime_switch":
            season[s:e, cols] *= np.float32(ev.extra[0])
            sigma[s:e, cols] *= np.float32(ev.extra[1])
            offset[s:e, cols] += ev.amount.astype(np.float32)
        elif ev.kind in ("recurring_first", "recurring_repeat") and cfg.recurring_replace:
            season[s:e, cols] = 0.0

    z = _noise(plan, a, b)
    z *= sigma
    z += season
    z += slow
    z += offset
    del sigma, season, slow, offset
    for ev in active:  # additive effects, then faults overwrite
        s, e = max(ev.start, a) - a, min(ev.end, b) - a
        cols = ev.channels
        if ev.kind in ("level_shift", "spike"):
            z[s:e, cols] += ev.amount.astype(np.float32)
        elif ev.kind == "drift":
            ramp = (np.arange(a + s, a + e) - ev.start + 1) / (ev.end - ev.start)
            z[s:e, cols] += (ramp[:, None] * ev.amount).astype(np.float32)
        elif ev.kind in ("recurring_first", "recurring_repeat"):
            z[s:e, cols] += ev.extra[a + s - ev.start : a + e - ev.start]
    for ev in active:
        if ev.kind == "fault":
            s, e = max(ev.start, a) - a, min(ev.end, b) - a
            z[s:e, ev.channels] = ev.amount.astype(np.float32)

    values = z
    values *= plan.scale_C.astype(np.float32)
    values += plan.level_C.astype(np.float32)
    if len(plan.missing):
        m = plan.missing[(plan.missing[:, 0] < b) & (plan.missing[:, 1] > a)]
        for s, e, ch in m:
            rows = slice(max(s, a) - a, min(e, b) - a)
            if ch < 0:
                values[rows] = np.nan
            else:
                values[rows, ch] = np.nan
    return values


@dataclass
class SyntheticStream(TelemetryStream):
    """A generated stream: `TelemetryStream` plus how it was made and the recurrence pairs
    `(first, repeat)` (the same pattern, the repeat at least `recurring_min_gap` steps later)."""

    seed: int = 0
    config: SyntheticConfig = field(default_factory=SyntheticConfig)
    recurrences: list[tuple[LabelWindow, LabelWindow]] = field(default_factory=list)
    channel_level: np.ndarray | None = None
    channel_scale: np.ndarray | None = None


def _grid(config: SyntheticConfig) -> tuple[np.datetime64 | None, np.timedelta64 | None]:
    step = np.timedelta64(86400 // config.steps_per_day, "s") if 86400 % config.steps_per_day == 0 else None
    start = None if config.start is None else np.datetime64(config.start, "s")
    return start, step


def _chunk_ranges(length: int, chunk: int) -> list[tuple[int, int]]:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(a, min(a + chunk, length)) for a in range(0, length, chunk)]


def generate(
    length: int,
    channels: int = 8,
    *,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    chunk: int = 1 << 18,
    progress: bool | None = None,
) -> SyntheticStream:
    """Generate a labelled stream in memory.

    Returns a `SyntheticStream` with values float32 (length, channels), NaN = missing, labels
    sorted by start. Deterministic in (length, channels, seed, config); `chunk` only bounds the
    temporaries and never changes the values. Raises ValueError on non-positive sizes.
    """
    config = config or SyntheticConfig()
    plan = _plan(length, channels, seed, config)
    values = np.empty((length, channels), dtype=np.float32)
    ranges = _chunk_ranges(length, chunk)
    show = len(ranges) > 4 if progress is None else progress
    for a, b in tqdm(ranges, desc="generate", unit="chunk", disable=not show):
        values[a:b] = _render(plan, a, b)
    start, step = _grid(config)
    return SyntheticStream(
        values=values, labels=list(plan.labels), channels=tuple(f"ch{i}" for i in range(channels)),
        start=start, step=step, name=f"synthetic-seed{seed}",
        meta={"source": "synthetic", "seed": seed, "config": config.to_dict()},
        seed=seed, config=config, recurrences=list(plan.recurrences),
        channel_level=plan.level_C.astype(np.float32), channel_scale=plan.scale_C.astype(np.float32),
    )


def iter_chunks(
    length: int,
    channels: int = 8,
    *,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    chunk: int = 1 << 18,
) -> tuple[list[LabelWindow], Iterator[tuple[int, np.ndarray]]]:
    """The labels of the stream and an iterator of `(first_step, values (n, C))` chunks; the
    chunks concatenate to `generate(...).values` exactly."""
    config = config or SyntheticConfig()
    plan = _plan(length, channels, seed, config)
    ranges = _chunk_ranges(length, chunk)
    return list(plan.labels), ((a, _render(plan, a, b)) for a, b in ranges)
