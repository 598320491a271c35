"""The Ray Serve deployment shards series by a stable hash, and a killed shard replica comes back from its durable
shard (snapshot + log) with nothing acknowledged lost. Local Ray on 127.0.0.1 only."""

import os
import socket
import time
import zlib

import httpx
import numpy as np
import pytest

import oryx_ts
from oryx_ts.service.ray_serve import build_app, shard_of
from oryx_ts.service.settings import Settings
from oryx_ts.service.store import Database
from tests.conftest import random_model
from tests.service.conftest import CHANNELS, auth, rows


def test_shard_of_is_stable_and_spreads():
    assert shard_of("web-1", 2) == zlib.crc32(b"web-1") % 2 == 0  # crc32: the same in every process, every run
    assert {shard_of(f"s{i}", 4) for i in range(64)} == {0, 1, 2, 3}


@pytest.fixture
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Serve kills a proxy that is not ready within 5 s three times running; on a loaded 2-core machine the
    # proxy's first start (its imports) takes longer, and serve.start then fails at setup
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    ray = pytest.importorskip("ray", reason="Ray is not installed (the tune extra)")
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the tune extra)")
    ray.init(include_dashboard=False, object_store_memory=100 * 1024**2, num_cpus=2, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:  # Ray goes down even when Serve fails to start, so no later test inherits it
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ray, serve, port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_two_shards_and_a_killed_replica_recovers_its_series(tmp_path, local_ray):
    ray, serve, port = local_ray
    oryx_ts.save(random_model(), tmp_path / "model")
    settings = Settings(model_dir=tmp_path / "model", data_dir=tmp_path / "data", snapshot_every_rows=50, snapshot_every_s=0)
    key = Database(tmp_path / "data" / "shard-0" / "service.sqlite3").add_key("t")
    Database(tmp_path / "data" / "shard-1" / "service.sqlite3").add_key("t", key=key)
    serve.run(build_app(settings, 2), name="oryx_ts", route_prefix="/")
    ids = ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert {shard_of(s, 2) for s in ids} == {0, 1}
    h = auth(key)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for sid in ids:
            r = c.post("/v1/series", json={"id": sid, "channels": CHANNELS, "step": 1}, headers=h)
            assert r.status_code == 201, r.text
        for k in range(4):
            for i, sid in enumerate(ids):
                r = c.post(f"/v1/series/{sid}/observations", json=rows(i, 20 * k, 20), headers=h)
                assert r.status_code == 200 and r.json()["accepted"] == 20, r.text
        assert c.get("/v1/series", headers=h).json() == {"series": ids}
        before = {sid: c.get(f"/v1/series/{sid}/forecast", headers=h).json() for sid in ids}

        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "oryx_shard_0" in a["name"]]
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
        deadline = time.monotonic() + 120
        after = None
        while time.monotonic() < deadline:
            try:
                got = {sid: c.get(f"/v1/series/{sid}/forecast", headers=h) for sid in ids}
                if all(r.status_code == 200 for r in got.values()):
                    after = {sid: r.json() for sid, r in got.items()}
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert after is not None, "shard 0 did not come back within 120 s"
        assert after == before  # recovered from its shard's snapshot + log, bit for bit
        now = [a for a in ray.util.list_named_actors(all_namespaces=True) if "oryx_shard_0" in a["name"]]
        assert now and now[0]["name"] != names[0]["name"], "a new replica serves shard 0"
        r = c.post(f"/v1/series/{ids[0]}/observations", json=rows(0, 80, 8), headers=h)
        assert r.status_code == 200 and r.json()["accepted"] == 8
        assert np.asarray(c.get(f"/v1/series/{ids[0]}/forecast", headers=h).json()["values"]).shape == (16, 4, 3)
