"""Load test of `oryx-ts serve` on loopback: acknowledged rows/s and latencies, group commit on vs off.

Starts one uvicorn server per mode (its own process group, killed at the end) and, for each load
level, creates fresh series, drives them with client threads for a bounded time and prints one
table row (markdown). A load level is `closed` (each client sends as soon as it is answered: the
server's saturation throughput) or a number R: each client sends R requests per second on a fixed
schedule, latency counted from the scheduled send time (see `oryx_ts.service.load`).

    .venv/bin/python benchmarks/service.py                      # 8 clients x 2 s over 64 series, closed loop
    .venv/bin/python benchmarks/service.py --clients 64 --series 1024 --seconds 10 --loads closed,2,4 --modes group
"""

import argparse
import datetime
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import oryx_ts
from oryx_ts.config import preset
from oryx_ts.service.load import create_series, run_load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: Path, data_dir: Path, group: bool, threads: int) -> tuple[subprocess.Popen, str, str]:
    key = subprocess.run([sys.executable, "-m", "oryx_ts.cli", "serve", "keys", "add", "bench", "--data-dir", str(data_dir)],
                         check=True, capture_output=True, text=True, timeout=120).stdout.strip()
    port = free_port()
    cmd = [sys.executable, "-m", "oryx_ts.cli", "serve", "--model", str(model_dir), "--data-dir", str(data_dir),
           "--port", str(port), "--threads", str(threads), "--snapshot-every-s", "0", *([] if group else ["--no-group-commit"])]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("the server did not start within 90 s")


def serve_stub() -> tuple[subprocess.Popen, str, str]:
    """The floor of this harness: the same routes and request models on uvicorn, doing no work."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--stub-port", str(port)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, "stub"
        except httpx.HTTPError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("the stub server did not start within 90 s")


def run_stub(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from oryx_ts.service.schemas import Observations, SeriesSpec

    app = FastAPI()
    app.get("/healthz")(lambda: {"status": "ok"})

    @app.post("/v1/series", status_code=201)
    def create(spec: SeriesSpec):
        return {"id": spec.id}

    @app.post("/v1/series/{series}/observations")
    def ingest(series: str, obs: Observations):
        return {"accepted": len(obs.timestamps), "rejected": [], "patches_queued": 0, "seq": 1}

    @app.get("/v1/series/{series}/forecast")
    async def forecast(series: str):
        return {"series": series, "values": [[[0.0] * 3] * 8] * 16}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: an untrained debug model)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--series", type=int, default=64)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rows", type=int, default=8, help="rows per ingest request")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--modes", default="group,naive",
                   help="comma-separated: group, naive, stub (the same routes doing no work: the harness's floor)")
    p.add_argument("--loads", default="closed", help="comma-separated load levels: closed, or requests/s per client")
    p.add_argument("--client-processes", type=int, default=1, help="spread the client threads over this many processes")
    p.add_argument("--stub-port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stub_port is not None:
        run_stub(args.stub_port)
        return 0
    with tempfile.TemporaryDirectory(prefix="oryx-bench-") as tmp:
        model_dir = Path(args.model) if args.model else Path(tmp) / "model"
        if args.model is None:
            oryx_ts.save(oryx_ts.OryxForecaster(preset("debug")), model_dir)
        channels = oryx_ts.load(model_dir).config.tokenizer.channels
        print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} cores, {args.clients} clients "
              f"({args.client_processes} processes) x {args.seconds:g} s, "
              f"{args.series} series, {args.rows} rows/request, 1 forecast per 4 requests")
        print("| mode | load (requests/s offered) | rows/s acked | ingest p50 / p99 ms | forecast p50 / p99 ms | requests | errors | clients late p99 ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for mode in args.modes.split(","):
            proc, url, key = serve_stub() if mode == "stub" else serve(model_dir, Path(tmp) / mode, mode == "group", args.threads)
            try:
                for j, load in enumerate(args.loads.split(",")):
                    rate = None if load == "closed" else float(load)
                    ids = create_series(url, key, args.series, [f"c{i}" for i in range(channels)], prefix=f"load{j}")
                    r = run_load(url, key, ids, channels, clients=args.clients, seconds=args.seconds, rows=args.rows, rate=rate,
                                 processes=args.client_processes)
                    level = "closed loop" if rate is None else f"{args.clients} x {rate:g}/s = {r.offered_per_s:,.0f}"
                    name = "no-op stub" if mode == "stub" else f"{mode} commit"
                    print(f"| {name} | {level} | {r.rows_per_s:,.0f} | {r.ingest_p50_ms:.1f} / {r.ingest_p99_ms:.1f} | "
                          f"{r.forecast_p50_ms:.1f} / {r.forecast_p99_ms:.1f} | {r.requests} | {r.errors} | "
                          f"{'-' if r.late_ms_p99 is None else f'{r.late_ms_p99:.1f}'} |", flush=True)
            finally:
                stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
