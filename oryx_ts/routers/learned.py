"""The learned router: a small network on the token embedding and the causal surprise features.

Legend: B series, T tokens, D model dim, F surprise features.

It is a plain module; `oryx_ts.train.train_router` fits it against a frozen forecaster, and
`oryx_ts.checkpoint.save(..., router=...)` stores it beside the model.
"""

import torch
import torch.nn.functional as F
from torch import nn

from oryx_ts.config import RouterConfig
from oryx_ts.routers.features import N_FEATURES
from oryx_ts.routers.heuristics import RouterInputs


class LearnedRouter(nn.Module):
    """`score = sigmoid(mlp([norm(token), surprise]))`; reads surprise, so routed forwards stream."""

    needs_surprise = True

    def __init__(self, d_model: int, config: RouterConfig | None = None):
        super().__init__()
        self.config = config or RouterConfig()
        self.d_model = d_model
        hidden = self.config.hidden
        self.token_norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.net = nn.Sequential(nn.Linear(d_model + N_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def logits(self, inputs: RouterInputs) -> torch.Tensor:
        """Logits `(B, T)`; gradients flow to the router only (inputs are detached)."""
        x = torch.cat([self.token_norm(inputs.tokens_BTD.detach().float()), inputs.surprise_BTF.detach().float()], dim=-1)
        return self.net(x)[..., 0]

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        return torch.sigmoid(self.logits(inputs))

    def relaxed_modes(self, logits_BT: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary-concrete (Gumbel) relaxation of Bernoulli(sigmoid(logits)) modes, in (0, 1)."""
        u = torch.rand(logits_BT.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits_BT.device)
        noise = torch.log(u) - torch.log1p(-u)
        return torch.sigmoid((logits_BT + noise) / self.config.temperature)

    @staticmethod
    def label_loss(logits_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits_BT, labels_BT.float())
