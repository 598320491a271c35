"""Mamba-2 SSD on the GPU: mamba-ssm's Triton SSD (`mamba_chunk_scan_combined`) and, as the
alternative, fla's `chunk_simple_gla`. Same contract as `naive.py`; packages load on first call.

Legend: B batch, T tokens, H heads, K state (key) dim, V head (value) dim.

Our ops take the scan in gated-linear-attention form (q = C, k = B, v = x * dt, g = dt * A).
mamba-ssm takes Mamba's own (x, dt, A per head). With A = -1 for every head the two meet at
dt = -g and x = v / dt: for a Mamba-2 module `v / dt` is `x * dt_true / (-A_true * dt_true)`,
i.e. the block's x over |A| (A in [1, 16]), so the division is well conditioned. mamba-ssm's
state is [B, H, V, K] (head dim first); ours is [B, H, K, V].
"""

import torch

from oryx_ts.kernels._mamba_ssm import mamba_chunk_scan_combined

MAMBA_CHUNK = 256  # mamba-ssm's default chunk for Mamba-2
# smallest dt handed to mamba-ssm; g = 0 (no decay at all) cannot be expressed as x * dt
_DT_MIN = 1e-12


def mamba_ssm_chunk_ssd(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD through mamba-ssm. Returns `(o_BTHV, final_state_BHKV fp32)`; differentiable in every input.

    Needs g < 0 everywhere (true for Mamba-2, where g = dt * A with dt > 0 and A < 0).
    """
    scan = mamba_chunk_scan_combined()
    dtype = v_BTHV.dtype
    x_dtype = torch.float32 if dtype == torch.float16 else dtype  # x = v / dt can exceed fp16's range
    H, K = q_BTHK.shape[2], q_BTHK.shape[3]
    scale = K**-0.5 if scale is None else scale
    dt_BTH = (-g_BTH.float()).clamp_min(_DT_MIN)
    x_BTHV = (v_BTHV.float() / dt_BTH[..., None]).to(x_dtype)
    A_H = -torch.ones(H, device=q_BTHK.device, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()
    o, state_BHVK = scan(
        x_BTHV.contiguous(),
        dt_BTH.contiguous(),
        A_H,
        k_BTHK.to(dtype).contiguous(),
        (q_BTHK.float() * scale).to(dtype).contiguous(),
        MAMBA_CHUNK,
        initial_states=h0,
        return_final_states=True,
    )
    return o.to(dtype), state_BHVK.transpose(-1, -2).contiguous()


def fla_chunk_ssd(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD as fla `chunk_simple_gla` (scalar decay per head and token). Returns `(o_BTHV, final_state_BHKV fp32)`.

    The forward runs everywhere; on Hopper with triton >= 3.4 and < 3.7.1 fla refuses its
    backward for 16-bit inputs (fla issue 640), so training uses `mamba_ssm_chunk_ssd`.
    """
    from fla.ops.simple_gla import chunk_simple_gla

    dtype = v_BTHV.dtype
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, state = chunk_simple_gla(
        q_BTHK.to(dtype).contiguous(),
        k_BTHK.to(dtype).contiguous(),
        v_BTHV.contiguous(),
        g=g_BTH.float().contiguous(),
        scale=scale,
        initial_state=h0,
        output_final_state=True,
    )
    return o, state
