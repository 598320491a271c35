"""Routed causal softmax attention in Triton: forward and backward for the routed queries only.

Same contract as `naive.routed_attention`. Queries are the gathered routed tokens; each attends to
every retained key with `k_pos <= q_pos` (and `k_valid`, for a bounded cache with holes). Work and
memory follow the routed queries: a query block scans only the key blocks that some of its rows can
see, the backward walks only the query blocks that can see a key block, and nothing of size
T x T or (all tokens) x S is ever formed.

Legend: B batch, Tq routed queries, S retained keys, H heads, K key dim, V value dim.

Requirements: `q_pos` ascending along the routed queries and `k_pos` ascending along the cache, as
the model produces them; each program finds its key (or query) range by a binary search on the
device, so a call never waits on the host and launches one kernel per pass.

Long rows are split: when there are too few query blocks to fill the GPU, the key range of every
query block is cut into NSPLIT pieces run by separate programs (forward: partial outputs merged by
their log-sum-exp; dq: fp32 atomic adds), so the time is not set by the longest row alone.

Numerics: logits, softmax statistics and accumulators in fp32; `exp2` with log2(e) folded into the
logits; the per-head temperature multiplies q in fp32 inside the kernels and its gradient is
`sum(q * dq_scaled)`. A query that sees no key returns zeros (the reference returns NaN there).
"""

import os
from functools import cache

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MIN_SPLIT_KEYS = 1024  # below this many keys a split costs more than it balances


def _blocks(dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """(BLOCK_M, BLOCK_N) per kernel; fp32 tiles are smaller (4-byte operands, fp32 dot)."""
    if _INTERPRET:
        return dict(fwd=(16, 16), dkdv=(16, 16), dq=(16, 16))
    if dtype == torch.float32:
        return dict(fwd=(64, 32), dkdv=(32, 64), dq=(64, 32))
    return dict(fwd=(128, 64), dkdv=(32, 128), dq=(128, 32))


def _head_blocks(K: int, V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_V): head dims padded to powers of two, at least 16. In fp32 both take the
    larger of the two: with key and value blocks of different widths the fp32 dK/dV kernel faults
    when every token is routed (an illegal memory access on an H100, triton 3.6; seen at 16/32,
    16/64 and 32/16, never with equal widths or in bf16). Not yet traced to its cause."""
    bk, bv = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))
    return (max(bk, bv),) * 2 if dtype == torch.float32 else (bk, bv)


def _configs(warps: list[int], stages: list[int]) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


@triton.jit
def _count2(P, n_p, x0, x1, LOG_N, STRICT: tl.constexpr):
    """(#{j : P[j] <= x0}, #{j : P[j] <= x1}) over ascending P[0:n_p] (< instead of <= if STRICT)."""
    two = tl.arange(0, 2)
    x = tl.where(two == 0, x0, x1)
    lo = tl.zeros([2], dtype=tl.int32)
    hi = tl.zeros([2], dtype=tl.int32) + n_p
    for _ in range(LOG_N):
        active = lo < hi
        mid = (lo + hi) // 2
        p = tl.load(P + mid, mask=active, other=0)
        go = (p < x) if STRICT else (p <= x)
        lo = tl.where(active & go, mid + 1, lo)
        hi = tl.where(active & (go == 0), mid, hi)
    return tl.sum(tl.where(two == 0, lo, 0)), tl.sum(tl.where(two == 1, lo, 0))


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


@triton.jit
def _load_q(Q, SCALE, b, h, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, DK: tl.constexpr):
    q = tl.load(Q + b.to(tl.int64) * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qt + offs_k[None, :],
                mask=m_mask[:, None] & (offs_k[None, :] < DK), other=0.0)
    return (q.to(tl.float32) * tl.load(SCALE + h).to(tl.float32)).to(q.dtype)


@triton.jit
def _softmax_step(q, k, v, kpos, ok, qpos, m_i, l_i, acc, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
                  PREC: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * 1.4426950408889634
    if CAUSAL:
        qk = tl.where(ok[None, :] & (kpos[None, :] <= qpos[:, None]), qk, float("-inf"))
    elif HAS_VALID:
        qk = tl.where(ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.autotune(configs=_configs([4, 8], [3]), key=["BLOCK_K", "BLOCK_V", "HAS_VALID", "PREC", "SPLIT_OUT"])
@triton.jit
def _fwd_kernel(Q, Kc, Vc, O, LSE, OP, LP, SCALE, QPOS, KPOS, KVALID,
                s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh, s_valid_b,
                B, H, TQ, S, SPLIT, LOG_S,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                SPLIT_OUT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    m_mask = offs_m < TQ
    # keys visible to some row (kend) and to every row (kfull) of this block; positions ascend
    q_first = tl.load(QPOS + pid_m * BLOCK_M)
    q_last = tl.load(QPOS + tl.minimum(pid_m * BLOCK_M + BLOCK_M, TQ) - 1)
    kend, kfull = _count2(KPOS, S, q_last, q_first, LOG_S, False)
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, kend)
    n_full = tl.minimum((kfull // BLOCK_N) * BLOCK_N, hi)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    if lo < hi:
        q = _load_q(Q, SCALE, b, h, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, DK)
        qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
        Kp = Kc + b.to(tl.int64) * s_kb + h * s_kh
        Vp = Vc + b.to(tl.int64) * s_vb + h * s_vh
        # keys every row of this block can see: no causal mask
        for start_n in range(lo, n_full, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                        DK, DV, HAS_VALID)
            m_i, l_i, acc = _softmax_step(q, k, v, kpos, ok, qpos, m_i, l_i, acc, False, HAS_VALID, PREC)
        # keys near the diagonal: causal mask per row
        for start_n in range(tl.maximum(lo, n_full), hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                        DK, DV, HAS_VALID)
            m_i, l_i, acc = _softmax_step(q, k, v, kpos, ok, qpos, m_i, l_i, acc, True, HAS_VALID, PREC)

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SPLIT_OUT:
        # partial result of this key range: normalized output and its log2-sum-exp (-inf if empty)
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        row = (pid_s * B * H + pid_bh).to(tl.int64) * TQ + offs_m
        tl.store(OP + row[:, None] * BLOCK_V + offs_v[None, :], o, mask=m_mask[:, None])
        tl.store(LP + row, lse, mask=m_mask)
    else:
        tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ot + offs_v[None, :],
                 o.to(O.dtype.element_ty), mask=m_mask[:, None] & (offs_v[None, :] < DV))
        # log2-domain log-sum-exp; +inf for rows that see nothing, so the backward gives them p = 0
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=m_mask)


@triton.jit
def _combine_kernel(OP, LP, O, LSE, s_ob, s_ot, s_oh, B, H, TQ, NSPLIT,
                    DV: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_V)
    m_mask = offs_m < TQ
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, NSPLIT):
        lp = tl.load(LP + (s * B * H + pid_bh).to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("-inf"))
        m_i = tl.maximum(m_i, lp)
    seen = m_i > float("-inf")
    m_safe = tl.where(seen, m_i, 0.0)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for s in range(0, NSPLIT):
        row = (s * B * H + pid_bh).to(tl.int64) * TQ + offs_m
        w = tl.math.exp2(tl.load(LP + row, mask=m_mask, other=float("-inf")) - m_safe)
        acc += w[:, None] * tl.load(OP + row[:, None] * BLOCK_V + offs_v[None, :], mask=m_mask[:, None], other=0.0)
        l_i += w
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ot + offs_v[None, :],
             o.to(O.dtype.element_ty), mask=m_mask[:, None] & (offs_v[None, :] < DV))
    lse = tl.where(seen, m_safe + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=m_mask)


@triton.autotune(configs=_configs([4, 8], [2]), key=["BLOCK_K", "BLOCK_V", "HAS_VALID", "PREC"])
@triton.jit
def _bwd_dkdv_kernel(Q, Kc, Vc, DO, DK_, DV_, LSE, DELTA, SCALE, QPOS, KPOS, KVALID,
                     s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dot, s_doh, s_valid_b,
                     s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh, H, TQ, S, LOG_TQ,
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
    # the first routed query that can see a key of this block
    k_first = tl.load(KPOS + tl.minimum(pid_n * BLOCK_N, S - 1))
    q_lo, _ = _count2(QPOS, TQ, k_first, k_first, LOG_TQ, True)
    q_lo = (q_lo // BLOCK_M) * BLOCK_M
    DOp = DO + b.to(tl.int64) * s_dob + h * s_doh
    for start_m in range(q_lo, TQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < TQ
        q = _load_q(Q, SCALE, b, h, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, DK)
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
    # dk, dv have their own (contiguous) strides: k and v may be views with gaps (a slice of a cache)
    tl.store(DK_ + b.to(tl.int64) * s_dkb + h * s_dkh + offs_n[:, None].to(tl.int64) * s_dks + offs_k[None, :],
             dk.to(DK_.dtype.element_ty), mask=n_mask[:, None] & (offs_k[None, :] < DK))
    tl.store(DV_ + b.to(tl.int64) * s_dvb + h * s_dvh + offs_n[:, None].to(tl.int64) * s_dvs + offs_v[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_mask[:, None] & (offs_v[None, :] < DV))


@triton.autotune(configs=_configs([4, 8], [2]), key=["BLOCK_K", "BLOCK_V", "HAS_VALID", "PREC", "ATOMIC"],
                 reset_to_zero=["DQ"])
@triton.jit
def _bwd_dq_kernel(Q, Kc, Vc, DO, DQ, LSE, DELTA, SCALE, QPOS, KPOS, KVALID,
                   s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dot, s_doh, s_valid_b,
                   H, TQ, S, SPLIT, LOG_S,
                   DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                   ATOMIC: tl.constexpr):
    """dq with respect to the temperature-scaled q, accumulated in fp32 (atomically when key ranges are split)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    m_mask = offs_m < TQ
    q_last = tl.load(QPOS + tl.minimum(pid_m * BLOCK_M + BLOCK_M, TQ) - 1)
    kend, _ = _count2(KPOS, S, q_last, q_last, LOG_S, False)
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, kend)
    if lo < hi:
        q = _load_q(Q, SCALE, b, h, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, DK)
        do = tl.load(DO + b.to(tl.int64) * s_dob + h * s_doh + offs_m[:, None].to(tl.int64) * s_dot + offs_v[None, :],
                     mask=m_mask[:, None] & (offs_v[None, :] < DV), other=0.0)
        qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
        Kp = Kc + b.to(tl.int64) * s_kb + h * s_kh
        Vp = Vc + b.to(tl.int64) * s_vb + h * s_vh
        dq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                        DK, DV, HAS_VALID)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * 1.4426950408889634
            visible = ok[None, :] & (kpos[None, :] <= qpos[:, None])
            p = tl.where(visible, tl.math.exp2(qk - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        p_dq = DQ + ((b * TQ).to(tl.int64) + offs_m[:, None]) * (H * DK) + h * DK + offs_k[None, :]
        dq_mask = m_mask[:, None] & (offs_k[None, :] < DK)
        if ATOMIC:
            tl.atomic_add(p_dq, dq, mask=dq_mask, sem="relaxed")
        else:
            tl.store(p_dq, dq, mask=dq_mask)


def _prec(dtype: torch.dtype) -> str:
    # fp32 operands: three tf32 products (near-fp32 accuracy on the tensor cores); "ieee" would
    # lower to scalar FMAs that take minutes to compile at these tile sizes
    return "tf32x3" if dtype == torch.float32 else "tf32"


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_split(n_programs: int, S: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """How many pieces to cut each key range into so the grid fills the GPU; returns (NSPLIT, keys per piece)."""
    sms = 4 if _INTERPRET else _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    n = max(1, min(triton.cdiv(S, _MIN_SPLIT_KEYS), triton.cdiv(8 * sms, n_programs)))
    if _INTERPRET:
        n = max(1, min(triton.cdiv(S, 32), 3))  # exercise the split path on small inputs
    piece = triton.cdiv(triton.cdiv(S, n), block_n) * block_n
    return triton.cdiv(S, piece), piece


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, q_pos, k_pos, k_valid):
        B, Tq, H, K = q.shape
        S, V = k.shape[1], v.shape[-1]
        BM, BN = _blocks(q.dtype)["fwd"]
        BLOCK_K, BLOCK_V = _head_blocks(K, V, q.dtype)
        o = torch.empty(B, Tq, H, V, device=q.device, dtype=v.dtype)
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
        n_mblocks = triton.cdiv(Tq, BM)
        has_valid = k_valid is not None
        valid = k_valid.to(torch.int8).contiguous() if has_valid else q_pos
        nsplit, piece = _n_split(n_mblocks * B * H, S, BN, q.device)
        if nsplit > 1:
            op = torch.empty(nsplit, B, H, Tq, BLOCK_V, device=q.device, dtype=torch.float32)
            lp = torch.empty(nsplit, B, H, Tq, device=q.device, dtype=torch.float32)
        else:
            op, lp = lse, lse
        _fwd_kernel[(n_mblocks, nsplit, B * H)](
            q, k, v, o, lse, op, lp, scale, q_pos, k_pos, valid,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], valid.stride(0) if has_valid else 0,
            B, H, Tq, S, piece, S.bit_length(),
            DK=K, DV=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_M=BM, BLOCK_N=BN, HAS_VALID=has_valid,
            PREC=_prec(q.dtype), SPLIT_OUT=nsplit > 1,
        )
        if nsplit > 1:
            _combine_kernel[(triton.cdiv(Tq, 64), B * H)](
                op, lp, o, lse, *o.stride()[:3], B, H, Tq, nsplit, DV=V, BLOCK_V=BLOCK_V, BLOCK_M=64,
            )
        ctx.save_for_backward(q, k, v, scale, o, lse, q_pos, k_pos, valid)
        ctx.has_valid = has_valid
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, scale, o, lse, q_pos, k_pos, valid = ctx.saved_tensors
        B, Tq, H, K = q.shape
        S, V = k.shape[1], v.shape[-1]
        blocks = _blocks(q.dtype)
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Tq]
        # contiguous gradients, written with their own strides (empty_like would keep k's layout only when it is dense)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        BLOCK_K, BLOCK_V = _head_blocks(K, V, q.dtype)
        common = dict(DK=K, DV=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, HAS_VALID=ctx.has_valid, PREC=_prec(q.dtype))
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                   valid.stride(0) if ctx.has_valid else 0)
        BM, BN = blocks["dkdv"]
        n_nblocks = triton.cdiv(S, BN)
        _bwd_dkdv_kernel[(n_nblocks, B * H)](
            q, k, v, do, dk, dv, lse, delta, scale, q_pos, k_pos, valid, *strides, *dk.stride()[:3], *dv.stride()[:3],
            H, Tq, S, Tq.bit_length(),
            BLOCK_M=BM, BLOCK_N=BN, **common,
        )
        BM, BN = blocks["dq"]
        n_mblocks = triton.cdiv(Tq, BM)
        nsplit, piece = _n_split(n_mblocks * B * H, S, BN, q.device)
        dq_s = torch.zeros(B, Tq, H, K, device=q.device, dtype=torch.float32)
        _bwd_dq_kernel[(n_mblocks, nsplit, B * H)](
            q, k, v, do, dq_s, lse, delta, scale, q_pos, k_pos, valid, *strides, H, Tq, S, piece, S.bit_length(),
            BLOCK_M=BM, BLOCK_N=BN, ATOMIC=nsplit > 1, **common,
        )
        dscale = (q.float() * dq_s).sum((0, 1, 3)).to(scale.dtype) if ctx.needs_input_grad[3] else None
        dq = (dq_s * scale.float()[None, None, :, None]).to(q.dtype)
        return dq, dk, dv, dscale, None, None, None


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
    """Routed attention on the GPU; differentiable in q, k, v and `scale_H`. Returns o_BTqHV in v's dtype.

    `q_pos_Tq` and `k_pos_S` must be ascending (see the module docstring).
    """
    dtype = q_BTqHK.dtype
    B, Tq, H, K = q_BTqHK.shape
    if Tq == 0:
        return v_BSHV.new_zeros(B, 0, H, v_BSHV.shape[-1])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BTqHK, k_BSHK.to(dtype), v_BSHV.to(dtype)))
    q_pos = q_pos_Tq.to(torch.int64).contiguous()
    k_pos = k_pos_S.to(torch.int64).contiguous()
    return _RoutedAttention.apply(q, k, v, scale_H, q_pos, k_pos, k_valid_BS).to(v_BSHV.dtype)
