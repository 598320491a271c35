"""Tenants never see each other: another tenant's series answers exactly like a missing one, keys are
required on every /v1 call, the database holds only salted hashes of keys, and rate limits are per key."""

import time

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import auth, create, make_app, rows


def endpoints(series: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", f"/v1/series/{series}", None),
        ("GET", f"/v1/series/{series}/forecast", None),
        ("GET", f"/v1/series/{series}/audit", None),
        ("POST", f"/v1/series/{series}/observations", rows(0, 100, 3)),
        ("DELETE", f"/v1/series/{series}", None),
    ]


def test_another_tenants_series_is_a_404_like_a_missing_one(app_and_keys):
    app, client, keys = app_and_keys
    create(client, keys["a"], "secret-series")
    client.post("/v1/series/secret-series/observations", json=rows(0, 0, 20), headers=auth(keys["a"]))
    before = client.get("/v1/series/secret-series/forecast", headers=auth(keys["a"])).json()
    for (method, path, body), (_, missing, _) in zip(endpoints("secret-series"), endpoints("no-such-series")):
        theirs = client.request(method, path, json=body, headers=auth(keys["b"]))
        nobody = client.request(method, missing, json=body, headers=auth(keys["b"]))
        assert theirs.status_code == nobody.status_code == 404, (method, path)
        assert theirs.json()["detail"].replace("secret-series", "X") == nobody.json()["detail"].replace("no-such-series", "X")
        assert "tenant-a" not in theirs.text
    assert client.get("/v1/series", headers=auth(keys["b"])).json() == {"series": []}
    # B can hold a series of the same name: a separate namespace
    assert create(client, keys["b"], "secret-series").status_code == 201
    client.post("/v1/series/secret-series/observations", json=rows(5, 0, 20), headers=auth(keys["b"]))
    assert client.get("/v1/series/secret-series/forecast", headers=auth(keys["a"])).json() == before


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"X-API-Key": "oryx_0000000000000000_" + "x" * 40},
])
def test_every_v1_call_needs_a_valid_key(app_and_keys, headers):
    app, client, keys = app_and_keys
    create(client, keys["a"], "s")
    for method, path, body in [*endpoints("s"), ("GET", "/v1/series", None), ("POST", "/v1/series", {"id": "t", "channels": ["a"] * 4, "step": 1})]:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
    assert client.get("/v1/series/s", headers=auth(keys["a"])).status_code == 200  # nothing was deleted
    assert client.get("/v1/series/s", headers={"X-API-Key": keys["a"]}).status_code == 200


def test_keys_are_stored_hashed_with_their_own_salt(app_and_keys):
    app, client, keys = app_and_keys
    db = app.state.service.db
    db.conn.execute("PRAGMA wal_checkpoint(FULL)")
    raw = b"".join(p.read_bytes() for p in db.path.parent.glob(db.path.name + "*"))  # the database and its WAL
    for key in keys.values():
        assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw  # the secret may hold "_" itself
    salts = [r[0] for r in db.conn.execute("SELECT salt FROM api_keys")]
    assert len(set(salts)) == len(salts) == 2
    wrong = keys["a"][:-1] + ("B" if keys["a"].endswith("A") else "A")  # one character off
    assert db.tenant_of(keys["a"]) == "tenant-a" and db.tenant_of(wrong) is None


def test_rate_limit_is_per_key_and_answers_429_with_retry_after(tmp_path, model):
    app = make_app(tmp_path / "d", model, rate_limit=2.0, rate_burst=3)
    db = app.state.service.db
    ka, kb = db.add_key("tenant-a"), db.add_key("tenant-b")
    with TestClient(app) as client:
        codes = [client.get("/v1/series", headers=auth(ka)).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]  # a burst of 3, then about 2 per second
        r = client.get("/v1/series", headers=auth(ka))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "rate limit" in r.json()["detail"]
        assert client.get("/v1/series", headers=auth(kb)).status_code == 200  # another key has its own bucket
        assert client.get("/v1/series", headers={"Authorization": "Bearer oryx_nope"}).status_code == 401
        time.sleep(0.6)
        assert client.get("/v1/series", headers=auth(ka)).status_code == 200  # refilled at 2 per second
