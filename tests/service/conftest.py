"""Fixtures of the service tests: a small random model, apps on a temporary data directory, API keys."""

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oryx_ts.service.app import create_app
from oryx_ts.service.settings import Settings
from tests.conftest import random_model

C = 4
CHANNELS = ["cpu", "mem", "disk", "net"]


@pytest.fixture(scope="session")
def model():
    return random_model()


def settings(data_dir: Path, **kw) -> Settings:
    return Settings(model_dir=data_dir / "no-model", data_dir=data_dir, snapshot_every_s=0, **kw)


def make_app(data_dir: Path, model, **kw):
    return create_app(settings(data_dir, **kw), model=model)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def rows(series: int, start: int, n: int) -> dict:
    """Deterministic observations of series number `series` at timestamps start .. start+n-1 (step 1)."""
    rng = np.random.default_rng([series, start])
    t = np.arange(start, start + n)
    values = np.sin(t[:, None] / 7.0 + series) + 0.1 * rng.normal(size=(n, C))
    return {"timestamps": t.tolist(), "values": values.round(6).tolist()}


def create(client: TestClient, key: str, series: str, **kw):
    return client.post("/v1/series", json={"id": series, "channels": CHANNELS, "step": 1, **kw}, headers=auth(key))


@pytest.fixture
def app_and_keys(tmp_path, model):
    app = make_app(tmp_path / "data", model)
    db = app.state.service.db
    keys = {"a": db.add_key("tenant-a"), "b": db.add_key("tenant-b")}
    with TestClient(app) as client:
        yield app, client, keys
