"""The config tree is the one source of hyperparameters: it must validate, round-trip and reject typos."""

import pytest

from oryx_ts.config import PRESETS, BlockConfig, HeadConfig, OryxConfig, TokenizerConfig, TrainConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    cfg = preset(name)
    assert OryxConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert OryxConfig.load(tmp_path / "c.json") == cfg


def test_replace_changes_one_field_and_keeps_the_rest():
    cfg = preset("debug", block={"mixer": "mamba2"})
    assert cfg.block.mixer == "mamba2"
    assert cfg.block.d_model == preset("debug").block.d_model


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: BlockConfig(mixer="lstm"), "mixer"),
        (lambda: BlockConfig(head_dim_k=7), "head_dim_k"),
        (lambda: BlockConfig(retention="some"), "retention"),
        (lambda: TokenizerConfig(patch_len=0), "patch_len"),
        (lambda: TokenizerConfig(norm_decay=1.5), "norm_decay"),
        (lambda: HeadConfig(quantiles=(0.9, 0.1)), "increasing"),
        (lambda: HeadConfig(quantiles=(0.0, 0.5)), "quantiles"),
        (lambda: TrainConfig(attention_fraction=2.0), "attention_fraction"),
        (lambda: OryxConfig.from_dict({"block": {"d_modle": 3}}), "d_modle"),
        (lambda: OryxConfig.from_dict({"blocks": {}}), "blocks"),
        (lambda: OryxConfig.from_json("{not json"), "JSON"),
        (lambda: preset("huge"), "huge"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(build, fragment):
    with pytest.raises(ValueError, match=fragment):
        build()


def test_configs_are_frozen():
    cfg = preset("debug")
    with pytest.raises(AttributeError):
        cfg.block.d_model = 3  # type: ignore[misc]
