"""The API does what docs/SERVICE.md says: series life cycle, ingest replies, forecasts, audits, health, metrics and OpenAPI."""

import numpy as np

from tests.service.conftest import CHANNELS, auth, create, rows


def test_series_life_cycle(app_and_keys):
    app, client, keys = app_and_keys
    h = auth(keys["a"])
    r = create(client, keys["a"], "web-1", labels=[[40, 60]])
    assert r.status_code == 201, r.text
    assert r.json()["channels"] == CHANNELS and r.json()["patch_len"] == 8 and r.json()["horizon"] == 16
    assert create(client, keys["a"], "web-1").status_code == 409
    r = client.post("/v1/series", json={"id": "x", "channels": ["a", "b"], "step": 1}, headers=h)
    assert r.status_code == 422 and "4 channels" in r.json()["detail"]
    r = client.post("/v1/series", json={"id": "x", "channels": CHANNELS, "step": 1, "patch_len": 16}, headers=h)
    assert r.status_code == 422 and "patch length is 8" in r.json()["detail"]
    assert client.get("/v1/series", headers=h).json() == {"series": ["web-1"]}
    assert client.get("/v1/series/web-1", headers=h).json()["labels"] == [[40, 60]]
    assert client.delete("/v1/series/web-1", headers=h).status_code == 204
    assert client.get("/v1/series/web-1", headers=h).status_code == 404
    assert client.delete("/v1/series/web-1", headers=h).status_code == 404
    assert create(client, keys["a"], "web-1").status_code == 201  # an id can be reused after a delete


def test_ingest_then_forecast(app_and_keys):
    app, client, keys = app_and_keys
    h = auth(keys["a"])
    create(client, keys["a"], "s")
    r = client.get("/v1/series/s/forecast", headers=h)
    assert r.status_code == 409 and "8 more step(s)" in r.json()["detail"] and "tenant" not in r.json()["detail"]
    r = client.post("/v1/series/s/observations", json=rows(0, 0, 5), headers=h)
    assert r.status_code == 200 and r.json()["accepted"] == 5 and r.json()["patches_queued"] == 0
    assert client.get("/v1/series/s/forecast", headers=h).status_code == 409
    r = client.post("/v1/series/s/observations", json=rows(0, 5, 3), headers=h)
    assert r.json()["patches_queued"] == 1 and r.json()["seq"] > 0
    # acknowledged means stepped: the forecast already covers the patch just completed
    f = client.get("/v1/series/s/forecast", headers=h).json()
    assert f["token"] == 0 and f["origin_timestamp"] == 7 and f["timestamps"] == list(range(8, 24))
    assert np.asarray(f["values"]).shape == (16, 4, 3) and f["quantiles"] == [0.1, 0.5, 0.9]
    assert f["mode"] in ("attention", "recurrent") and f["flops"] > 0
    g = client.get("/v1/series/s/forecast?horizon=3&quantiles=0.9,0.1", headers=h).json()
    assert np.asarray(g["values"]).shape == (3, 4, 2) and g["quantiles"] == [0.9, 0.1]
    assert g["values"][2][1] == [f["values"][2][1][2], f["values"][2][1][0]]
    assert client.get("/v1/series/s/forecast?horizon=17", headers=h).status_code == 422
    assert client.get("/v1/series/s/forecast?quantiles=0.3", headers=h).status_code == 422
    a = client.get("/v1/series/s/audit", headers=h).json()
    assert a["series_id"] == "s" and a["tokens"] == 1 and a["state_bytes"] > 0


def test_rejected_rows_come_back_with_reasons(app_and_keys):
    app, client, keys = app_and_keys
    h = auth(keys["a"])
    create(client, keys["a"], "s")
    client.post("/v1/series/s/observations", json=rows(0, 0, 10), headers=h)
    body = {"timestamps": [5, 10, 10, 11, 12, 13], "values": [[1, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1], [1, 2], [None] * 4, [1e300, 0, 0, 0]]}
    r = client.post("/v1/series/s/observations", json=body, headers=h).json()
    assert r["accepted"] == 1  # under tolerance 0 a repeat in one push is late: its step was released at once
    assert [(x["index"], x["reason"]) for x in r["rejected"]] == [
        (0, "late"), (2, "late"), (3, "wrong_width"), (4, "empty_row"), (5, "not_finite")]
    assert all(x["detail"] for x in r["rejected"])


def test_health_metrics_and_openapi(app_and_keys):
    app, client, keys = app_and_keys
    h = auth(keys["a"])
    create(client, keys["a"], "s")
    client.post("/v1/series/s/observations", json=rows(0, 0, 16), headers=h)
    client.post("/v1/series/s/observations", json={"timestamps": [3], "values": [[1, 2, 3, 4]]}, headers=h)
    assert client.get("/healthz").json()["status"] == "ok"
    text = client.get("/metrics").text
    assert "oryx_ingest_rows_total 16.0" in text
    assert 'oryx_rejected_rows_total{reason="late"} 1.0' in text
    assert "oryx_series 1.0" in text and "oryx_step_seconds_count" in text and "oryx_attention_fraction" in text
    assert keys["a"] not in text and "tenant-a" not in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/series", "/v1/series/{series}/observations", "/v1/series/{series}/forecast"} <= set(paths)


def test_forecasts_are_read_without_the_engine_lock_and_only_once_durable(app_and_keys):
    import threading

    app, client, keys = app_and_keys
    service = app.state.service
    h = auth(keys["a"])
    create(client, keys["a"], "s")
    client.post("/v1/series/s/observations", json=rows(0, 0, 16), headers=h)
    first = client.get("/v1/series/s/forecast", headers=h).json()
    assert first["token"] == 1
    # a flush holding the lock (here: a thread that holds it) does not delay a forecast read
    held, release = threading.Event(), threading.Event()

    def hold():
        with service.lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(5)
        assert client.get("/v1/series/s/forecast", headers=h).json() == first
    finally:
        release.set()
        t.join()
    # the patch of a failed commit was stepped, then undone: its forecast was never served
    service.writer.fail_next_commit = 1
    assert client.post("/v1/series/s/observations", json=rows(0, 16, 8), headers=h).status_code == 503
    assert client.get("/v1/series/s/forecast", headers=h).json() == first
    assert client.post("/v1/series/s/observations", json=rows(0, 16, 8), headers=h).json()["accepted"] == 8
    assert client.get("/v1/series/s/forecast", headers=h).json()["token"] == 2


def test_a_deleted_series_forecast_is_gone_with_it(app_and_keys):
    app, client, keys = app_and_keys
    h = auth(keys["a"])
    create(client, keys["a"], "s")
    client.post("/v1/series/s/observations", json=rows(0, 0, 8), headers=h)
    assert client.get("/v1/series/s/forecast", headers=h).status_code == 200
    assert client.delete("/v1/series/s", headers=h).status_code == 204
    assert client.get("/v1/series/s/forecast", headers=h).status_code == 404
    create(client, keys["a"], "s", channels=["a", "b", "c", "d"])
    r = client.get("/v1/series/s/forecast", headers=h)
    assert r.status_code == 409, r.text  # the new series has no patch yet: nothing of the old one is served
    client.post("/v1/series/s/observations", json=rows(1, 0, 8), headers=h)
    assert client.get("/v1/series/s/forecast", headers=h).json()["channels"] == ["a", "b", "c", "d"]
