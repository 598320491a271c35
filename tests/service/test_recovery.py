"""Restart is invisible: last snapshot + log replay give the same engine, bit for bit, as a server that never
stopped; a failed commit leaves nothing applied; the log holds exactly the accepted rows, once."""

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import auth, create, make_app, rows

SERIES = ["s0", "s1", "s2", "s3"]


def plan(seed: int, requests: int) -> list[tuple[str, int, int]]:
    """(series, first timestamp, rows) per request; chunks of 1..20 rows so patches end anywhere."""
    rng = np.random.default_rng(seed)
    cursor = dict.fromkeys(SERIES, 0)
    out = []
    for _ in range(requests):
        sid = SERIES[int(rng.integers(len(SERIES)))]
        n = int(rng.integers(1, 21))
        out.append((sid, cursor[sid], n))
        cursor[sid] += n
    return out


def send(client, key, sid, start, n):
    r = client.post(f"/v1/series/{sid}/observations", json=rows(SERIES.index(sid), start, n), headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def state(app) -> dict:
    """Every series' served forecast and audit, straight from the engine."""
    e = app.state.service.engine
    out = {}
    for key in sorted(e.series):
        try:
            out[key] = (e.forecast(key).values.copy(), e.audit(key))
        except ValueError:
            out[key] = (None, e.audit(key))
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        (fa, aa), (fb, ab) = a[key], b[key]
        assert (fa is None) == (fb is None), key
        if fa is not None:
            assert np.array_equal(fa, fb), key  # bit for bit (NaN-free forecasts)
        aa, ab = dict(aa), dict(ab)
        for d in (aa, ab):
            d.pop("state_bytes_history")
        assert str(aa) == str(ab), key  # str: NaN == NaN


def logged_rows(app) -> int:
    return app.state.service.db.conn.execute("SELECT COUNT(*) FROM log WHERE kind = 'obs'").fetchone()[0]


def crash(app) -> None:
    """Drop the app without its shutdown: no final snapshot (the writer thread is stopped so it leaks nothing)."""
    app.state.service.close(clean=False)


@pytest.mark.parametrize("snapshot_every", [0, 37])
def test_a_crash_midway_then_replay_equals_a_server_that_never_stopped(tmp_path, model, snapshot_every):
    steps = plan(seed=snapshot_every, requests=90)
    kw = dict(snapshot_every_rows=snapshot_every)

    a = make_app(tmp_path / "a", model, **kw)
    ka = a.state.service.db.add_key("t")
    with TestClient(a) as client:
        for sid in SERIES:
            assert create(client, ka, sid, labels=[[30, 50]]).status_code == 201
        accepted = sum(send(client, ka, *s)["accepted"] for s in steps)
        straight = state(a)
    assert accepted == sum(n for _, _, n in steps) == logged_rows(a)

    b = make_app(tmp_path / "b", model, **kw)
    kb = b.state.service.db.add_key("t")
    client = TestClient(b)  # no lifespan: nothing runs at shutdown
    for sid in SERIES:
        create(client, kb, sid, labels=[[30, 50]])
    for s in steps[:50]:
        send(client, kb, *s)
    crash(b)
    del client, b
    b = make_app(tmp_path / "b", model, **kw)  # recovery: snapshot (if any) + replay of the log after it
    if snapshot_every:
        assert b.state.service.store.seq > 0, "a snapshot was taken and recovery started from it"
    with TestClient(b) as client:
        for s in steps[50:]:
            send(client, kb, *s)
        resumed = state(b)
    assert_same(straight, resumed)
    assert logged_rows(b) == accepted  # nothing logged twice

    again = make_app(tmp_path / "b", model, **kw)  # after a clean shutdown: the final snapshot alone
    assert again.state.service.store.seq == again.state.service.db.last_seq()
    assert_same(straight, state(again))
    crash(again)


def test_concurrent_clients_share_micro_batches_and_recover_bit_for_bit(tmp_path, model):
    app = make_app(tmp_path / "c", model, snapshot_every_rows=150)
    key = app.state.service.db.add_key("t")
    errors = []

    def client_thread(client, sids, seed):
        rng = np.random.default_rng(seed)
        cursor = dict.fromkeys(sids, 0)
        try:
            for _ in range(25):
                sid = sids[int(rng.integers(len(sids)))]
                n = int(rng.integers(1, 12))
                r = client.post(f"/v1/series/{sid}/observations", json=rows(int(sid[1:]), cursor[sid], n), headers=auth(key))
                assert r.status_code == 200 and r.json()["accepted"] == n, r.text
                cursor[sid] += n
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    client = TestClient(app)
    groups = [[f"s{2 * i}", f"s{2 * i + 1}"] for i in range(4)]
    for g in groups:
        for sid in g:
            create(client, key, sid)
    threads = [threading.Thread(target=client_thread, args=(client, g, i)) for i, g in enumerate(groups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    before = state(app)
    crash(app)
    assert_same(before, state(make_app(tmp_path / "c", model, snapshot_every_rows=150)))


def test_a_failed_commit_leaves_the_engine_where_the_disk_is(tmp_path, model):
    app = make_app(tmp_path / "f", model)
    key = app.state.service.db.add_key("t")
    h = auth(key)
    with TestClient(app) as client:
        create(client, key, "s0")
        send(client, key, "s0", 0, 13)
        before = state(app)
        app.state.service.writer.fail_next_commit = 1
        r = client.post("/v1/series/s0/observations", json=rows(0, 13, 11), headers=h)
        assert r.status_code == 503 and "retrying is safe" in r.json()["detail"]
        assert_same(before, state(app))  # rows 13..23 are not in the engine: they were never durable
        assert client.get("/healthz").json()["status"] == "ok"
        assert send(client, key, "s0", 13, 11)["accepted"] == 11  # the retry is accepted once
        assert send(client, key, "s0", 13, 11)["accepted"] == 0  # and a second retry is late, not applied twice
        after = state(app)
    assert logged_rows(app) == 24
    assert_same(after, state(make_app(tmp_path / "f", model)))
