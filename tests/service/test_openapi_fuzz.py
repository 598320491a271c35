"""Schemathesis against the app's own OpenAPI schema (in-process ASGI): no 5xx, every response conforming to
the schema, and a pre-existing series untouched by whatever the generated requests do to other ids."""

import os

import numpy as np
import pytest
from fastapi.testclient import TestClient

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance  # noqa: E402

from tests.conftest import random_model  # noqa: E402
from tests.service.conftest import auth, create, rows  # noqa: E402
from tests.service.conftest import make_app as _make_app  # noqa: E402

EXAMPLES = int(os.environ.get("ORYX_FUZZ_EXAMPLES", "150"))  # per operation; 9 operations
_DIR = __import__("tempfile").mkdtemp(prefix="oryx-fuzz-")
APP = _make_app(__import__("pathlib").Path(_DIR), random_model(), max_rows=500, max_body_bytes=100_000)
KEY = APP.state.service.db.add_key("fuzz")
_c = TestClient(APP)  # no lifespan: the app stays up for the generated requests
create(_c, KEY, "keep")
_c.post("/v1/series/keep/observations", json=rows(0, 0, 24), headers=auth(KEY))
KEEP = APP.state.service.engine.forecast("fuzz/keep").values.copy()


CALLS: list[str] = []


async def _no_lifespan(scope, receive, send):
    """APP without its lifespan: schemathesis opens a client per call, and a shutdown would close the service."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    if scope["type"] == "http" and scope["path"] != "/openapi.json":
        CALLS.append(scope["method"])
    return await APP(scope, receive, send)


schema = schemathesis.openapi.from_asgi("/openapi.json", _no_lifespan)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_5xx_nor_break_the_schema(case):
    if case.path_parameters and case.path_parameters.get("series") == "keep" and case.method.upper() == "DELETE":
        return
    response = case.call(headers={**(case.headers or {}), **auth(KEY)})
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance])


def test_the_pre_existing_series_is_unchanged():
    print(f"\n{len(CALLS)} generated requests, {EXAMPLES} examples per operation")
    if EXAMPLES >= 150:
        assert len(CALLS) >= 1000 * EXAMPLES / 150, f"only {len(CALLS)} generated requests"
    e = APP.state.service.engine
    assert np.array_equal(e.forecast("fuzz/keep").values, KEEP)
    APP.state.service.close(clean=False)
