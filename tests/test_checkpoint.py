"""Checkpoints are safetensors + JSON: they must round-trip exactly, know their data, and refuse corrupt or mismatched files."""

import json

import numpy as np
import pytest
import torch

import oryx_ts
from oryx_ts.checkpoint import DataInfo, fingerprint, read_data
from tests.conftest import random_model


def test_round_trip_gives_identical_outputs(mixer, tmp_path):
    model = random_model(mixer)
    oryx_ts.save(model, tmp_path / "ckpt")
    loaded = oryx_ts.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    x = torch.randn(2, 12 * 8, 4)
    modes = (torch.rand(2, 12) < 0.5).float()
    with torch.no_grad():
        assert torch.equal(loaded(x, modes), model(x, modes))


def test_checkpoint_holds_no_pickle(tmp_path):
    oryx_ts.save(random_model(), tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header


def test_truncated_weights_raise_a_clear_error(tmp_path):
    path = oryx_ts.save(random_model(), tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint weights"):
        oryx_ts.load(path)


def test_corrupt_config_raises(tmp_path):
    path = oryx_ts.save(random_model(), tmp_path / "ckpt")
    (path / "config.json").write_text("{\"config\": ")
    with pytest.raises(ValueError, match="corrupt checkpoint config"):
        oryx_ts.load(path)


def test_config_that_does_not_match_the_weights_raises(tmp_path):
    path = oryx_ts.save(random_model(), tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["block"]["d_model"] = 32
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        oryx_ts.load(path)
    meta["config"]["block"]["n_layers"] = 1
    meta["config"]["block"]["d_model"] = 64
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unexpected"):
        oryx_ts.load(path)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(ValueError, match="not an oryx_ts checkpoint"):
        oryx_ts.load(tmp_path)


def _data_info():
    return DataInfo(channels=("cpu", "mem", "disk", "net"), step_seconds=60, timestamp="time", start="2024-01-01T00:00:00",
                    rows=5_000, train_rows=4_250, fingerprint=fingerprint(np.zeros((5_000, 4), np.float32)),
                    normalization={"kind": "causal_ema", "decay": 0.99, "eps": 1e-5, "clip": 50.0})


def test_data_metadata_round_trips(tmp_path):
    info = _data_info()
    path = oryx_ts.save(random_model(), tmp_path / "ckpt", data=info)
    assert read_data(path) == info
    assert read_data(oryx_ts.save(random_model(), tmp_path / "plain")) is None


def test_a_file_whose_columns_or_step_differ_is_refused_naming_both():
    info = _data_info()
    info.check(["cpu", "mem", "disk", "net"], 60)
    with pytest.raises(ValueError, match=r"has channels \['cpu', 'mem', 'net', 'disk'\], the model was trained on \['cpu', 'mem', 'disk', 'net'\]"):
        info.check(["cpu", "mem", "net", "disk"], 60)
    with pytest.raises(ValueError, match="has step 300s, the model was trained on step 60s"):
        info.check(["cpu", "mem", "disk", "net"], 300)
    with pytest.raises(ValueError, match=r"has step a row index \(no clock\), the model was trained on step 60s"):
        info.check(["cpu", "mem", "disk", "net"], None)


def test_fingerprint_tells_streams_apart():
    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.reshape(3, 4))  # same bytes, another shape
    b = a.copy()
    b[3, 1] = np.nan
    assert fingerprint(a) != fingerprint(b)


def test_a_corrupted_weight_byte_under_a_valid_header_raises_naming_the_file(tmp_path):
    path = oryx_ts.save(random_model(), tmp_path / "ckpt")
    weights = path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01  # the last tensor's bytes; the header still parses
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"corrupt checkpoint weights .*model\.safetensors: sha256"):
        oryx_ts.load(path)


def test_a_corrupted_router_weight_raises_naming_the_file(tmp_path):
    from oryx_ts.checkpoint import load_router
    from oryx_ts.config import RouterConfig
    from oryx_ts.routers.learned import LearnedRouter

    model = random_model()
    router = LearnedRouter(model.config.block.d_model, RouterConfig())
    path = oryx_ts.save(model, tmp_path / "ckpt", router=router)
    assert load_router(path) is not None
    weights = path / "router.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"corrupt checkpoint weights .*router\.safetensors"):
        load_router(path)


def test_an_old_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    model = random_model()
    path = oryx_ts.save(model, tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    del meta["sha256"]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksum"):
        loaded = oryx_ts.load(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_load_with_another_config_of_the_same_shapes(tmp_path):
    model = random_model()
    path = oryx_ts.save(model, tmp_path / "ckpt")
    tuned = model.config.replace(train={"lr": 1e-4}, block={"rope": False})
    assert oryx_ts.load(path, config=tuned).config == tuned
    with pytest.raises(ValueError, match="shape"):
        oryx_ts.load(path, config=model.config.replace(block={"d_model": 32}))
