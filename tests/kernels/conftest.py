"""Shared helpers for the kernel tests: random inputs in fla's layout and the error metric."""

import pytest
import torch
import torch.nn.functional as F


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere in `out` counts as infinite error."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_linear_inputs(B, T, H, K, V, *, mixer, dtype=torch.float32, device="cpu", seed=0, init_state=False):
    """q, k, v, g, beta (None for mamba2) and an optional initial state, like the block produces them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = F.normalize(r(B, T, H, K), dim=-1)
    k = F.normalize(r(B, T, H, K), dim=-1)
    v = r(B, T, H, V)
    # log decays in the range the block produces: -A * softplus(.) with A in [1, 16], dt small
    g = -torch.exp(r(B, T, H) * 0.5 - 3.0) * (1 + 15 * torch.rand(H, generator=gen))
    beta = torch.sigmoid(r(B, T, H)) if mixer == "gdn" else None
    h0 = r(B, H, K, V) * 0.5 if init_state else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    # gates stay fp32, as the block computes them
    return (cast(q), cast(k), cast(v), g.to(device), None if beta is None else beta.to(device),
            None if h0 is None else h0.to(device))


@pytest.fixture
def linear_inputs():
    return make_linear_inputs
