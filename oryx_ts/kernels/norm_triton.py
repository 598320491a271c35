"""The streaming step's elementwise kernels in Triton: RMSNorm, the residual add with the RMSNorm
after it, and SwiGLU's activation; one launch each (eager torch takes eight, ten and three).

The arithmetic and roundings of their twins in `norm_naive`. Legend: N rows, D width, F hidden width.
"""

import torch
import triton
import triton.language as tl

ROWS = 4  # rows per program of the norms: a 512-wide bf16 row is 1 KB, too little for one program


@triton.jit
def _rms_norm_kernel(X, R, W, S, Y, N, s_x, s_r, s_s, s_y, D, eps,
                     HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < N) & (offs[None, :] < D)
    x = tl.load(X + rows[:, None] * s_x + offs[None, :], mask=m, other=0.0)
    if HAS_RES:
        # the residual sum rounded to the input dtype, as torch's `x + r`, then normalized
        x = (x.to(tl.float32) + tl.load(R + rows[:, None] * s_r + offs[None, :], mask=m, other=0.0).to(tl.float32))
        x = x.to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * s_s + offs[None, :], x, mask=m)
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + eps)
    n = (xf * r[:, None]).to(Y.dtype.element_ty).to(tl.float32)  # rounded to the input dtype before the weight, as torch
    w = tl.load(W + offs, mask=offs < D, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * s_y + offs[None, :], (n * w[None, :]).to(Y.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm(x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float):
    D = x.shape[-1]
    x2 = _rows(x)
    assert torch.promote_types(x.dtype, weight.dtype) == x.dtype, "the weight's dtype must not widen the output"
    r2 = x2 if res is None else _rows(res)
    assert r2.shape == x2.shape and r2.dtype == x2.dtype
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    s = y if res is None else torch.empty_like(y)
    N = x2.shape[0]
    BLOCK_D = triton.next_power_of_2(D)
    _rms_norm_kernel[(triton.cdiv(N, ROWS),)](
        x2, r2, weight, s, y, N, x2.stride(0), r2.stride(0), s.stride(0), y.stride(0), D, eps,
        HAS_RES=res is not None, BLOCK_R=ROWS, BLOCK_D=BLOCK_D, num_warps=4 if ROWS * BLOCK_D >= 1024 else 1,
    )
    return s.view(x.shape), y.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See `norm_naive.rms_norm`; x of any leading shape with a contiguous last axis."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm_triton(x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """See `norm_naive.add_rms_norm`: `(x + res, rms_norm(x + res))` in one launch."""
    return _norm(x, res, weight, eps)


@triton.jit
def _swiglu_kernel(GU, Y, s_gu, s_y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < F
    g = tl.load(GU + row * s_gu + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * s_gu + F + offs, mask=m, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)  # silu rounded to the dtype, as torch
    tl.store(Y + row * s_y + offs, (a * u).to(Y.dtype.element_ty), mask=m)


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """See `norm_naive.swiglu`: `silu(gate) * up` of `gate_up = [gate | up]` along the last axis."""
    F2 = gate_up.shape[-1]
    assert F2 % 2 == 0
    g2 = _rows(gate_up)
    y = torch.empty(g2.shape[0], F2 // 2, device=gate_up.device, dtype=gate_up.dtype)
    BLOCK = min(2048, triton.next_power_of_2(F2 // 2))
    _swiglu_kernel[(g2.shape[0], triton.cdiv(F2 // 2, BLOCK))](g2, y, g2.stride(0), y.stride(0), F2 // 2, BLOCK=BLOCK,
                                                              num_warps=8 if BLOCK >= 2048 else 4)
    return y.view(*gate_up.shape[:-1], F2 // 2)
