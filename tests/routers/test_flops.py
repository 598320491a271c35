"""The cost model is the single source of FLOPs figures (budgets, reports), so it must agree with torch's FLOP counter."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from oryx_ts.config import preset
from oryx_ts.flops import ELEMENTWISE_TERMS, layer_flops, mode_costs, retained_keys, token_flops
from tests.conftest import random_model


def counted_step_flops(model, mode: int, cache_len: int) -> int:
    """FLOPs the counter sees for one streaming token that attends over `cache_len` keys (itself included)."""
    state = model.init_state(1, capacity=cache_len)
    state.n_tokens_B[:] = cache_len - 1  # earlier keys are zeros: the counter cares about shapes only
    patch = torch.randn(1, model.config.tokenizer.patch_len, model.config.tokenizer.channels)
    with FlopCounterMode(display=False) as counter:
        model.step(patch, state, torch.tensor([mode]))
    return counter.get_total_flops()


@pytest.mark.parametrize("cache_len", [1, 17, 120, 400])
@pytest.mark.parametrize("mode", [0, 1])
def test_cost_model_matches_the_flop_counter(mixer, mode, cache_len):
    model = random_model(mixer)
    counted = counted_step_flops(model, mode, cache_len)
    modelled = token_flops(model.config, mode, cache_len)
    assert abs(modelled - counted) / counted < 0.05, (modelled, counted)


@pytest.mark.parametrize("cache_len", [17, 120, 400])
def test_attention_surcharge_matches_the_flop_counter_on_the_terms_it_sees(mixer, cache_len):
    model = random_model(mixer)
    counted = counted_step_flops(model, 1, cache_len) - counted_step_flops(model, 0, cache_len)
    b = model.config.block
    surcharge = {k: layer_flops(b, 1, cache_len)[k] - layer_flops(b, 0, cache_len)[k] for k in layer_flops(b, 1, cache_len)}
    modelled = b.n_layers * sum(v for k, v in surcharge.items() if k not in ELEMENTWISE_TERMS)
    assert abs(modelled - counted) / counted < 0.01, (modelled, counted)


def test_cost_model_matches_the_counter_on_a_wider_model():
    torch.manual_seed(0)
    from oryx_ts.model import OryxForecaster

    model = OryxForecaster(preset("small", block={"mixer": "mamba2"})).eval()
    for mode in (0, 1):
        counted = counted_step_flops(model, mode, 64)
        assert abs(token_flops(model.config, mode, 64) - counted) / counted < 0.05


def test_vectorized_costs_agree_with_per_token_costs():
    config = preset("debug")
    costs = mode_costs(config, 5, 40)
    for i, n in enumerate(range(5, 45)):
        assert costs.recurrent_T[i] == token_flops(config, 0, n + 1)
        assert costs.attention_T[i] == token_flops(config, 1, n + 1)
    assert (np.diff(costs.surcharge_T) > 0).all()


def test_bounded_retention_caps_the_attention_cost():
    config = preset("debug", block={"retention": "bounded", "window": 16, "pinned": 4})
    assert retained_keys(config.block, 1000) == 20
    costs = mode_costs(config, 100, 3)
    assert len(set(costs.attention_T.tolist())) == 1


def test_invalid_arguments_raise():
    block = preset("debug").block
    with pytest.raises(ValueError, match="mode"):
        layer_flops(block, 2, 10)
    with pytest.raises(ValueError, match="cache_len"):
        layer_flops(block, 1, 0)
