"""`Service`: the engine, its lock, the durable log and the writer, everything the HTTP routes of
`service.app` call.

Write path of `POST /v1/series/{id}/observations` (see docs/SERVICE.md for why this order):
1. under the engine lock: `engine.ingest` (the regularizer decides which rows are accepted), then
   the accepted rows, and only those, are queued for the writer in the engine's order;
2. the writer thread, under the lock, flushes the engine (every queued patch of every waiting
   request, in micro-batches) and adds a `flush` row, then commits the batch with one fsync;
3. the request is answered only after that commit returned; the forecasts the flush made are
   published then (`Service.published`), so a forecast read never reflects rows not yet durable.
If a commit fails, the engine has applied rows that are not durable: the writer fails that batch
and everything queued behind it (503) and rebuilds the engine from the last snapshot plus the
committed log before any other request reaches it, so the engine never stays ahead of the disk.

Recovery (every start): restore the last snapshot (its index records the log seq it covers) and
replay the log after it: `create`/`delete` → add/remove, `obs` → the same `ingest` call with the
same accepted rows, `flush` → `flush`. Rows of the pool are assigned deterministically (the live
engine reloads itself from each snapshot it writes), so replay reproduces the live micro-batches
and hence the same state bit for bit.
"""


import gc
import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import oryx_ts
from oryx_ts.routers import AllRouter, NoneRouter, RoutedForecaster, SurpriseRouter
from oryx_ts.service.metrics import Metrics
from oryx_ts.service.settings import Settings
from oryx_ts.service.store import CommitError, Database, Event, Ticket, Writer
from oryx_ts.streams import AdapterConfig, Engine, FileStore, Forecast, RegularizerPolicy, StepRecord

__all__ = ["Published", "Service", "clean", "key_of"]

log = logging.getLogger("oryx_ts.service")


def settle_gc() -> None:
    """Collect everything, then freeze what survives out of the cycle collector's reach.

    An engine holds hundreds of thousands of long-lived objects (about 270,000 for 5,000 series):
    a full collection over them stops every thread for about 150 ms, which is the whole tail of
    the request latencies. Called once the engine is built (start, recovery) and after each
    snapshot reloads it, under the lock; unfreezing first lets the previous engine's garbage go.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class _SeqStore:
    """A `StateStore` that writes the covered log seq into the snapshot's own index (atomic with it)."""

    def __init__(self, inner: FileStore):
        self.inner = inner
        self.seq = 0

    def write(self, tensors, index):
        self.inner.write(tensors, {**index, "service_log_seq": self.seq})

    def read(self):
        got = self.inner.read()
        self.seq = 0 if got is None else int(got[1].get("service_log_seq", 0))
        return got


def key_of(tenant: str, series: str) -> str:
    return f"{tenant}/{series}"


def clean(x: Any) -> Any:
    """JSON-safe: NaN and inf become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


@dataclass
class Published:
    """The latest acknowledged forecast of one series, readable without the engine lock.

    Built from the engine's `StepRecord` when a flush steps the series and made visible only after
    the commit that holds the flush succeeded, so a reader never sees a forecast of rows that are
    not durable. Immutable once published (a new token replaces the whole record); `replies` caches
    the encoded JSON per (horizon, quantile indices).
    """

    forecast: Forecast
    replies: dict[tuple, bytes] = field(default_factory=dict)


class Service:
    """The engine, its lock, the database and the writer: everything the routes call.

    Reads that need no engine state go around the lock: `published` (latest forecasts), `tenant_of`
    (a cache of verified keys) and `series_meta` (a cache of the series table).

    Raises `ValueError` when the data directory was written for another model.
    """

    def __init__(self, settings: Settings, model: oryx_ts.OryxForecaster | None = None):
        self.settings = s = settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.device = s.resolved_device()
        self.model = (model if model is not None else oryx_ts.load(s.model_dir)).to(self.device)
        self.model.eval()
        cfg = self.model.config
        self.P, self.C, self.Hz = cfg.tokenizer.patch_len, cfg.tokenizer.channels, cfg.head.horizon
        self.quantiles = list(cfg.head.quantiles)
        self.metrics = Metrics()
        self.db = Database(s.database)
        fingerprint = json.dumps({"config": cfg.to_dict(), "router": s.router, "adaptation": s.adaptation,
                                  "tolerance": s.tolerance, "duplicates": s.duplicates, "max_gap": s.max_gap}, sort_keys=True)
        stored = self.db.get_meta("engine")
        if stored is None:
            self.db.set_meta("engine", fingerprint)
        elif stored != fingerprint:
            raise ValueError(f"{s.data_dir} was written by a service with another model or engine settings; "
                             "use a new --data-dir or the same model and settings")
        self.store = _SeqStore(FileStore(s.snapshots))
        self.lock = threading.RLock()
        self.published: dict[str, Published] = {}  # engine key -> latest acknowledged forecast
        self._pending: dict[str, Published] = {}  # stepped by the flush of the commit in flight
        self._tenants: dict[bytes, str] = {}  # sha256(key) -> tenant, verified keys only
        self._meta: dict[str, dict[str, Any]] = {}  # engine key -> the series' row
        self._buckets: dict[bytes, list[float]] = {}  # sha256(key) -> [tokens, last refill time]
        self._buckets_lock = threading.Lock()
        self.closing = False
        self._rows_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self.engine, self.applied_seq = self._recover()
        self.writer = Writer(s.database, lock=self.lock, before_commit=self._before_commit, after_commit=self._after_commit,
                             hold_lock=self._snapshot_due, on_failure=self._on_failure, group=s.group_commit,
                             observe=self.metrics.observe_commit)
        settle_gc()
        self.writer.start()

    # --- engine life cycle --------------------------------------------------------------------

    def _new_engine(self) -> Engine:
        s = self.settings
        router = {"surprise": SurpriseRouter, "none": NoneRouter, "all": AllRouter}[s.router]()
        budget = self.model.config.budget if s.router == "surprise" else None
        return Engine(RoutedForecaster(self.model, router, budget), self.store,
                      adapter=AdapterConfig(enabled=s.adaptation),
                      policy=RegularizerPolicy(tolerance=s.tolerance, duplicates=s.duplicates, max_gap=s.max_gap),
                      max_batch=s.max_batch, on_step=self._on_step)

    def _recover(self) -> tuple[Engine, int]:
        """The last snapshot plus the log after it; returns the engine and the last seq applied."""
        self._pending = {}
        engine = self.engine_in_flush = self._new_engine()
        engine.restore()
        seq = self.store.seq
        replayed = 0
        for seq, ev in self.db.events_after(self.store.seq, self.C):
            self._apply(engine, ev)
            replayed += ev.kind == "obs" and len(ev.ts_n)
        self._rows_since_snapshot = replayed
        self.published, self._pending = self._pending, {}  # the replayed log is durable
        self._meta = {}
        self.metrics.series.set(len(engine.series))
        log.info("recovered %d series: snapshot at seq %d, %d rows replayed, log at seq %d",
                 len(engine.series), self.store.seq, replayed, seq)
        return engine, seq

    @staticmethod
    def _apply(engine: Engine, ev: Event) -> None:
        key = key_of(ev.tenant, ev.series) if ev.series is not None else None
        if ev.kind == "create":
            b = ev.body
            engine.add_series(key, step=b["step"], origin=b["origin"], labels=[tuple(w) for w in b["labels"]])
        elif ev.kind == "delete":
            engine.remove_series(key)
        elif ev.kind == "obs":
            got = engine.ingest(key, ev.ts_n, ev.vals_nC)
            if got.accepted != len(ev.ts_n) or got.rejected:
                raise RuntimeError(f"log replay diverged on {key!r}: {got.rejected[:3]}")
        elif ev.kind == "flush":
            engine.flush()
        else:
            raise RuntimeError(f"unknown log event {ev.kind!r}")

    def _on_step(self, rec: StepRecord) -> None:
        """Each micro-batch of a flush: metrics, and the stepped series' forecasts, pending their commit."""
        self.metrics.on_step(rec)
        engine, P, Hz = self.engine_in_flush, self.P, self.Hz
        served = rec.served_RHzCQ  # a step record's arrays are its receiver's own (the engine copies them)
        for i, sid in enumerate(rec.series_ids):
            n = int(rec.tokens_R[i])
            reg = engine.series[sid].regularizer
            i0 = engine.series[sid].first_index or 0
            self._pending[sid] = Published(Forecast(
                series_id=sid, token=n, origin_timestamp=reg.timestamp_of(i0 + (n + 1) * P - 1),
                timestamps=reg.timestamp_of(i0 + (n + 1) * P) + reg.step * np.arange(Hz, dtype=np.int64),
                quantiles=tuple(self.quantiles), values=served[i], mode=float(rec.modes_R[i]),
                flops=float(rec.flops_R[i]), allowance=float(rec.allowance_R[i])))

    def _publish(self) -> None:
        """After a successful commit: the forecasts its flush made become readable."""
        if self._pending:
            with self.lock:
                self.published.update(self._pending)
                self._pending = {}

    def latest(self, key: str) -> Published:
        """The latest acknowledged forecast of a series (engine key); raises `KeyError` or `ValueError` like
        `Engine.forecast`. Lock-free when published; otherwise (after a restart) read from the engine once."""
        got = self.published.get(key)
        if got is not None:
            return got
        with self.lock:
            got = self.published.get(key)
            if got is None:
                got = self.published[key] = Published(self.engine.forecast(key))
        return got

    def forget(self, key: str) -> None:
        """Under the lock, when a series is deleted: drop what is cached of it."""
        self.published.pop(key, None)
        self._pending.pop(key, None)
        self._meta.pop(key, None)

    def series_meta(self, tenant: str, series: str) -> dict[str, Any] | None:
        """The series' row (channels, step, origin, labels), cached; None if it does not exist."""
        key = key_of(tenant, series)
        got = self._meta.get(key)
        if got is None and key in self.engine.series:
            got = self.db.series_info(tenant, series)
            if got is not None:
                with self.lock:
                    if key in self.engine.series:
                        self._meta[key] = got
        return got

    def tenant_of(self, api_key: str) -> str | None:
        """The tenant of an API key (`Database.tenant_of`), remembering verified keys by their sha256."""
        h = hashlib.sha256(api_key.encode()).digest()
        who = self._tenants.get(h)
        if who is None:
            who = self.db.tenant_of(api_key)
            if who is not None:
                if len(self._tenants) >= 65_536:
                    self._tenants.clear()
                self._tenants[h] = who
        return who

    def admit(self, api_key: str) -> float:
        """Take one request from the key's token bucket: 0.0 if admitted, else the seconds until one is free."""
        rate = self.settings.rate_limit
        if not rate:
            return 0.0
        burst = float(self.settings.rate_burst or max(1.0, 2 * rate))
        h = hashlib.sha256(api_key.encode()).digest()
        now = time.monotonic()
        with self._buckets_lock:
            bucket = self._buckets.get(h)
            if bucket is None:
                if len(self._buckets) >= 65_536:
                    self._buckets.clear()
                bucket = self._buckets[h] = [burst, now]
            bucket[0] = min(burst, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                return 0.0
            return (1.0 - bucket[0]) / rate

    def _before_commit(self, batch: list[Ticket]) -> list[Event]:
        """Under the lock, before the batch commits: step every queued patch, logged as one `flush`."""
        if not self.engine.queued:
            return []
        t0 = time.perf_counter()
        self.engine_in_flush = self.engine
        stepped = self.engine.flush()
        self.metrics.step.observe(time.perf_counter() - t0)
        self.metrics.patches.set(0)
        return [Event("flush")] if stepped else []

    def _snapshot_due(self) -> bool:
        s = self.settings
        n = self._rows_since_snapshot
        if n == 0 or self.closing:
            return False
        return bool((s.snapshot_every_rows and n >= s.snapshot_every_rows)
                    or (s.snapshot_every_s and time.monotonic() - self._last_snapshot >= s.snapshot_every_s))

    def _after_commit(self, last_seq: int, locked: bool) -> None:
        self.applied_seq = max(self.applied_seq, last_seq)
        self._publish()
        self.metrics.queue.set(self.writer.depth)
        if locked and self._snapshot_due():
            self.snapshot()

    def snapshot(self) -> None:
        """Under the lock, with every applied row committed: snapshot the engine, then reload the live
        engine from that snapshot so that its pool rows are those a recovery would assign."""
        with self.lock:
            if self.engine.queued:
                raise AssertionError("snapshot with uncommitted patches")
            self.store.seq = self.applied_seq
            try:
                self.engine.snapshot()
            except OSError as e:  # the engine is untouched; the log still holds everything
                log.error("snapshot failed: %s", e)
                return
            self.engine.restore()
            self.db.record_snapshot(self.applied_seq, len(self.engine.series))
            self._rows_since_snapshot = 0
            self._last_snapshot = time.monotonic()
            self.metrics.snapshots.inc()
            settle_gc()

    def _on_failure(self, error: BaseException) -> None:
        log.error("commit failed (%s): rebuilding the engine from the durable log", error)
        self.writer.next_seq = self.db.last_seq() + 1
        self.engine, self.applied_seq = self._recover()  # drops the failed flush's pending forecasts
        settle_gc()

    def close(self, *, clean: bool = True) -> None:
        """Stop the writer (committing what is queued); a clean close also writes a final snapshot."""
        self.closing = True
        self.writer.stop()
        if clean:
            with self.lock:
                self.applied_seq = max(self.applied_seq, self.db.last_seq())
                if self._rows_since_snapshot or not self.db.snapshots():
                    self.snapshot()

    # --- changes ------------------------------------------------------------------------------

    def change(self, apply) -> tuple[Any, int]:
        """Run `apply() -> (events, result)` on the engine under the lock, then make its events durable.

        Returns (result, last committed seq). Raises `CommitError` when they could not be committed.
        """
        with self.lock:
            if self.closing:
                raise CommitError("the service is shutting down")
            if self.writer.failed is not None:
                raise CommitError(f"storage failed: {self.writer.failed}")
            events, result = apply()
            if not events:
                return result, 0
            self._rows_since_snapshot += sum(len(e.ts_n) for e in events if e.kind == "obs")
            if not self.settings.group_commit:
                return result, self.writer.commit_alone(events)
            ticket = self.writer.submit(events)
            self.metrics.queue.set(self.writer.depth)
        return result, self.writer.wait(ticket)
