"""The same app as a Ray Serve deployment: series sharded by a stable hash to replicas.

One `Shard` deployment per shard k (a single replica each) runs `create_app` over its own data
directory `<data_dir>/shard-<k>`: its own SQLite log and snapshots, so a replica is only a cache of
its durable shard; when Ray restarts a replica it recovers from the shard's snapshot and log. The
`Ingress` deployment takes HTTP, sends `/v1/series/{id}...` to shard `crc32(id) % shards` (for
`POST /v1/series` the id is read from the body), merges `GET /v1/series` over every shard and
reports `/healthz` as the worst shard's. API keys must exist in every shard
(`oryx-ts serve keys add TENANT --data-dir DIR --shards N`).
"""


import dataclasses
import json
import os
import zlib

from oryx_ts.service.settings import Settings

__all__ = ["build_app", "run", "shard_of"]

_FORWARD = ("authorization", "x-api-key", "content-type")


def shard_of(series_id: str, shards: int) -> int:
    """The shard of a series id: stable across processes and restarts (crc32, not Python's salted hash)."""
    return zlib.crc32(series_id.encode()) % shards


def shard_settings(settings: Settings, k: int) -> Settings:
    return dataclasses.replace(settings, data_dir=settings.data_dir / f"shard-{k}")


def build_app(settings: Settings, shards: int = 2):
    """The Serve application: an ingress over `shards` single-replica shard deployments."""
    from fastapi import FastAPI, Request, Response
    from ray import serve

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class Shard:
        def __init__(self, settings: Settings, k: int):
            import httpx

            from oryx_ts.service.app import create_app

            self.app = create_app(shard_settings(settings, k))
            self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://shard")

        async def handle(self, method: str, path: str, query: str, headers: dict, body: bytes) -> tuple[int, str, bytes]:
            r = await self.client.request(method, path + (f"?{query}" if query else ""), headers=headers, content=body)
            return r.status_code, r.headers.get("content-type", "application/json"), r.content

        def pid(self) -> int:
            return os.getpid()

    ingress = FastAPI(title="oryx_ts forecasting service (Ray Serve)")

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(ingress)
    class Ingress:
        def __init__(self, *handles):
            self.shards = list(handles)

        async def _send(self, k: int, request: Request, path: str, body: bytes) -> tuple[int, str, bytes]:
            headers = {h: v for h, v in request.headers.items() if h in _FORWARD}
            return await self.shards[k].handle.remote(request.method, path, request.url.query, headers, body)

        @ingress.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def proxy(self, path: str, request: Request) -> Response:
            body = await request.body()
            path = "/" + path
            parts = path.strip("/").split("/")
            if parts[:2] == ["v1", "series"] and len(parts) >= 3:
                k = shard_of(parts[2], len(self.shards))
            elif path == "/v1/series" and request.method == "POST":
                try:
                    sid = json.loads(body).get("id")
                except (ValueError, AttributeError):
                    sid = None
                k = shard_of(sid, len(self.shards)) if isinstance(sid, str) else 0  # shard 0 answers the 4xx
            elif path in ("/v1/series", "/healthz"):
                replies = [await self._send(k, request, path, body) for k in range(len(self.shards))]
                bad = [r for r in replies if r[0] != 200]
                if bad:
                    return Response(bad[0][2], status_code=bad[0][0], media_type=bad[0][1])
                docs = [json.loads(r[2]) for r in replies]
                if path == "/healthz":
                    merged = {"status": "ok", "shards": docs, "series": sum(d["series"] for d in docs)}
                else:
                    merged = {"series": sorted(s for d in docs for s in d["series"])}
                return Response(json.dumps(merged), media_type="application/json")
            else:
                k = 0  # /metrics, /openapi.json, /docs: shard 0's
            status, media, content = await self._send(k, request, path, body)
            return Response(content, status_code=status, media_type=media)

    handles = [Shard.options(name=f"oryx_shard_{k}").bind(settings, k) for k in range(shards)]
    return Ingress.bind(*handles)


def run(settings: Settings, *, shards: int = 2, address: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> int:
    """`oryx-ts serve --ray`: start (or join) Ray, deploy, and block until interrupted."""
    import time

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    if address is None:
        ray.init(include_dashboard=False, object_store_memory=100 * 1024**2, num_cpus=os.cpu_count() or 2)
    else:
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, shards), name="oryx_ts", route_prefix="/")
    print(f"oryx-ts serve --ray: http://{host}:{port} ({shards} shards)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0
