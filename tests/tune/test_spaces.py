"""Search spaces are data that every trial turns into a typed config, so a bad space must fail with the config's own error before any trial starts."""

import json

import pytest

from oryx_ts.config import preset
from oryx_ts.tune.spaces import SPACES, Param, Space, forecaster_key, load_space, training_config


def test_named_spaces_check_and_kinds():
    for space in SPACES.values():
        space.check()
    budget = SPACES["budget"]
    assert budget.mode == "grid" and budget.shared_forecaster
    assert [s["budget.fraction"] for s in budget.grid()] == [0.0, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0]
    assert SPACES["routing"].mode == "search" and SPACES["routing"].shared_forecaster
    assert not SPACES["shape"].shared_forecaster


def test_sample_becomes_typed_config():
    space = SPACES["routing"]
    config = space.config({"budget.fraction": 0.05, "block.pinned": 12, "block.retention": "bounded", "router.steps": 80.0})
    assert config.budget.fraction == 0.05 and config.block.pinned == 12 and config.block.retention == "bounded"
    assert config.router.steps == 80 and isinstance(config.router.steps, int)
    assert config.train.steps == 300  # the space's overrides on the debug preset


@pytest.mark.parametrize("params,match", [
    ({"block.head_dim_k": Param("grid", values=(8, 9))}, "block.head_dim_k must be even"),
    ({"budget.fraction": Param("uniform", low=0.5, high=1.5)}, "budget.fraction must be in"),
    ({"block.mixer": Param("choice", values=("gdn", "lstm"))}, "expected one of gdn, mamba2"),
    ({"block.nope": Param("grid", values=(1,))}, "unknown key 'nope'"),
    ({"train.steps": Param("int", low=0, high=10)}, "train.steps must be >= 1"),
])
def test_invalid_spaces_fail_with_the_config_error(params, match):
    with pytest.raises(ValueError, match=match):
        Space("bad", params).check()


def test_sample_outside_space_and_bad_params():
    with pytest.raises(ValueError, match="does not vary"):
        SPACES["budget"].config({"block.mixer": "gdn"})
    with pytest.raises(ValueError, match="low <= high"):
        Param("uniform", low=2, high=1)
    with pytest.raises(ValueError, match="loguniform"):
        Param("loguniform", low=0, high=1)


def test_space_from_json_and_yaml(tmp_path):
    data = {"name": "mine", "overrides": ["train.steps=20"], "params": {
        "budget.fraction": {"grid": [0.1, 0.2]}, "block.rope_base": {"loguniform": [100, 1000]}}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    space = load_space(path)
    assert space.mode == "search" and space.base_config().train.steps == 20
    assert Space.from_dict(space.to_dict()) == space
    yml = tmp_path / "mine.yaml"
    yml.write_text("name: y\nparams:\n  budget.fraction:\n    grid: [0.1, 3.0]\n")
    with pytest.raises(ValueError, match="budget.fraction must be in"):
        load_space(yml)
    with pytest.raises(ValueError, match="unknown space"):
        load_space("nonesuch")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_space(tmp_path / "broken.json")


def test_forecaster_key_ignores_routing_settings_only():
    base = preset("debug")
    key = forecaster_key(base, "data")
    assert forecaster_key(base.replace(budget={"fraction": 0.5}, router={"steps": 3}, block={"pinned": 3}), "data") == key
    assert forecaster_key(base.replace(block={"mixer": "mamba2"}), "data") != key
    assert forecaster_key(base, "other data") != key
    trial = base.replace(block={"retention": "bounded", "window": 64})
    assert training_config(trial, base).block == base.block
