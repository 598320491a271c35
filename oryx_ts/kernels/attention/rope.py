"""Rotary position embedding over token index (rotate-half convention), fp32 angles.

`rope` is the torch reference; `dispatch.rope` runs fla's fused Triton rotation on CUDA with the
same tables (`rope_tables`), rounded to the input's dtype as that kernel requires.
"""

import torch


def rope_tables(pos_T: torch.Tensor, K: int, *, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos_TR, sin_TR)` float32, R = K / 2, for absolute token positions `pos_T` (int64)."""
    inv_freq = base ** (-torch.arange(0, K, 2, device=pos_T.device, dtype=torch.float64) / K)
    # angles in fp64 so that positions in the millions keep their phase; the rotation itself is fp32
    angle_TR = (pos_T.to(torch.float64)[:, None] * inv_freq[None, :]).float()
    return angle_TR.cos(), angle_TR.sin()


def rope(x_BTHK: torch.Tensor, pos_T: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """Rotate `x_BTHK` by the angles of absolute token positions `pos_T` (int64). K must be even."""
    K = x_BTHK.shape[-1]
    cos, sin = (t[None, :, None, :] for t in rope_tables(pos_T, K, base=base))
    x = x_BTHK.float()
    x1, x2 = x[..., : K // 2], x[..., K // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTHK.dtype)
