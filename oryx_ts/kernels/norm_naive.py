"""The streaming step's elementwise ops as functions on tensors: the twins of `kernels.norm_triton`
and the CPU path.

The same arithmetic as `block.RMSNorm` (normalize in fp32, round to the input dtype, then scale by
the weight in the input dtype), the block's residual add and `block.SwiGLU`'s activation. Imports no triton.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / rms(x) * weight` over the last axis; returns x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm(x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it: `(s, rms_norm(s))` with `s = x + res`."""
    s = x + res
    return s, rms_norm(s, weight, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation `silu(gate) * up`, `gate_up = [gate | up]` along the last axis."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
