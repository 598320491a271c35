"""Training recipes of the routing scenarios: the forecaster that goes with each labelled stream
(`datasets.scenarios`), its recall curriculum, and the two learned routers the benchmarks compare.

- `anomalies`: the `debug` forecaster, 300 steps.
- `programs`: the `debug` forecaster without RoPE, by a recall curriculum: 2,000 steps all in
  attention mode on `recall_stream` (waveforms played several times in a row), so that attention
  learns to look the past up, then 2,000 mixed-mode steps on telemetry whose program runs repeat often.
- `daily`: the `debug` forecaster with 16 key dims and RoPE base 100 for 3,000 mixed-mode steps,
  half the chunks in attention mode, on telemetry whose jobs cover 30% of the steps.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oryx_ts.config import OryxConfig, preset
from oryx_ts.datasets.labels import LabelWindow, mask_from_windows
from oryx_ts.datasets.recall import recall_stream
from oryx_ts.model import OryxForecaster
from oryx_ts.routers.learned import LearnedRouter
from oryx_ts.train import train, train_router

__all__ = ["RECIPES", "ForecasterRecipe", "train_forecaster", "train_routers"]


@dataclass(frozen=True, kw_only=True)
class ForecasterRecipe:
    """How a scenario's forecaster is trained: changes to the `debug` preset and the recall curriculum's length."""

    block: Mapping[str, Any] = field(default_factory=dict)  # changes to the `debug` preset's block
    train: Mapping[str, Any] = field(default_factory=dict)  # changes to the `debug` preset's training
    recall_steps: int = 0  # all-attention steps on `recall_stream` before the telemetry (0: none)

    def __post_init__(self) -> None:
        if self.recall_steps < 0:
            raise ValueError(f"recall_steps must be >= 0, got {self.recall_steps}")

    def config(self, *, block: Mapping[str, Any] | None = None, train: Mapping[str, Any] | None = None) -> OryxConfig:
        """The `debug` preset with this recipe's changes, then `block` and `train` on top of them."""
        return preset("debug", block={**self.block, **(block or {})}, train={**self.train, **(train or {})})


RECIPES: dict[str, ForecasterRecipe] = {
    "anomalies": ForecasterRecipe(train={"steps": 300}),
    "programs": ForecasterRecipe(block={"rope": False}, train={"steps": 2000}, recall_steps=2000),
    # looking a fixed distance back wants keys whose rotary angles resolve single tokens at 36 tokens:
    # 16 key dims at rope base 100 (at base 10,000 the same model learns much less of it; docs/RESULTS.md)
    "daily": ForecasterRecipe(block={"head_dim_k": 16, "rope_base": 100.0}, train={"steps": 3000, "attention_fraction": 0.5}),
}


def train_forecaster(config: OryxConfig, train_values: np.ndarray, *, recall_steps: int = 0, progress: bool = True) -> OryxForecaster:
    """Train a forecaster on the `(L, C)` telemetry `train_values` under `config`.

    With `recall_steps > 0`, the recall curriculum first: that many all-attention steps on a
    `recall_stream` as long as `train_values` (period 128, 8 plays, seed 5); then the mixed-mode
    training of `config` on the telemetry, from those weights.
    """
    model = None
    if recall_steps:
        recall = config.replace(train={"steps": recall_steps, "attention_fraction": 1.0, "full_mode_fraction": 0.0})
        values = recall_stream(len(train_values), config.tokenizer.channels, period=128, repeats=8, seed=5)
        model = train(recall, values, progress=progress).model
    return train(config, train_values, model=model, progress=progress).model


def train_routers(model: OryxForecaster, train_values: np.ndarray, train_windows: Sequence[LabelWindow], events: Sequence[str], *,
                  progress: bool = True) -> tuple[LearnedRouter, LearnedRouter]:
    """`(label-free, label-fitted)` learned routers for the frozen `model` on the `(L, C)` stream `train_values`.

    The first is `train_router` under `model.config.router` (forecast loss plus the
    self-supervised surprise objective, no labels); the second the same with `label_weight` 1,
    fitting also the tokens of `train_windows` whose kind is in `events`.
    """
    router = train_router(model, train_values, progress=progress).router
    labelled = model.config.replace(router={"label_weight": 1.0})
    supervised = train_router(model, train_values, router=LearnedRouter(labelled.block.d_model, labelled.router),
                              label_mask=mask_from_windows(train_windows, len(train_values), kind=events), progress=progress).router
    return router, supervised
