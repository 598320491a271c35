"""The one place that decides which implementation of a mixer op runs.

`backend="auto"` picks the fast path for CUDA tensors when its packages are installed and the
torch reference otherwise; `backend="torch"` always takes the reference; `backend="triton"` asks
for the fast path and raises `ValueError` where it cannot run. `last_backend` records the path
taken by the most recent call of each op, so tests can prove which one ran.

Legend: B batch, T tokens, H heads, K key dim, V value dim, S retained keys.
"""

from typing import Literal

import torch

from oryx_ts.kernels.attention.naive import routed_attention as _routed_attention_torch
from oryx_ts.kernels.gdn.naive import gdn_step, naive_chunk_gdn
from oryx_ts.kernels.mamba2.naive import naive_chunk_ssd, ssd_step

Backend = Literal["auto", "torch", "triton"]
Mixer = Literal["gdn", "mamba2"]

last_backend: dict[str, str] = {}


def fast_path_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton path can run on `device`, and why not when it cannot."""
    if device.type != "cuda":
        return False, f"tensors are on {device.type}, the fast path needs CUDA"
    return False, "no fast path is built into this installation"


def select_backend(x: torch.Tensor, backend: Backend) -> str:
    """Resolve `backend` for tensors like `x`; raises `ValueError` if the fast path is demanded but unavailable."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return "torch"
    ok, why = fast_path_available(x.device)
    if backend == "triton" and not ok:
        raise ValueError(f"backend='triton' cannot run: {why}")
    return "triton" if ok else "torch"


def linear_chunk(
    mixer: Mixer,
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor | None,
    *,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel (chunked) linear mixer over T tokens. Returns `(o_BTHV, final_state_BHKV)`."""
    path = select_backend(q_BTHK, backend)
    last_backend["linear_chunk"] = path
    if mixer == "gdn":
        return naive_chunk_gdn(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state=initial_state, chunk_size=chunk_size)
    if mixer == "mamba2":
        return naive_chunk_ssd(q_BTHK, k_BTHK, v_BTHV, g_BTH, initial_state=initial_state, chunk_size=chunk_size)
    raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")


def linear_step(
    mixer: Mixer,
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor | None,
    state_BHKV: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the linear mixer. Returns `(o_BHV, new_state_BHKV)`."""
    path = select_backend(q_BHK, backend)
    last_backend["linear_step"] = path
    if mixer == "gdn":
        return gdn_step(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, state_BHKV)
    if mixer == "mamba2":
        return ssd_step(q_BHK, k_BHK, v_BHV, g_BH, state_BHKV)
    raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")


def routed_attention(
    q_BTqHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    *,
    q_pos_Tq: torch.Tensor,
    k_pos_S: torch.Tensor,
    scale_H: torch.Tensor,
    k_valid_BS: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Causal softmax attention for routed queries only; see `kernels.attention.naive.routed_attention`."""
    path = select_backend(q_BTqHK, backend)
    last_backend["routed_attention"] = path
    return _routed_attention_torch(
        q_BTqHK, k_BSHK, v_BSHV, q_pos_Tq=q_pos_Tq, k_pos_S=k_pos_S, scale_H=scale_H, k_valid_BS=k_valid_BS
    )
