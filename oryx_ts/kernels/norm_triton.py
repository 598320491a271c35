"""RMSNorm over the last axis in one Triton launch (the streaming step's norms; eager torch takes eight).

One program per row; the arithmetic and roundings of `norm_naive.rms_norm`. Legend: N rows, D width.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Y, s_x, s_y, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    x = tl.load(X + row * s_x + offs, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    n = (x * r).to(Y.dtype.element_ty).to(tl.float32)  # rounded to the input dtype before the weight, as torch
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * s_y + offs, (n * w).to(Y.dtype.element_ty), mask=m)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See `norm_naive.rms_norm`; x of any leading shape with a contiguous last axis."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    assert out_dtype == x.dtype, "the weight's dtype must not widen the output"
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    BLOCK_D = triton.next_power_of_2(D)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), D, eps, BLOCK_D=BLOCK_D,
                                     num_warps=4 if BLOCK_D >= 512 else 1)
    return y.view(x.shape)
