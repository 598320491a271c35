"""The router interface and the heuristic routers the learned one is compared with.

Legend: B series, T tokens, D model dim, F surprise features.

A router maps `RouterInputs` (token embeddings, causal surprise features, absolute positions) to
per-token scores in [0, 1]; the budget controller turns scores into modes. A router whose
`needs_surprise` is False scores tokens without the forecasts of earlier tokens, so a routed
forward can decide every mode first and run the model in parallel; otherwise it streams.
"""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class RouterInputs:
    """What a router sees for T tokens of B series; everything here is causal."""

    tokens_BTD: torch.Tensor  # token embeddings from the tokenizer
    surprise_BTF: torch.Tensor  # `features.surprise_features` (zeros when the router needs none)
    positions_BT: torch.Tensor  # absolute token positions of each series, int64


@runtime_checkable
class Router(Protocol):
    needs_surprise: bool

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        """Scores `(B, T)` in [0, 1]; higher asks more for attention."""
        ...


def _full(inputs: RouterInputs, values_BT: torch.Tensor) -> torch.Tensor:
    return values_BT.to(torch.float32).expand(inputs.positions_BT.shape).clone()


class AllRouter:
    """Asks for attention at every token (under a budget: spend whenever affordable)."""

    needs_surprise = False

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        return _full(inputs, torch.ones(()))


class NoneRouter:
    """Never asks for attention: the all-recurrent baseline."""

    needs_surprise = False

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        return _full(inputs, torch.zeros(()))


class FixedRouter:
    """Fixed 1-in-`every` schedule: token n asks when `n % every == offset` (default `every - 1`)."""

    needs_surprise = False

    def __init__(self, every: int, offset: int | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.offset = every - 1 if offset is None else offset % every

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        return _full(inputs, (inputs.positions_BT % self.every == self.offset).float())


def _uniform(seed: int, positions: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): a splitmix64 hash of (seed, position), so step and forward agree."""
    with np.errstate(over="ignore"):
        z = (positions.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(31)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(29)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class RandomRouter:
    """Asks for attention at each token independently with probability `rate` (deterministic in `seed`)."""

    needs_surprise = False

    def __init__(self, rate: float, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.rate, self.seed = rate, seed

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        u = _uniform(self.seed, inputs.positions_BT.cpu().numpy())
        return _full(inputs, torch.as_tensor(u < self.rate))


class SurpriseRouter:
    """Scores tokens by the surprise of the forecast made for their patch.

    With a `threshold` the score is 1 when the mean normalized error (`exp(feature 0) - 1`) exceeds
    it and 0 otherwise; without one the score is `e / (1 + e)` and the controller's adaptive
    threshold decides.
    """

    needs_surprise = True

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        err = torch.expm1(inputs.surprise_BTF[..., 0])
        if self.threshold is not None:
            return (err > self.threshold).float()
        return err / (1 + err)


class OracleRouter:
    """Asks for attention exactly at labelled tokens: `mask` (T,) or (B, T) over absolute positions."""

    needs_surprise = False

    def __init__(self, mask: np.ndarray | torch.Tensor):
        self.mask = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
        if self.mask.dim() not in (1, 2):
            raise ValueError(f"mask must be (T,) or (B, T), got shape {tuple(self.mask.shape)}")

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        pos = inputs.positions_BT.cpu()
        if int(pos.max()) >= self.mask.shape[-1]:
            raise ValueError(f"oracle mask covers {self.mask.shape[-1]} tokens, asked for position {int(pos.max())}")
        if self.mask.dim() == 1:
            return self.mask[pos].clone()
        if self.mask.shape[0] != pos.shape[0]:
            raise ValueError(f"oracle mask holds {self.mask.shape[0]} series, asked for {pos.shape[0]}")
        return self.mask.gather(1, pos)
