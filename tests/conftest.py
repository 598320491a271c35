"""Shared fixtures: small models with every weight random, so no output is trivially zero."""

import pytest
import torch

from oryx_ts.config import preset
from oryx_ts.model import OryxForecaster


def random_model(mixer: str = "gdn", seed: int = 0, **sections) -> OryxForecaster:
    """A debug-preset model whose zero-initialized head is randomized (untrained models would forecast the mean)."""
    torch.manual_seed(seed)
    config = preset("debug", block={"mixer": mixer, **sections.pop("block", {})}, **sections)
    model = OryxForecaster(config)
    with torch.no_grad():
        model.head.proj.weight.normal_(0, 0.2)
        model.head.proj.bias.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(params=["gdn", "mamba2"])
def mixer(request) -> str:
    return request.param
