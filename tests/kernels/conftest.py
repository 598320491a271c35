"""Shared helpers for the kernel tests, as fixtures: random inputs in fla's layout, the error
metric, and fla's pure-torch references.

fla's references: `import fla` would run fla's package `__init__`, which imports triton, and the
CPU install has no triton. `importlib.util.find_spec` on the top-level name locates the package
without executing it, and each `ops/<op>/naive.py` imports only torch and einops, so the files
are loaded on their own, by path.
"""

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

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
    """q, k, v, g, beta (None for mamba2) and an optional initial state, as the block produces them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q = F.normalize(r(B, T, H, K), dim=-1)
    k = F.normalize(r(B, T, H, K), dim=-1)
    v = r(B, T, H, V)
    # log decays in the range the block produces: -A * softplus(.) with A in [1, 16] and small dt
    g = -torch.exp(r(B, T, H) * 0.5 - 3.0) * (1 + 15 * torch.rand(H, generator=gen))
    beta = torch.sigmoid(r(B, T, H)) if mixer == "gdn" else None
    h0 = r(B, H, K, V) * 0.5 if init_state else None
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    # gates and the state stay fp32, as the block computes them
    return (cast(q), cast(k), cast(v), g.to(device), None if beta is None else beta.to(device),
            None if h0 is None else h0.to(device))


@cache
def load_fla_naive(op: str) -> ModuleType | None:
    """`fla/ops/<op>/naive.py` as a standalone module (e.g. op='gated_delta_rule'), or None if absent."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("einops") is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / op / "naive.py"
    if not path.is_file():
        return None
    file_spec = importlib.util.spec_from_file_location(f"_fla_naive_{op}", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


@pytest.fixture
def rel():
    return rel_err


@pytest.fixture
def inputs():
    return make_linear_inputs


@pytest.fixture
def fla_naive():
    def load(op: str) -> ModuleType:
        module = load_fla_naive(op)
        if module is None:
            pytest.skip("fla-core (its naive.py files) or einops is not installed")
        return module

    return load
