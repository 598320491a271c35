"""Where the service's engine steps: `Settings.device` resolves auto/cpu/cuda[:N] and refuses what is absent;
on a CUDA machine the app serves from the GPU and recovers there bit for bit."""

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from oryx_ts.service.settings import Settings
from tests.conftest import random_model
from tests.service.conftest import auth, create, make_app, rows


def test_device_setting_resolves_and_refuses_what_is_absent(tmp_path):
    s = lambda d: Settings(model_dir=tmp_path, data_dir=tmp_path, device=d)  # noqa: E731
    assert s("cpu").resolved_device() == "cpu"
    assert s("auto").resolved_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="no such CUDA device"):
        s(f"cuda:{torch.cuda.device_count()}").resolved_device()
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        s("tpu").resolved_device()


def test_the_app_steps_on_the_configured_device(tmp_path, model):
    app = make_app(tmp_path, model, device="cpu")
    assert app.state.service.device == "cpu"
    assert next(app.state.service.engine.model.parameters()).device.type == "cpu"


def _serve(app, key, n):
    with TestClient(app) as client:
        create(client, key, "s")
        for start in range(0, n, 12):
            assert client.post("/v1/series/s/observations", json=rows(0, start, 12), headers=auth(key)).json()["accepted"] == 12
        return client.get("/v1/series/s/forecast", headers=auth(key)).json()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_forecasts_match_the_cpu_and_recover_bit_for_bit(tmp_path):
    gpu = make_app(tmp_path / "gpu", random_model().cuda(), device="cuda", snapshot_every_rows=50)
    cpu = make_app(tmp_path / "cpu", random_model(), device="cpu")
    fg = _serve(gpu, gpu.state.service.db.add_key("t"), 120)
    fc = _serve(cpu, cpu.state.service.db.add_key("t"), 120)
    assert next(gpu.state.service.engine.model.parameters()).is_cuda
    np.testing.assert_allclose(np.asarray(fg["values"], float), np.asarray(fc["values"], float), rtol=1e-3, atol=1e-3)
    # a restart on the GPU (snapshot plus log replay) gives the same forecast, bit for bit
    again = make_app(tmp_path / "gpu", random_model().cuda(), device="cuda", snapshot_every_rows=50)
    key = again.state.service.db.add_key("t2")
    with TestClient(again):
        assert again.state.service.db.tenant_of(key) == "t2"
    recovered = again.state.service.latest("t/s").forecast
    assert recovered.token == fg["token"]
    assert np.array_equal(np.asarray(recovered.values).tolist(), fg["values"])
