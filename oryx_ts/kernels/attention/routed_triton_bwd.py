"""Backward kernels of routed attention (see `routed_triton` for the passes, numerics and launch choices)."""

import triton
import triton.language as tl

from oryx_ts.kernels.attention.routed_common import _count2, _last_piece, _load_keys, _rows


@triton.jit
def _dq_step(q, do, k, v, kpos, ok, qpos, lse, delta, dq, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
             PREC: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    if CAUSAL:
        p = tl.where(ok[None, :] & (kpos[None, :] <= qpos[:, None]), tl.math.exp2(qk - lse[:, None]), 0.0)
    elif HAS_VALID:
        p = tl.where(ok[None, :], tl.math.exp2(qk - lse[:, None]), 0.0)
    else:  # padded rows have lse = +inf, so p = 0 there
        p = tl.math.exp2(qk - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _store_dq(DQ, DSP, SCALE, Q, dq, b, h, pid_m, pid_bh, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, B, H, TQ,
              DK: tl.constexpr, NEED_DSCALE: tl.constexpr):
    """dq = dq_scaled * temperature in q's dtype; this block's share of dscale, sum(q * dq_scaled)."""
    mask = m_mask[:, None] & (offs_k[None, :] < DK)
    scale = tl.load(SCALE + h).to(tl.float32)
    tl.store(DQ + ((b * TQ).to(tl.int64) + offs_m[:, None]) * (H * DK) + h * DK + offs_k[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask)
    if NEED_DSCALE:
        q = _rows(Q, b, h, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, DK).to(tl.float32)
        tl.store(DSP + pid_m * B * H + pid_bh, tl.sum(tl.sum(q * dq, 1), 0))


@triton.jit
def _bwd_dq_kernel(QS, Q, Kc, Vc, O, DO, DQ, DQP, DSP, SCALE, LSE, DELTA, QPOS, KPOS, KVALID, CNT,
                   s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh, s_dob, s_dot, s_doh, s_valid_b,
                   B, H, TQ, S, SPLIT, LEVELS_S,
                   DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                   NEED_DSCALE: tl.constexpr, REVERSE_M: tl.constexpr, FAN: tl.constexpr):
    """dq of one key piece (with respect to the temperature-scaled q); the block's last piece sums the
    pieces' fp32 partials DQP and writes dq; the first piece writes delta of the rows."""
    n_mb = tl.num_programs(0)
    pid_m = tl.program_id(0)
    if REVERSE_M:
        pid_m = n_mb - 1 - pid_m
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    m_mask = offs_m < TQ
    q_first = tl.load(QPOS + pid_m * BLOCK_M)
    q_last = tl.load(QPOS + tl.minimum(pid_m * BLOCK_M + BLOCK_M, TQ) - 1)
    kend, kfull = _count2(KPOS, S, q_last, q_first, LEVELS_S, False, FAN)
    n_act = tl.maximum((kend + SPLIT - 1) // SPLIT, 1)
    if pid_s < n_act:
        lo = pid_s * SPLIT
        hi = tl.minimum(lo + SPLIT, kend)
        n_full = tl.minimum((kfull // BLOCK_N) * BLOCK_N, hi)
        do = _rows(DO, b, h, offs_m, offs_v, m_mask, s_dob, s_dot, s_doh, DV)
        o = _rows(O, b, h, offs_m, offs_v, m_mask, s_ob, s_ot, s_oh, DV)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if pid_s == 0:
            tl.store(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, delta, mask=m_mask)
        dq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        if lo < hi:
            q = _rows(QS, b, h, offs_m, offs_k, m_mask, TQ * H * DK, H * DK, DK, DK)
            qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
            lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
            Kp = Kc + b.to(tl.int64) * s_kb + h * s_kh
            Vp = Vc + b.to(tl.int64) * s_vb + h * s_vh
            for start_n in range(lo, n_full, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                            DK, DV, HAS_VALID)
                dq = _dq_step(q, do, k, v, kpos, ok, qpos, lse, delta, dq, False, HAS_VALID, PREC)
            for start_n in range(tl.maximum(lo, n_full), hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                            DK, DV, HAS_VALID)
                dq = _dq_step(q, do, k, v, kpos, ok, qpos, lse, delta, dq, True, HAS_VALID, PREC)
        if n_act == 1:
            _store_dq(DQ, DSP, SCALE, Q, dq, b, h, pid_m, pid_bh, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, B, H, TQ,
                      DK, NEED_DSCALE)
        else:
            mask = m_mask[:, None] & (offs_k[None, :] < DK)
            p_dq = DQP + ((b * TQ).to(tl.int64) + offs_m[:, None]) * (H * DK) + h * DK + offs_k[None, :]
            piece = (B * TQ * H).to(tl.int64) * DK  # elements per piece of DQP [NSPLIT, B, Tq, H, K]
            tl.store(p_dq + pid_s.to(tl.int64) * piece, dq, mask=mask)
            if _last_piece(CNT, pid_bh * n_mb + pid_m, n_act):
                total = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                for s in range(0, n_act):  # in piece order, whichever program came last
                    part = tl.load(p_dq + s * piece, mask=mask, other=0.0, cache_modifier=".cg")
                    total += tl.where(s == pid_s, dq, part)
                _store_dq(DQ, DSP, SCALE, Q, total, b, h, pid_m, pid_bh, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh,
                          B, H, TQ, DK, NEED_DSCALE)


@triton.jit
def _dkdv_step(qs, do, k, v, kpos, ok, qpos, lse, delta, dk, dv, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
               PREC: tl.constexpr):
    qkT = tl.dot(k, tl.trans(qs), input_precision=PREC)
    if CAUSAL:
        pT = tl.where(ok[:, None] & (kpos[:, None] <= qpos[None, :]), tl.math.exp2(qkT - lse[None, :]), 0.0)
    elif HAS_VALID:
        pT = tl.where(ok[:, None], tl.math.exp2(qkT - lse[None, :]), 0.0)
    else:  # padded query columns have lse = +inf; padded key rows are never stored
        pT = tl.math.exp2(qkT - lse[None, :])
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(qs.dtype), qs, input_precision=PREC)
    return dk, dv, dsT


@triton.jit
def _add_dq(DQA, dsT, k, b, h, offs_m, offs_k, m_mask, H, TQ, DK: tl.constexpr, PREC: tl.constexpr):
    """The fused mode's share of dq (with respect to the scaled q) from one (key block, query block) pair, added
    atomically into the fp32 buffer DQA [B, Tq, H, K]."""
    dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC)
    tl.atomic_add(DQA + ((b * TQ).to(tl.int64) + offs_m[:, None]) * (H * DK) + h * DK + offs_k[None, :], dq,
                  mask=m_mask[:, None] & (offs_k[None, :] < DK), sem="relaxed")


@triton.jit
def _bwd_dkdv_kernel(QS, Kc, Vc, DO, DK_, DV_, DQA, LSE, DELTA, QPOS, KPOS, KVALID,
                     s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dot, s_doh, s_valid_b,
                     s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh, H, TQ, S, LEVELS_TQ,
                     DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                     FAN: tl.constexpr, FUSE_DQ: tl.constexpr):
    """dk, dv of one key block over the query blocks that see it; with FUSE_DQ also each pair's share of dq."""
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
    # routed queries before the block's first key see none of it; from q_full on they see all of it
    k_first = tl.load(KPOS + pid_n * BLOCK_N)
    k_last = tl.load(KPOS + tl.minimum(pid_n * BLOCK_N + BLOCK_N, S) - 1)
    q_lo, q_full = _count2(QPOS, TQ, k_first, k_last, LEVELS_TQ, True, FAN)
    q_lo = (q_lo // BLOCK_M) * BLOCK_M
    q_mid = ((q_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    DOp = DO + b.to(tl.int64) * s_dob + h * s_doh
    QSp = QS + b.to(tl.int64) * TQ * H * DK + h * DK
    for start_m in range(q_lo, q_mid, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < TQ
        qs = tl.load(QSp + offs_m[:, None].to(tl.int64) * (H * DK) + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k[None, :] < DK), other=0.0)
        do = tl.load(DOp + offs_m[:, None].to(tl.int64) * s_dot + offs_v[None, :],
                     mask=m_mask[:, None] & (offs_v[None, :] < DV), other=0.0)
        qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
        dk, dv, dsT = _dkdv_step(qs, do, k, v, kpos, ok, qpos, lse, delta, dk, dv, True, HAS_VALID, PREC)
        if FUSE_DQ:
            _add_dq(DQA, dsT, k, b, h, offs_m, offs_k, m_mask, H, TQ, DK, PREC)
    for start_m in range(q_mid, TQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < TQ
        qs = tl.load(QSp + offs_m[:, None].to(tl.int64) * (H * DK) + offs_k[None, :],
                     mask=m_mask[:, None] & (offs_k[None, :] < DK), other=0.0)
        do = tl.load(DOp + offs_m[:, None].to(tl.int64) * s_dot + offs_v[None, :],
                     mask=m_mask[:, None] & (offs_v[None, :] < DV), other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
        dk, dv, dsT = _dkdv_step(qs, do, k, v, kpos, ok, kpos, lse, delta, dk, dv, False, HAS_VALID, PREC)
        if FUSE_DQ:
            _add_dq(DQA, dsT, k, b, h, offs_m, offs_k, m_mask, H, TQ, DK, PREC)
    n_mask = offs_n < S
    dk = dk * 0.6931471805599453  # qs carries log2(e)
    # dk, dv have their own (contiguous) strides: k and v may be views with gaps (a slice of a cache)
    tl.store(DK_ + b.to(tl.int64) * s_dkb + h * s_dkh + offs_n[:, None].to(tl.int64) * s_dks + offs_k[None, :],
             dk.to(DK_.dtype.element_ty), mask=n_mask[:, None] & (offs_k[None, :] < DK))
    tl.store(DV_ + b.to(tl.int64) * s_dvb + h * s_dvh + offs_n[:, None].to(tl.int64) * s_dvs + offs_v[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_mask[:, None] & (offs_v[None, :] < DV))
