"""Bad input gets a 4xx with a reason (or, row by row, a rejection with a reason) and changes nothing:
a table of hand-written bad requests, then a bounded property-based fuzz of ingest bodies."""

import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service.conftest import CHANNELS, auth, create, make_app, rows

GOOD = "/v1/series/s/observations"
# (name, method, path, body or raw bytes, extra headers, expected status, a word the reason must hold)
BAD = [
    ("nan as a string", "POST", GOOD, {"timestamps": [50], "values": [["NaN", 1, 2, 3]]}, {}, 422, "float"),
    ("number as a string", "POST", GOOD, {"timestamps": [50], "values": [["1.5", 1, 2, 3]]}, {}, 422, "float"),
    ("timestamp as a string", "POST", GOOD, {"timestamps": ["50"], "values": [[0, 1, 2, 3]]}, {}, 422, "integer"),
    ("timestamp as a float", "POST", GOOD, {"timestamps": [50.5], "values": [[0, 1, 2, 3]]}, {}, 422, "integer"),
    ("timestamp over int64", "POST", GOOD, {"timestamps": [2**63], "values": [[0, 1, 2, 3]]}, {}, 422, "less than"),
    ("boolean value", "POST", GOOD, {"timestamps": [50], "values": [[True, 1, 2, 3]]}, {}, 422, "float"),
    ("rows and timestamps differ", "POST", GOOD, {"timestamps": [50, 51], "values": [[0, 1, 2, 3]]}, {}, 422, "2 timestamps but 1"),
    ("values not rows", "POST", GOOD, {"timestamps": [50], "values": [1, 2, 3, 4]}, {}, 422, "list"),
    ("missing field", "POST", GOOD, {"timestamps": [50]}, {}, 422, "missing"),
    ("extra field", "POST", GOOD, {"timestamps": [], "values": [], "x": 1}, {}, 422, "extra"),
    ("bad json", "POST", GOOD, b'{"timestamps": [50', {}, 422, "json"),
    ("not json at all", "POST", GOOD, b"\xff\xfe", {}, 422, ""),
    ("json but a list", "POST", GOOD, [1, 2], {}, 422, ""),
    ("too many rows", "POST", GOOD, {"timestamps": list(range(100, 2101)), "values": [[0, 1, 2, 3]] * 2001}, {}, 413, "at most 2000"),
    ("huge body", "POST", GOOD, b"{" + b" " * 300_000 + b"}", {}, 413, "over"),
    ("declared huge body", "POST", GOOD, b"{}", {"content-length": "999999999"}, 413, "over"),
    ("unknown series", "POST", "/v1/series/nope/observations", rows(0, 50, 2), {}, 404, "unknown series"),
    ("series id with a slash", "POST", "/v1/series/%2E%2E%2Fetc/observations", rows(0, 50, 2), {}, 404, "not found"),
    ("bad series id", "GET", "/v1/series/a%20b", None, {}, 404, "unknown series"),
    ("series id too long", "GET", "/v1/series/" + "x" * 300 + "/forecast", None, {}, 404, "unknown series"),
    ("other tenant", "POST", GOOD, rows(0, 50, 2), {"Authorization": "OTHER"}, 404, "unknown series"),
    ("no key", "POST", GOOD, rows(0, 50, 2), {"Authorization": ""}, 401, "API key"),
    ("horizon not a number", "GET", "/v1/series/s/forecast?horizon=ten", None, {}, 422, "integer"),
    ("horizon zero", "GET", "/v1/series/s/forecast?horizon=0", None, {}, 422, "greater"),
    ("unknown quantile", "GET", "/v1/series/s/forecast?quantiles=0.5,nan", None, {}, 422, "not among"),
    ("create: wrong channels", "POST", "/v1/series", {"id": "t", "channels": ["a"], "step": 1}, {}, 422, "4 channels"),
    ("create: step zero", "POST", "/v1/series", {"id": "t", "channels": CHANNELS, "step": 0}, {}, 422, "greater"),
    ("create: step a string", "POST", "/v1/series", {"id": "t", "channels": CHANNELS, "step": "1"}, {}, 422, "integer"),
    ("create: id with a slash", "POST", "/v1/series", {"id": "a/b", "channels": CHANNELS, "step": 1}, {}, 422, "must match"),
    ("create: empty label", "POST", "/v1/series", {"id": "t", "channels": CHANNELS, "step": 1, "labels": [[5, 5]]}, {}, 422, "empty"),
    ("create: exists", "POST", "/v1/series", {"id": "s", "channels": CHANNELS, "step": 1}, {}, 409, "exists"),
    ("create: duplicate names", "POST", "/v1/series", {"id": "t", "channels": ["a", "a", "b", "c"], "step": 1}, {}, 422, "distinct"),
]
# row-level problems are not request errors: 200, the row refused with its reason, the others accepted
ROWS = [
    ("duplicate and late timestamps", {"timestamps": [39, 40, 40], "values": [[0, 1, 2, 3]] * 3}, ["late", None, "late"]),
    ("wrong width", {"timestamps": [40, 41], "values": [[0, 1, 2], [0, 1, 2, 3]]}, ["wrong_width", None]),
    ("infinite value", {"timestamps": [40, 41], "values": [[1e39, 1, 2, 3], [0, 1, 2, 3]]}, ["not_finite", None]),
    ("every channel missing", {"timestamps": [40, 41], "values": [[None] * 4, [0, 1, 2, 3]]}, ["empty_row", None]),
    ("before the stream", {"timestamps": [-5, 40], "values": [[0, 1, 2, 3]] * 2}, ["late", None]),
    # a far-future stamp would be stepped as 10**15 missing rows: refused (rows are placed in grid order)
    ("far future", {"timestamps": [40, 10**15, 41], "values": [[0, 1, 2, 3]] * 3}, [None, "too_far", None]),
    ("past max_gap", {"timestamps": [40 + 1025], "values": [[0, 1, 2, 3]]}, ["too_far"]),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, model):
    app = make_app(tmp_path_factory.mktemp("bad"), model, max_rows=2000, max_body_bytes=200_000)
    db = app.state.service.db
    keys = {"a": db.add_key("a"), "b": db.add_key("b")}
    with TestClient(app) as client:
        create(client, keys["a"], "s")
        create(client, keys["b"], "s-of-b")
        assert client.post(GOOD, json=rows(0, 0, 40), headers=auth(keys["a"])).json()["accepted"] == 40
        yield app, client, keys


def snapshot_of(app) -> tuple:
    e = app.state.service.engine
    return e.forecast("a/s").values.copy(), str(e.audit("a/s")), app.state.service.db.last_seq(), sorted(e.series)


@pytest.mark.parametrize("name,method,path,body,headers,status,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_with_a_reason_and_change_nothing(served, name, method, path, body, headers, status, reason):
    app, client, keys = served
    before = snapshot_of(app)
    h = {**auth(keys["a"]), **headers}
    if h.get("Authorization") == "OTHER":
        h["Authorization"] = f"Bearer {keys['b']}"
    if not h.get("Authorization"):
        h.pop("Authorization")
    kw = {"content": body, "headers": {**h, "content-type": "application/json"}} if isinstance(body, bytes) else {"json": body, "headers": h}
    r = client.request(method, path, **kw)
    assert r.status_code == status, r.text
    detail = json.dumps(r.json()["detail"])
    assert reason.lower() in detail.lower(), detail
    after = snapshot_of(app)
    assert np.array_equal(after[0], before[0]) and after[1:] == before[1:]  # same forecast, audit, log and series


@pytest.mark.parametrize("name,body,reasons", ROWS, ids=[r[0] for r in ROWS])
def test_bad_rows_are_refused_one_by_one_with_a_reason(tmp_path, model, name, body, reasons):
    app = make_app(tmp_path, model)
    key = app.state.service.db.add_key("a")
    with TestClient(app) as client:
        create(client, key, "s")
        client.post(GOOD, json=rows(0, 0, 40), headers=auth(key))
        before = app.state.service.db.last_seq()
        r = client.post(GOOD, json=body, headers=auth(key)).json()
        got = {x["index"]: x["reason"] for x in r["rejected"]}
        assert [got.get(i) for i in range(len(reasons))] == reasons
        assert all(x["detail"] for x in r["rejected"])
        accepted = sum(x is None for x in reasons)
        assert r["accepted"] == accepted
        # only the accepted rows are logged (plus the flush if they completed a patch)
        logged = app.state.service.db.conn.execute("SELECT COUNT(*) FROM log WHERE seq > ? AND kind = 'obs'", (before,)).fetchone()[0]
        assert logged == accepted


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
cell = st.one_of(finite, st.none(), st.integers(-(2**70), 2**70), st.just(math.inf), st.just("NaN"), st.booleans(), st.text(max_size=3))
row = st.lists(cell, min_size=0, max_size=6)
body = st.one_of(
    st.fixed_dictionaries({"timestamps": st.lists(st.one_of(st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=2)), max_size=8),
                           "values": st.lists(row, max_size=8)}),
    st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)), max_size=3),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body)
def test_fuzzed_ingest_bodies_never_get_a_5xx_and_accepted_rows_stay(served, body):
    app, client, keys = served
    e = app.state.service.engine
    tokens = e.audit("a/s")["tokens"]
    try:
        payload = json.dumps(body, allow_nan=True)
    except (TypeError, ValueError):
        return
    r = client.post(GOOD, content=payload, headers={**auth(keys["a"]), "content-type": "application/json"})
    assert r.status_code < 500, r.text
    assert r.status_code in (200, 413, 422), r.text
    if r.status_code == 200:
        assert r.json()["accepted"] + len(r.json()["rejected"]) == len(body["timestamps"])
    assert e.audit("a/s")["tokens"] >= tokens >= 5  # nothing accepted before is lost
