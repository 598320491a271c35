"""RMSNorm as a function on tensors: the twin of `norm_triton.rms_norm_triton` and the CPU path.

The same arithmetic as `block.RMSNorm`: normalize in fp32, round to the input dtype, then scale by
the weight in the input dtype. Imports no triton.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x / rms(x) * weight` over the last axis; returns x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
