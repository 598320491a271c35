"""Checkpoints are safetensors + JSON: they must round-trip exactly and refuse corrupt or mismatched files."""

import json

import pytest
import torch

import oryx_ts
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
