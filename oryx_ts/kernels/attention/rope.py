"""Rotary position embedding over token index (rotate-half convention), fp32 angles."""

import torch


def rope(x_BTHK: torch.Tensor, pos_T: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """Rotate `x_BTHK` by the angles of absolute token positions `pos_T` (int64). K must be even."""
    K = x_BTHK.shape[-1]
    inv_freq = base ** (-torch.arange(0, K, 2, device=x_BTHK.device, dtype=torch.float64) / K)
    # angles in fp64 so that positions in the millions keep their phase; the rotation itself is fp32
    angle_TK = (pos_T.to(torch.float64)[:, None] * inv_freq[None, :]).float()
    cos, sin = angle_TK.cos()[None, :, None, :], angle_TK.sin()[None, :, None, :]
    x = x_BTHK.float()
    x1, x2 = x[..., : K // 2], x[..., K // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTHK.dtype)
