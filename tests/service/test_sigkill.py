"""A real `oryx-ts serve` (uvicorn, 127.0.0.1) killed with SIGKILL at random moments loses no acknowledged
observation, applies none twice, and afterwards forecasts bit for bit like a server that never stopped."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import oryx_ts
from oryx_ts.service.app import create_app
from oryx_ts.service.settings import Settings
from tests.conftest import random_model
from tests.service.conftest import CHANNELS, auth, rows

TRIALS = int(os.environ.get("ORYX_KILL_TRIALS", "12"))  # ORYX_KILL_TRIALS=100 for a longer soak
SERIES = ["k0", "k1", "k2"]
SNAPSHOT_ROWS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir, data_dir, port) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "oryx_ts.cli", "serve", "--model", str(model_dir), "--data-dir", str(data_dir),
           "--host", "127.0.0.1", "--port", str(port), "--snapshot-every-rows", str(SNAPSHOT_ROWS), "--snapshot-every-s", "0",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    kill(proc)
    raise AssertionError("server did not come up within 60 s")


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path):
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    oryx_ts.save(random_model(), model_dir)
    key = subprocess.run([sys.executable, "-m", "oryx_ts.cli", "serve", "keys", "add", "t", "--data-dir", str(data_dir)],
                         check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    h = auth(key)
    rng = np.random.default_rng(0)
    cursor = dict.fromkeys(SERIES, 0)
    done: list[tuple[str, int, int]] = []  # every request that ended up applied once, in order
    created: list[str] = []
    t0 = time.monotonic()
    for trial in range(TRIALS):
        port = free_port()
        proc = start(model_dir, data_dir, port)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                for sid in SERIES:
                    if sid not in created:
                        assert client.post("/v1/series", json={"id": sid, "channels": CHANNELS, "step": 1}, headers=h).status_code == 201
                        created.append(sid)
                timer = threading.Timer(float(rng.uniform(0.2, 1.2)), lambda: os.kill(proc.pid, signal.SIGKILL))
                timer.start()
                in_flight = None
                try:
                    for _ in range(400):
                        sid = SERIES[int(rng.integers(len(SERIES)))]
                        req = (sid, cursor[sid], int(rng.integers(1, 20)))
                        in_flight = req
                        r = client.post(f"/v1/series/{sid}/observations", json=rows(SERIES.index(sid), req[1], req[2]), headers=h)
                        assert r.status_code == 200 and r.json()["accepted"] == req[2], r.text
                        done.append(req)
                        cursor[sid] += req[2]
                        in_flight = None
                except httpx.TransportError:
                    pass  # killed mid-stream: `in_flight` may or may not be durable
                finally:
                    timer.cancel()
        finally:
            kill(proc)
        proc = start(model_dir, data_dir, port)  # recovery, then settle the request whose answer was lost
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                if in_flight is not None:
                    sid, start_ts, n = in_flight
                    r = client.post(f"/v1/series/{sid}/observations", json=rows(SERIES.index(sid), start_ts, n), headers=h)
                    assert r.status_code == 200 and r.json()["accepted"] in (0, n), r.text  # all or nothing was durable
                    done.append(in_flight)
                    cursor[sid] += n
                if trial == TRIALS - 1:
                    recovered = {sid: client.get(f"/v1/series/{sid}/forecast", headers=h).json() for sid in SERIES}
                    audits = {sid: client.get(f"/v1/series/{sid}/audit", headers=h).json() for sid in SERIES}
        finally:
            kill(proc)
    assert time.monotonic() - t0 < 600

    # the server that never stopped: the same model directory, the same acknowledged requests, in order
    ref = create_app(Settings(model_dir=model_dir, data_dir=tmp_path / "ref", snapshot_every_rows=SNAPSHOT_ROWS, snapshot_every_s=0))
    rkey = ref.state.service.db.add_key("t")
    with TestClient(ref) as client:
        for sid in SERIES:
            client.post("/v1/series", json={"id": sid, "channels": CHANNELS, "step": 1}, headers=auth(rkey))
        for sid, start_ts, n in done:
            assert client.post(f"/v1/series/{sid}/observations", json=rows(SERIES.index(sid), start_ts, n), headers=auth(rkey)).json()["accepted"] == n
        for sid in SERIES:
            assert client.get(f"/v1/series/{sid}/forecast", headers=auth(rkey)).json() == recovered[sid]  # bit for bit: JSON floats round-trip
            a = client.get(f"/v1/series/{sid}/audit", headers=auth(rkey)).json()
            assert a["tokens"] == audits[sid]["tokens"] == cursor[sid] // 8
            assert a["mae_served"] == audits[sid]["mae_served"]
    total = sum(n for _, _, n in done)
    assert total == ref.state.service.db.conn.execute("SELECT COUNT(*) FROM log WHERE kind = 'obs'").fetchone()[0]
    with sqlite3.connect(data_dir / "service.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM log WHERE kind = 'obs'").fetchone()[0] == total  # 0 lost, 0 twice
