"""`create_app(settings)`: the FastAPI routes of the service over one `streams.Engine`.

The engine, the durable log and the group-commit writer behind the routes are `service.core.Service`
(its docstring gives the write path and recovery). Ingest answers only once its rows are committed;
forecast reads are served from the latest published forecast without the engine lock.
"""


import math
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

import oryx_ts
from oryx_ts.service.core import Service, clean, key_of
from oryx_ts.service.middleware import BodyLimit, RequestCounter
from oryx_ts.service.schemas import (ERRORS, ID_RE, ForecastReply, IngestReply, Observations, RejectedRow, SeriesInfo,
                                     SeriesSpec)
from oryx_ts.service.settings import Settings
from oryx_ts.service.store import CommitError, Event

__all__ = ["Service", "create_app"]


def _http(status: int, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


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

    app = FastAPI(title="oryx_ts forecasting service", version="1", lifespan=lifespan, responses=ERRORS)
    app.state.service = service
    m = service.metrics
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestCounter, counter=m.requests)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    async def tenant(authorization: Annotated[str | None, Header()] = None,
               x_api_key: Annotated[str | None, Header()] = None) -> str:
        key = x_api_key
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        who = service.tenant_of(key) if key else None
        if who is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)",
                                headers={"WWW-Authenticate": "Bearer"})
        wait = service.admit(key)
        if wait:
            raise HTTPException(429, f"rate limit of {settings.rate_limit:g} requests/s for this key; retry in {wait:.2f} s",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return who

    Tenant = Annotated[str, Depends(tenant)]

    def unknown(series: str) -> HTTPException:
        # the same answer for a missing series and another tenant's: nothing tells them apart
        return _http(404, f"unknown series {series!r}")

    def owned(who: str, series: str) -> str:
        key = key_of(who, series)
        if len(series) > settings.max_id_len or not ID_RE.match(series) or key not in service.engine.series:
            raise unknown(series)
        return key

    def info(who: str, series: str) -> SeriesInfo:
        meta = service.series_meta(who, series)
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
        key = key_of(who, spec.id)
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
            service.forget(key)
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
        reply = IngestReply(accepted=got.accepted, patches_queued=got.patches_queued, seq=seq,
                            rejected=[RejectedRow(index=r.index, timestamp=r.timestamp, reason=r.reason, detail=r.detail)
                                      for r in got.rejected])
        return Response(reply.model_dump_json(), media_type="application/json")

    @app.get("/v1/series/{series}/forecast", response_model=ForecastReply)
    async def forecast(series: str, who: Tenant,
                       horizon: Annotated[int | None, Query(ge=1, description="steps ahead, at most the model's horizon")] = None,
                       quantiles: Annotated[str | None, Query(max_length=1000, description="comma-separated levels, e.g. 0.1,0.9")] = None):
        # served from the latest published forecast: no engine lock, so never queued behind a flush
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
        key = owned(who, series)
        pub = service.published.get(key)
        if pub is None:  # not stepped since this process started: read the engine once, off the event loop
            try:
                pub = await anyio.to_thread.run_sync(service.latest, key)
            except KeyError:
                raise unknown(series) from None
            except ValueError as e:
                raise _http(409, str(e).replace(repr(key), repr(series))) from None
        h = horizon or service.Hz
        idx = tuple(min(range(len(service.quantiles)), key=lambda k: abs(service.quantiles[k] - q)) for q in levels)
        body = pub.replies.get((h, idx))
        if body is None:
            fc, meta = pub.forecast, info(who, series)
            body = ForecastReply(
                series=series, token=fc.token, origin_timestamp=fc.origin_timestamp, timestamps=fc.timestamps[:h].tolist(),
                channels=meta.channels, quantiles=[service.quantiles[k] for k in idx],
                values=clean(fc.values[:h][:, :, list(idx)].tolist()), mode="attention" if fc.mode > 0 else "recurrent",
                flops=fc.flops, allowance=clean(fc.allowance)).model_dump_json().encode()
            if len(pub.replies) >= 16:
                pub.replies.clear()
            pub.replies[(h, idx)] = body
        return Response(body, media_type="application/json")

    @app.get("/v1/series/{series}/audit")
    def audit(series: str, who: Tenant):
        with service.lock:
            key = owned(who, series)
            got = service.engine.audit(key)
        got["series_id"] = series
        return clean(got)

    return app
