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
             rate: float | None = None, processes: int = 1) -> LoadResult:
    """Drive the service at `url` with `clients` threads for `seconds`; `rate`: requests per second per
    client (paced), None: closed loop; `processes`: the client threads spread over this many processes
    (so that the clients' own interpreter lock does not add to the latencies measured). See the module
    docstring."""
    if clients < 1 or clients > len(series):
        raise ValueError(f"clients must be in 1..{len(series)} (one series at least each), got {clients}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 requests per second per client, got {rate}")
    if processes < 1 or processes > clients:
        raise ValueError(f"processes must be in 1..{clients}, got {processes}")
    start_at = time.time() + (0.2 if processes == 1 else 8.0)  # every process starts its clients at this moment
    jobs = [(url, key, series, channels, list(range(p, clients, processes)), clients, seconds, rows, forecast_every,
             max_requests, seed, rate, start_at) for p in range(processes)]
    if processes == 1:
        parts = [_drive(*jobs[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.starmap(_drive, jobs)
    merged = {k: [x for part in parts for x in part[k]] for k in ("ingest_ms", "forecast_ms", "late_ms")}
    acked, errors = sum(p["acked"] for p in parts), sum(p["errors"] for p in parts)
    elapsed = max(p["elapsed"] for p in parts)
    ing = np.asarray(merged["ingest_ms"]) if merged["ingest_ms"] else np.array([np.nan])
    fc = np.asarray(merged["forecast_ms"]) if merged["forecast_ms"] else np.array([np.nan])
    return LoadResult(seconds=elapsed, requests=len(merged["ingest_ms"]) + len(merged["forecast_ms"]), rows_acked=acked,
                      rows_per_s=acked / elapsed,
                      ingest_p50_ms=float(np.percentile(ing, 50)), ingest_p99_ms=float(np.percentile(ing, 99)),
                      forecast_p50_ms=float(np.percentile(fc, 50)), forecast_p99_ms=float(np.percentile(fc, 99)),
                      errors=errors, offered_per_s=clients * rate if rate else None,
                      late_ms_p99=float(np.percentile(merged["late_ms"], 99)) if rate and merged["late_ms"] else None)


def _drive(url: str, key: str, series: list[str], channels: int, mine_clients: list[int], clients: int, seconds: float,
           rows: int, forecast_every: int, max_requests: int, seed: int, rate: float | None, start_at: float) -> dict:
    """Run the client threads `mine_clients` (of `clients`) in this process; returns their raw measurements."""
    import httpx

    n = len(mine_clients)
    ingest_ms: list[list[float]] = [[] for _ in range(n)]
    forecast_ms: list[list[float]] = [[] for _ in range(n)]
    late_ms: list[list[float]] = [[] for _ in range(n)]
    acked = [0] * n
    errors = [0] * n
    stop_at = [0.0]

    def client(j: int) -> None:
        i = mine_clients[j]
        rng = np.random.default_rng([seed, i])
        mine = series[i::clients]
        cursor = {sid: 0 for sid in mine}
        values = rng.normal(size=(rows, channels)).round(4).tolist()
        phase = float(rng.uniform(0, 1 / rate)) if rate else 0.0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            time.sleep(max(0.0, start_at - time.time()))
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
                    late_ms[j].append(max(0.0, time.perf_counter() - due) * 1e3)
                    t = due
                try:
                    if forecast_every and k % forecast_every == forecast_every - 1:
                        r = c.get(f"/v1/series/{sid}/forecast")
                        ok = r.status_code in (200, 409)  # 409: no whole patch yet
                        forecast_ms[j].append((time.perf_counter() - t) * 1e3)
                    else:
                        ts = list(range(cursor[sid], cursor[sid] + rows))
                        r = c.post(f"/v1/series/{sid}/observations", json={"timestamps": ts, "values": values})
                        ok = r.status_code == 200 and r.json()["accepted"] == rows
                        if ok:
                            cursor[sid] += rows
                            acked[j] += rows
                        ingest_ms[j].append((time.perf_counter() - t) * 1e3)
                except httpx.HTTPError:
                    ok = False
                errors[j] += not ok

    stop_at[0] = time.monotonic() + max(0.0, start_at - time.time()) + seconds
    threads = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(n)]
    began = max(start_at, time.time())
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60 + max(0.0, start_at - time.time()))
    elapsed = time.time() - began  # from this process's start to its last answer
    return {"ingest_ms": [x for xs in ingest_ms for x in xs], "forecast_ms": [x for xs in forecast_ms for x in xs],
            "late_ms": [x for xs in late_ms for x in xs], "acked": sum(acked), "errors": sum(errors), "elapsed": elapsed}
