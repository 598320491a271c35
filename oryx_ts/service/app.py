"""`create_app(settings)`: the FastAPI service over one `streams.Engine`.

Write path of `POST /v1/series/{id}/observations` (see docs/SERVICE.md for why this order):
1. under the engine lock: `engine.ingest` (the regularizer decides which rows are accepted), then
   the accepted rows, and only those, are queued for the writer in the engine's order;
2. the writer thread, under the lock, flushes the engine (every queued patch of every waiting
   request, in micro-batches) and adds a `flush` row, then commits the batch with one fsync;
3. the request is answered only after that commit returned.
If a commit fails, the engine has applied rows that are not durable: the writer fails that batch
and everything queued behind it (503) and rebuilds the engine from the last snapshot plus the
committed log before any other request reaches it, so the engine never stays ahead of the disk.

Recovery (every start): restore the last snapshot (its index records the log seq it covers) and
replay the log after it: `create`/`delete` → add/remove, `obs` → the same `ingest` call with the
same accepted rows, `flush` → `flush`. Rows of the pool are assigned deterministically (the live
engine reloads itself from each snapshot it writes), so replay reproduces the live micro-batches
and hence the same state bit for bit.
"""


import json
import logging
import math
import re
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

import oryx_ts
from oryx_ts.routers import AllRouter, NoneRouter, RoutedForecaster, SurpriseRouter
from oryx_ts.service.metrics import Metrics
from oryx_ts.service.settings import Settings
from oryx_ts.service.store import CommitError, Database, Event, Ticket, Writer
from oryx_ts.streams import AdapterConfig, Engine, FileStore, RegularizerPolicy

__all__ = ["Service", "create_app"]

log = logging.getLogger("oryx_ts.service")

INT64 = dict(ge=-(2**63), le=2**63 - 1)
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
HARD_MAX_ROWS = 100_000  # schema bound; `Settings.max_rows` is the one enforced per app


# --- request and response models ----------------------------------------------------------------

class SeriesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256, description="[A-Za-z0-9_.:-]+, at most Settings.max_id_len")
    channels: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(min_length=1, max_length=1024)
    step: StrictInt = Field(gt=0, le=2**62, description="grid step, in the timestamps' units")
    origin: Annotated[StrictInt, Field(**INT64)] | None = None
    patch_len: StrictInt | None = Field(default=None, description="if given, must equal the model's")
    labels: list[Annotated[list[Annotated[StrictInt, Field(**INT64)]], Field(min_length=2, max_length=2)]] = Field(
        default_factory=list, max_length=10_000, description="[start, end) windows the router should not miss")


class Observations(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timestamps: list[Annotated[StrictInt, Field(**INT64)]] = Field(max_length=HARD_MAX_ROWS)
    values: list[list[StrictFloat | StrictInt | None]] = Field(
        max_length=HARD_MAX_ROWS, description="one row per timestamp; null = missing channel")


class ErrorReply(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="why: a sentence, or the fields that failed validation")


_ERRORS = {code: {"model": ErrorReply} for code in (400, 401, 404, 409, 413, 422, 503)}


class RejectedRow(BaseModel):
    index: int
    timestamp: int | None
    reason: str
    detail: str


class IngestReply(BaseModel):
    accepted: int
    rejected: list[RejectedRow]
    patches_queued: int
    seq: int = Field(description="log sequence number of the last row committed for this request (0: none)")


class SeriesInfo(BaseModel):
    id: str
    channels: list[str]
    step: int
    origin: int | None
    labels: list[list[int]]
    patch_len: int
    horizon: int
    quantiles: list[float]


class ForecastReply(BaseModel):
    series: str
    token: int
    origin_timestamp: int
    timestamps: list[int]
    channels: list[str]
    quantiles: list[float]
    values: list[list[list[float | None]]] = Field(description="(horizon, channel, quantile)")
    mode: str
    flops: float
    allowance: float | None


# --- the service ----------------------------------------------------------------------------------

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


def _key(tenant: str, series: str) -> str:
    return f"{tenant}/{series}"


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and inf become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Service:
    """The engine, its lock, the database and the writer: everything the routes call.

    Raises `ValueError` when the data directory was written for another model.
    """

    def __init__(self, settings: Settings, model: oryx_ts.OryxForecaster | None = None):
        self.settings = s = settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.model = model if model is not None else oryx_ts.load(s.model_dir)
        self.model.eval()
        cfg = self.model.config
        self.P, self.C, self.Hz = cfg.tokenizer.patch_len, cfg.tokenizer.channels, cfg.head.horizon
        self.quantiles = list(cfg.head.quantiles)
        self.metrics = Metrics()
        self.db = Database(s.database)
        fingerprint = json.dumps({"config": cfg.to_dict(), "router": s.router, "adaptation": s.adaptation,
                                  "tolerance": s.tolerance, "duplicates": s.duplicates}, sort_keys=True)
        stored = self.db.get_meta("engine")
        if stored is None:
            self.db.set_meta("engine", fingerprint)
        elif stored != fingerprint:
            raise ValueError(f"{s.data_dir} was written by a service with another model or engine settings; "
                             "use a new --data-dir or the same model and settings")
        self.store = _SeqStore(FileStore(s.snapshots))
        self.lock = threading.RLock()
        self.closing = False
        self._rows_since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self.engine, self.applied_seq = self._recover()
        self.writer = Writer(s.database, lock=self.lock, before_commit=self._before_commit, after_commit=self._after_commit,
                             hold_lock=self._snapshot_due, on_failure=self._on_failure, group=s.group_commit,
                             observe=self.metrics.observe_commit)
        self.writer.start()

    # --- engine life cycle --------------------------------------------------------------------

    def _new_engine(self) -> Engine:
        s = self.settings
        router = {"surprise": SurpriseRouter, "none": NoneRouter, "all": AllRouter}[s.router]()
        budget = self.model.config.budget if s.router == "surprise" else None
        return Engine(RoutedForecaster(self.model, router, budget), self.store,
                      adapter=AdapterConfig(enabled=s.adaptation),
                      policy=RegularizerPolicy(tolerance=s.tolerance, duplicates=s.duplicates),
                      max_batch=s.max_batch, on_step=self.metrics.on_step)

    def _recover(self) -> tuple[Engine, int]:
        """The last snapshot plus the log after it; returns the engine and the last seq applied."""
        engine = self._new_engine()
        engine.restore()
        seq = self.store.seq
        replayed = 0
        for seq, ev in self.db.events_after(self.store.seq, self.C):
            self._apply(engine, ev)
            replayed += ev.kind == "obs" and len(ev.ts_n)
        self._rows_since_snapshot = replayed
        self.metrics.series.set(len(engine.series))
        log.info("recovered %d series: snapshot at seq %d, %d rows replayed, log at seq %d",
                 len(engine.series), self.store.seq, replayed, seq)
        return engine, seq

    @staticmethod
    def _apply(engine: Engine, ev: Event) -> None:
        key = _key(ev.tenant, ev.series) if ev.series is not None else None
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

    def _before_commit(self, batch: list[Ticket]) -> list[Event]:
        """Under the lock, before the batch commits: step every queued patch, logged as one `flush`."""
        if not self.engine.queued:
            return []
        t0 = time.perf_counter()
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

    def _on_failure(self, error: BaseException) -> None:
        log.error("commit failed (%s): rebuilding the engine from the durable log", error)
        self.writer.next_seq = self.db.last_seq() + 1
        self.engine, self.applied_seq = self._recover()

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


# --- the app --------------------------------------------------------------------------------------

def _http(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


class _BodyLimit:
    """Pure ASGI middleware: a body over `limit` bytes (declared or streamed) is a 413 before any route runs."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send):
        payload = json.dumps({"detail": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def create_app(settings: Settings, *, model: oryx_ts.OryxForecaster | None = None) -> FastAPI:
    """The service as a FastAPI app; recovery (snapshot + log replay) runs here, before the app exists.

    `model` skips loading `settings.model_dir` (tests). Shutting the app down (its lifespan) writes a
    final snapshot; dropping it without that is a crash, and the next app recovers from the log.
    """
    service = Service(settings, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close(clean=True)

    app = FastAPI(title="oryx_ts forecasting service", version="1", lifespan=lifespan, responses=_ERRORS)
    app.state.service = service
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    m = service.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        m.requests.labels(getattr(route, "path", "unmatched"), f"{response.status_code // 100}xx").inc()
        return response

    def tenant(authorization: Annotated[str | None, Header()] = None,
               x_api_key: Annotated[str | None, Header()] = None) -> str:
        key = x_api_key
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        who = service.db.tenant_of(key) if key else None
        if who is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    Tenant = Annotated[str, Depends(tenant)]

    def unknown(series: str) -> HTTPException:
        # the same answer for a missing series and another tenant's: nothing tells them apart
        return _http(404, f"unknown series {series!r}")

    def owned(who: str, series: str) -> str:
        key = _key(who, series)
        if len(series) > settings.max_id_len or not ID_RE.match(series) or key not in service.engine.series:
            raise unknown(series)
        return key

    def info(who: str, series: str) -> SeriesInfo:
        meta = service.db.series_info(who, series)
        if meta is None:
            raise unknown(series)
        return SeriesInfo(id=series, channels=meta["channels"], step=meta["step"], origin=meta["origin"],
                          labels=[list(w) for w in meta["labels"]], patch_len=service.P, horizon=service.Hz,
                          quantiles=service.quantiles)

    @app.get("/healthz")
    def healthz():
        failed = service.writer.failed
        body = {"status": "failed" if failed else "ok", "series": len(service.engine.series),
                "log_seq": service.applied_seq}
        if failed:
            body["reason"] = f"storage failed: {failed}"
        return JSONResponse(status_code=503 if failed else 200, content=body)

    @app.get("/metrics")
    def metrics():
        m.series.set(len(service.engine.series))
        m.queue.set(service.writer.depth)
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/series", status_code=201, response_model=SeriesInfo)
    def create_series(spec: SeriesSpec, who: Tenant):
        if len(spec.id) > settings.max_id_len or not ID_RE.match(spec.id):
            raise _http(422, f"series id must match [A-Za-z0-9_.:-]+ and be at most {settings.max_id_len} characters")
        if len(spec.channels) != service.C:
            raise _http(422, f"the model forecasts {service.C} channels; got {len(spec.channels)} channel names")
        if len(set(spec.channels)) != len(spec.channels):
            raise _http(422, "channel names must be distinct")
        if spec.patch_len is not None and spec.patch_len != service.P:
            raise _http(422, f"the model's patch length is {service.P}; got patch_len={spec.patch_len}")
        for a, b in spec.labels:
            if b <= a:
                raise _http(422, f"label window [{a}, {b}) is empty")
        key = _key(who, spec.id)
        body = {"channels": spec.channels, "step": spec.step, "origin": spec.origin, "labels": [list(w) for w in spec.labels]}

        def apply():
            if key in service.engine.series:
                raise _http(409, f"series {spec.id!r} exists")
            if sum(1 for k in service.engine.series if k.startswith(who + "/")) >= settings.max_series_per_tenant:
                raise _http(409, f"tenant holds the maximum of {settings.max_series_per_tenant} series")
            try:
                service.engine.add_series(key, step=spec.step, origin=spec.origin, labels=[tuple(w) for w in spec.labels])
            except ValueError as e:
                raise _http(422, str(e).replace(repr(key), repr(spec.id))) from None
            return [Event("create", who, spec.id, body=body)], None

        try:
            service.change(apply)
        except CommitError as e:
            raise _http(503, f"not durable, not created: {e}") from None
        return info(who, spec.id)

    @app.get("/v1/series")
    def list_series(who: Tenant):
        prefix = who + "/"
        with service.lock:
            ids = sorted(k[len(prefix):] for k in service.engine.series if k.startswith(prefix))
        return {"series": ids}

    @app.get("/v1/series/{series}", response_model=SeriesInfo)
    def get_series(series: str, who: Tenant):
        owned(who, series)
        return info(who, series)

    @app.delete("/v1/series/{series}", status_code=204)
    def delete_series(series: str, who: Tenant):
        def apply():
            key = owned(who, series)
            service.engine.remove_series(key)
            return [Event("delete", who, series)], None

        try:
            service.change(apply)
        except CommitError as e:
            raise _http(503, f"not durable, not deleted: {e}") from None
        return Response(status_code=204)

    @app.post("/v1/series/{series}/observations", response_model=IngestReply)
    def ingest(series: str, obs: Observations, who: Tenant):
        n = len(obs.timestamps)
        if n > settings.max_rows:
            raise _http(413, f"{n} rows in one request; at most {settings.max_rows}")
        if len(obs.values) != n:
            raise _http(422, f"{n} timestamps but {len(obs.values)} rows of values")
        rows = [[math.nan if v is None else float(v) for v in row] for row in obs.values]
        rectangular = all(len(r) == service.C for r in rows)
        ts_n = np.asarray(obs.timestamps, dtype=np.int64)
        values = np.asarray(rows, dtype=np.float64).reshape(n, service.C) if rectangular else rows

        def apply():
            key = owned(who, series)
            try:
                got = service.engine.ingest(key, ts_n, values)
            except ValueError as e:
                raise _http(422, str(e).replace(repr(key), repr(series))) from None
            bad = {r.index for r in got.rejected}
            keep = [i for i in range(n) if i not in bad]
            events = []
            if keep:
                vals = np.asarray([rows[i] for i in keep], dtype=np.float64)
                events.append(Event("obs", who, series, ts_n[keep], vals))
            return events, got

        try:
            got, seq = service.change(apply)
        except CommitError as e:
            raise _http(503, f"not durable, nothing accepted: {e}; retrying is safe") from None
        m.rows.inc(got.accepted)
        for r in got.rejected:
            m.rejected.labels(r.reason).inc()
        return IngestReply(accepted=got.accepted, patches_queued=got.patches_queued, seq=seq,
                           rejected=[RejectedRow(index=r.index, timestamp=r.timestamp, reason=r.reason, detail=r.detail)
                                     for r in got.rejected])

    @app.get("/v1/series/{series}/forecast", response_model=ForecastReply)
    def forecast(series: str, who: Tenant,
                 horizon: Annotated[int | None, Query(ge=1, description="steps ahead, at most the model's horizon")] = None,
                 quantiles: Annotated[str | None, Query(max_length=1000, description="comma-separated levels, e.g. 0.1,0.9")] = None):
        if horizon is not None and horizon > service.Hz:
            raise _http(422, f"horizon {horizon} is over the model's horizon of {service.Hz} steps")
        levels = service.quantiles
        if quantiles is not None:
            try:
                levels = [float(q) for q in quantiles.split(",")]
            except ValueError:
                raise _http(422, f"quantiles must be comma-separated numbers, got {quantiles!r}") from None
            missing = [q for q in levels if not any(abs(q - k) < 1e-9 for k in service.quantiles)]
            if missing:
                raise _http(422, f"quantiles {missing} are not among the model's {service.quantiles}")
        with service.lock:
            key = owned(who, series)
            try:
                fc = service.engine.forecast(key)
            except ValueError as e:
                raise _http(409, str(e).replace(repr(key), repr(series))) from None
        meta = info(who, series)
        h = horizon or service.Hz
        idx = [min(range(len(service.quantiles)), key=lambda k: abs(service.quantiles[k] - q)) for q in levels]
        return ForecastReply(
            series=series, token=fc.token, origin_timestamp=fc.origin_timestamp, timestamps=fc.timestamps[:h].tolist(),
            channels=meta.channels, quantiles=[service.quantiles[k] for k in idx],
            values=_clean(fc.values[:h][:, :, idx].tolist()), mode="attention" if fc.mode > 0 else "recurrent",
            flops=fc.flops, allowance=_clean(fc.allowance))

    @app.get("/v1/series/{series}/audit")
    def audit(series: str, who: Tenant):
        with service.lock:
            key = owned(who, series)
            got = service.engine.audit(key)
        got["series_id"] = series
        return _clean(got)

    return app
