"""Prometheus metrics of one app, in its own `CollectorRegistry` (two apps in a process never share counters).

No label ever carries a key, a tenant or a series id: label values are fixed sets (reasons, modes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from oryx_ts.streams import StepRecord

__all__ = ["Metrics"]

REASONS = ("late", "duplicate", "off_grid", "wrong_width", "not_finite", "empty_row", "bad_timestamp", "too_far")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rows = Counter("oryx_ingest_rows", "observation rows accepted and acknowledged", registry=r)
        self.rejected = Counter("oryx_rejected_rows", "observation rows rejected, by reason", ["reason"], registry=r)
        for reason in REASONS:
            self.rejected.labels(reason)
        self.requests = Counter("oryx_requests", "HTTP requests by route and status class", ["route", "status"], registry=r)
        self.step = Histogram("oryx_step_seconds", "engine flush latency (every queued patch stepped)",
                              buckets=(1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.commit = Histogram("oryx_commit_seconds", "SQLite transaction latency (write + fsync)",
                                buckets=(1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.commit_rows = Histogram("oryx_commit_rows", "observation rows per committed transaction",
                                     buckets=(1, 8, 32, 128, 512, 2048, 8192, 32768), registry=r)
        self.queue = Gauge("oryx_commit_queue_depth", "requests waiting for the group commit", registry=r)
        self.patches = Gauge("oryx_engine_queued_patches", "whole patches waiting for a flush", registry=r)
        self.series = Gauge("oryx_series", "series held by the engine", registry=r)
        self.tokens = Counter("oryx_tokens_stepped", "tokens stepped, by mode", ["mode"], registry=r)
        self.attention = Gauge("oryx_attention_fraction", "share of stepped tokens that ran attention", registry=r)
        self.snapshots = Counter("oryx_snapshots", "engine snapshots written", registry=r)
        self._att = self._all = 0.0

    def on_step(self, rec: StepRecord) -> None:
        att = float((rec.modes_R > 0).sum())
        self._att += att
        self._all += len(rec.modes_R)
        self.tokens.labels("attention").inc(att)
        self.tokens.labels("recurrent").inc(len(rec.modes_R) - att)
        self.attention.set(self._att / self._all)

    def observe_commit(self, rows: int, seconds: float) -> None:
        self.commit.observe(seconds)
        self.commit_rows.observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
