"""A bounded load generator for the service: client threads over HTTP, acknowledged rows per second and latencies.

Each client thread owns a disjoint set of series (so its timestamps stay in order), posts `rows`
observations per request to a random one of them and, every `forecast_every` requests, reads a
forecast. Everything stops after `seconds` (and after `max_requests` per client).

Two ways to load the server:
- closed loop (`rate=None`): every client sends its next request as soon as the last is answered, so
  the server runs saturated and latency is concurrency / throughput (Little's law);
- paced (`rate=R`): every client sends R requests per second on a fixed schedule (a random phase per
  client), like agents that push telemetry on a timer. Latency is measured from the scheduled send
  time, not the actual one, so a server that falls behind is charged for the queue it builds
  (no coordinated omission).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["LoadResult", "create_series", "run_load"]


@dataclass(frozen=True)
class LoadResult:
    seconds: float
    requests: int
    rows_acked: int
    rows_per_s: float
    ingest_p50_ms: float
    ingest_p99_ms: float
    forecast_p50_ms: float
    forecast_p99_ms: float
    errors: int
    offered_per_s: float | None = None  # paced: requests per second scheduled, all clients
    late_ms_p99: float | None = None  # paced: how far behind schedule the clients sent (client-side lag)


def create_series(url: str, key: str, n: int, channels: list[str], prefix: str = "load") -> list[str]:
    import httpx

    ids = [f"{prefix}-{i}" for i in range(n)]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        for sid in ids:
            r = c.post("/v1/series", json={"id": sid, "channels": channels, "step": 1})
            if r.status_code not in (201, 409):
                raise RuntimeError(f"creating {sid}: {r.status_code} {r.text}")
    return ids


def run_load(url: str, key: str, series: list[str], channels: int, *, clients: int = 8, seconds: float = 2.0,
             rows: int = 8, forecast_every: int = 4, max_requests: int = 100_000, seed: int = 0,
             rate: float | None = None) -> LoadResult:
    """Drive the service at `url` with `clients` threads for `seconds`; `rate`: requests per second per
    client (paced), None: closed loop. See the module docstring."""
    import httpx

    if clients < 1 or clients > len(series):
        raise ValueError(f"clients must be in 1..{len(series)} (one series at least each), got {clients}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second per client, got {rate}")
    ingest_ms: list[list[float]] = [[] for _ in range(clients)]
    forecast_ms: list[list[float]] = [[] for _ in range(clients)]
    acked = [0] * clients
    errors = [0] * clients
    late_ms: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        mine = series[i::clients]
        cursor = {sid: 0 for sid in mine}
        values = rng.normal(size=(rows, channels)).round(4).tolist()
        phase = float(rng.uniform(0, 1 / rate)) if rate else 0.0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            start.wait()
            t_start = time.perf_counter()
            for k in range(max_requests):
                if time.monotonic() >= stop_at[0]:
                    break
                sid = mine[int(rng.integers(len(mine)))]
                t = time.perf_counter()
                if rate:
                    due = t_start + phase + k / rate
                    if due > t:
                        time.sleep(due - t)
                    late_ms[i].append(max(0.0, time.perf_counter() - due) * 1e3)
                    t = due
                try:
                    if forecast_every and k % forecast_every == forecast_every - 1:
                        r = c.get(f"/v1/series/{sid}/forecast")
                        ok = r.status_code in (200, 409)  # 409: no whole patch yet
                        forecast_ms[i].append((time.perf_counter() - t) * 1e3)
                    else:
                        ts = list(range(cursor[sid], cursor[sid] + rows))
                        r = c.post(f"/v1/series/{sid}/observations", json={"timestamps": ts, "values": values})
                        ok = r.status_code == 200 and r.json()["accepted"] == rows
                        if ok:
                            cursor[sid] += rows
                            acked[i] += rows
                        ingest_ms[i].append((time.perf_counter() - t) * 1e3)
                except httpx.HTTPError:
                    ok = False
                errors[i] += not ok

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join(timeout=seconds + 60)
    elapsed = time.monotonic() - t0
    ing = np.concatenate([np.asarray(x) for x in ingest_ms]) if any(ingest_ms) else np.array([np.nan])
    fc = np.concatenate([np.asarray(x) for x in forecast_ms]) if any(forecast_ms) else np.array([np.nan])
    return LoadResult(seconds=elapsed, requests=len(ing) + len(fc), rows_acked=sum(acked), rows_per_s=sum(acked) / elapsed,
                      ingest_p50_ms=float(np.percentile(ing, 50)), ingest_p99_ms=float(np.percentile(ing, 99)),
                      forecast_p50_ms=float(np.percentile(fc, 50)), forecast_p99_ms=float(np.percentile(fc, 99)),
                      errors=sum(errors), offered_per_s=clients * rate if rate else None,
                      late_ms_p99=float(np.percentile(np.concatenate([np.asarray(x) for x in late_ms]), 99)) if rate else None)
