"""Routed causal softmax attention in Triton: forward and backward for the routed queries only.

Same contract as `naive.routed_attention`. Queries are the gathered routed tokens; each attends to
every retained key with `k_pos <= q_pos` (and `k_valid`, for a bounded cache with holes). Work and
memory follow the routed queries: a query block scans only the key blocks that some of its rows can
see, the backward walks only the query blocks that can see a key block, and nothing of size
T x T or (all tokens) x S is ever formed.

Legend: B batch, Tq routed queries, S retained keys, H heads, K key dim, V value dim.

Positions must be ascending (`q_pos` along the routed queries, `k_pos` along the cache), as the
model produces them; the block ranges are found by binary search on the device, so the call never
waits on the host. If `k_pos` is not ascending the kernels fall back to scanning every key
(still correct, no longer proportional).

Numerics: logits, softmax statistics and accumulators in fp32; `exp2` with log2(e) folded into
the logits; the per-head temperature is applied to q before the kernels so autograd gives its
gradient. A query that sees no key returns zeros (the reference returns NaN there).
"""

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# block sizes are fixed per kernel because the host-side block ranges depend on them
FWD_BLOCK_M, FWD_BLOCK_N = 128, 64
DKDV_BLOCK_M, DKDV_BLOCK_N = 32, 128
DQ_BLOCK_M, DQ_BLOCK_N = 128, 32
if _INTERPRET:  # keep the CPU interpreter quick
    FWD_BLOCK_M = FWD_BLOCK_N = DKDV_BLOCK_M = DKDV_BLOCK_N = DQ_BLOCK_M = DQ_BLOCK_N = 16


def _configs(warps: list[int], stages: list[int]) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


@triton.jit
def _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
               DK: tl.constexpr, DV: tl.constexpr, HAS_VALID: tl.constexpr):
    n_mask = offs_n < S
    k = tl.load(Kp + offs_n[:, None].to(tl.int64) * s_ks + offs_k[None, :],
                mask=n_mask[:, None] & (offs_k[None, :] < DK), other=0.0)
    v = tl.load(Vp + offs_n[:, None].to(tl.int64) * s_vs + offs_v[None, :],
                mask=n_mask[:, None] & (offs_v[None, :] < DV), other=0.0)
    kpos = tl.load(KPOS + offs_n, mask=n_mask, other=4611686018427387904)
    ok = n_mask
    if HAS_VALID:
        ok = ok & (tl.load(KVALID + b.to(tl.int64) * s_valid_b + offs_n, mask=n_mask, other=0) != 0)
    return k, v, kpos, ok


@triton.autotune(configs=_configs([4, 8], [3]), key=["BLOCK_K", "BLOCK_V", "HAS_VALID", "PREC"])
@triton.jit
def _fwd_kernel(Q, Kc, Vc, O, LSE, QPOS, KPOS, KVALID, KEND, KFULL,
                s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh, s_valid_b,
                H, TQ, S,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    m_mask = offs_m < TQ
    q = tl.load(Q + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qt + offs_k[None, :],
                mask=m_mask[:, None] & (offs_k[None, :] < DK), other=0.0)
    qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
    kend = tl.load(KEND + pid_m)
    kfull = tl.load(KFULL + pid_m)
    n_full = (kfull // BLOCK_N) * BLOCK_N
    Kp = Kc + b.to(tl.int64) * s_kb + h * s_kh
    Vp = Vc + b.to(tl.int64) * s_vb + h * s_vh

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    # keys every row of this block can see: no causal mask
    for start_n in range(0, n_full, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                    DK, DV, HAS_VALID)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * 1.4426950408889634
        if HAS_VALID:
            qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # keys near the diagonal: causal mask per row
    for start_n in range(n_full, kend, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                    DK, DV, HAS_VALID)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * 1.4426950408889634
        visible = ok[None, :] & (kpos[None, :] <= qpos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ot + offs_v[None, :],
             o.to(O.dtype.element_ty), mask=m_mask[:, None] & (offs_v[None, :] < DV))
    # log2-domain log-sum-exp; +inf for rows that see nothing, so the backward gives them p = 0
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=m_mask)


@triton.autotune(configs=_configs([4, 8], [2]), key=["BLOCK_K", "BLOCK_V", "HAS_VALID", "PREC"])
@triton.jit
def _bwd_dkdv_kernel(Q, Kc, Vc, DO, DK_, DV_, LSE, DELTA, QPOS, KPOS, KVALID, QSTART,
                     s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dot, s_doh, s_valid_b,
                     H, TQ, S,
                     DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    Kp = Kc + b.to(tl.int64) * s_kb + h * s_kh
    Vp = Vc + b.to(tl.int64) * s_vb + h * s_vh
    k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                DK, DV, HAS_VALID)
    dk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    q_lo = (tl.load(QSTART + pid_n) // BLOCK_M) * BLOCK_M
    Qp = Q + b.to(tl.int64) * s_qb + h * s_qh
    DOp = DO + b.to(tl.int64) * s_dob + h * s_doh
    for start_m in range(q_lo, TQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < TQ
        q = tl.load(Qp + offs_m[:, None].to(tl.int64) * s_qt + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k[None, :] < DK), other=0.0)
        do = tl.load(DOp + offs_m[:, None].to(tl.int64) * s_dot + offs_v[None, :],
                     mask=m_mask[:, None] & (offs_v[None, :] < DV), other=0.0)
        qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * 1.4426950408889634
        visible = ok[:, None] & (kpos[:, None] <= qpos[None, :])
        pT = tl.where(visible, tl.math.exp2(qkT - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    n_mask = offs_n < S
    tl.store(DK_ + b.to(tl.int64) * s_kb + h * s_kh + offs_n[:, None].to(tl.int64) * s_ks + offs_k[None, :],
             dk.to(DK_.dtype.element_ty), mask=n_mask[:, None] & (offs_k[None, :] < DK))
    tl.store(DV_ + b.to(tl.int64) * s_vb + h * s_vh + offs_n[:, None].to(tl.int64) * s_vs + offs_v[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_mask[:, None] & (offs_v[None, :] < DV))


@triton.autotune(configs=_configs([4, 8], [2]), key=["BLOCK_K", "BLOCK_V", "HAS_VALID", "PREC"])
@triton.jit
def _bwd_dq_kernel(Q, Kc, Vc, DO, DQ, LSE, DELTA, QPOS, KPOS, KVALID, KEND,
                   s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dot, s_doh, s_valid_b,
                   H, TQ, S,
                   DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    m_mask = offs_m < TQ
    q_ptrs = Q + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qt + offs_k[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < DK), other=0.0)
    do = tl.load(DO + b.to(tl.int64) * s_dob + h * s_doh + offs_m[:, None].to(tl.int64) * s_dot + offs_v[None, :],
                 mask=m_mask[:, None] & (offs_v[None, :] < DV), other=0.0)
    qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
    kend = tl.load(KEND + pid_m)
    Kp = Kc + b.to(tl.int64) * s_kb + h * s_kh
    Vp = Vc + b.to(tl.int64) * s_vb + h * s_vh
    dq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for start_n in range(0, kend, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                    DK, DV, HAS_VALID)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * 1.4426950408889634
        visible = ok[None, :] & (kpos[None, :] <= qpos[:, None])
        p = tl.where(visible, tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qt + offs_k[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & (offs_k[None, :] < DK))


def _block_max(pos: torch.Tensor, block: int, pad: int) -> torch.Tensor:
    n = triton.cdiv(pos.numel(), block)
    padded = torch.full((n * block,), pad, dtype=torch.int64, device=pos.device)
    padded[: pos.numel()] = pos
    return padded.view(n, block)


def _key_ranges(q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: keys to scan (`kend`) and keys visible to all its rows (`kfull`), as int32 on device."""
    S = k_pos.numel()
    blocks_min = _block_max(q_pos, block_m, 2**62).min(1).values
    blocks_max = _block_max(q_pos, block_m, -1).max(1).values
    kend = torch.searchsorted(k_pos, blocks_max, right=True)
    kfull = torch.searchsorted(k_pos, blocks_min, right=True)
    ascending = (k_pos[1:] >= k_pos[:-1]).all() if S > 1 else torch.ones((), dtype=torch.bool, device=k_pos.device)
    kend = torch.where(ascending, kend, torch.full_like(kend, S))
    kfull = torch.where(ascending, kfull, torch.zeros_like(kfull))
    return kend.to(torch.int32), kfull.to(torch.int32)


def _query_starts(q_pos: torch.Tensor, k_pos: torch.Tensor, block_n: int) -> torch.Tensor:
    """Per key block: the first routed query that can see one of its keys, as int32 on device."""
    kmin = _block_max(k_pos, block_n, 2**62).min(1).values
    start = torch.searchsorted(q_pos, kmin, right=False)
    Tq = q_pos.numel()
    ascending = (q_pos[1:] >= q_pos[:-1]).all() if Tq > 1 else torch.ones((), dtype=torch.bool, device=q_pos.device)
    return torch.where(ascending, start, torch.zeros_like(start)).to(torch.int32)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, k_valid):
        B, Tq, H, K = q.shape
        S, V = k.shape[1], v.shape[-1]
        o = torch.empty(B, Tq, H, V, device=q.device, dtype=v.dtype)
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
        kend, kfull = _key_ranges(q_pos, k_pos, FWD_BLOCK_M)
        has_valid = k_valid is not None
        valid = k_valid.to(torch.int8).contiguous() if has_valid else q_pos
        grid = (triton.cdiv(Tq, FWD_BLOCK_M), B * H)
        _fwd_kernel[grid](
            q, k, v, o, lse, q_pos, k_pos, valid, kend, kfull,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], valid.stride(0) if has_valid else 0,
            H, Tq, S,
            DK=K, DV=V, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_V=max(16, triton.next_power_of_2(V)),
            BLOCK_M=FWD_BLOCK_M, BLOCK_N=FWD_BLOCK_N, HAS_VALID=has_valid, PREC=_prec(q.dtype),
        )
        ctx.save_for_backward(q, k, v, o, lse, q_pos, k_pos, valid)
        ctx.has_valid = has_valid
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_pos, k_pos, valid = ctx.saved_tensors
        B, Tq, H, K = q.shape
        S, V = k.shape[1], v.shape[-1]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Tq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(DK=K, DV=V, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_V=max(16, triton.next_power_of_2(V)),
                      HAS_VALID=ctx.has_valid, PREC=_prec(q.dtype))
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                   valid.stride(0) if ctx.has_valid else 0)
        qstart = _query_starts(q_pos, k_pos, DKDV_BLOCK_N)
        _bwd_dkdv_kernel[(triton.cdiv(S, DKDV_BLOCK_N), B * H)](
            q, k, v, do, dk, dv, lse, delta, q_pos, k_pos, valid, qstart, *strides, H, Tq, S,
            BLOCK_M=DKDV_BLOCK_M, BLOCK_N=DKDV_BLOCK_N, **common,
        )
        kend, _ = _key_ranges(q_pos, k_pos, DQ_BLOCK_M)
        _bwd_dq_kernel[(triton.cdiv(Tq, DQ_BLOCK_M), B * H)](
            q, k, v, do, dq, lse, delta, q_pos, k_pos, valid, kend, *strides, H, Tq, S,
            BLOCK_M=DQ_BLOCK_M, BLOCK_N=DQ_BLOCK_N, **common,
        )
        return dq, dk, dv, None, None, None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Whether the kernels take these shapes and dtypes, and why not."""
    K, V = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"dtype {q.dtype} is not supported"
    if not (k.dtype == q.dtype and v.dtype == q.dtype):
        return False, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (16 <= K <= 128 and 16 <= V <= 128):
        return False, f"head dims must lie in [16, 128], got K={K}, V={V}"
    return True, ""


def routed_attention_triton(
    q_BTqHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    *,
    q_pos_Tq: torch.Tensor,
    k_pos_S: torch.Tensor,
    scale_H: torch.Tensor,
    k_valid_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed attention on the GPU; differentiable in q, k, v and `scale_H`. Returns o_BTqHV in v's dtype."""
    dtype = q_BTqHK.dtype
    B, Tq, H, K = q_BTqHK.shape
    if Tq == 0:
        return v_BSHV.new_zeros(B, 0, H, v_BSHV.shape[-1])
    q = (q_BTqHK.float() * scale_H.float()[None, None, :, None]).to(dtype)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_BSHK.to(dtype), v_BSHV.to(dtype)))
    q_pos = q_pos_Tq.to(torch.int64).contiguous()
    k_pos = k_pos_S.to(torch.int64).contiguous()
    return _RoutedAttention.apply(q, k, v, q_pos, k_pos, k_valid_BS).to(v_BSHV.dtype)
