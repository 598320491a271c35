"""Triton device functions shared by the routed-attention passes (`routed_triton`, `routed_triton_bwd`):
the on-device search of a key or query range, tile loads, the last-piece counter of split reductions."""

import triton
import triton.language as tl


@triton.jit
def _count2(P, n_p, x0, x1, LEVELS, STRICT: tl.constexpr, FAN: tl.constexpr):
    """(#{j : P[j] <= x0}, #{j : P[j] <= x1}) over ascending P[0:n_p] (< instead of <= if STRICT).

    Each level samples FAN evenly spaced entries of the window that holds the answer and narrows it
    to the gap between two samples; FAN**LEVELS >= n_p leaves a window of width zero."""
    two = tl.arange(0, 2)[:, None]
    i = tl.arange(0, FAN)[None, :]
    x = tl.where(two == 0, x0, x1)
    lo = tl.zeros([2, 1], dtype=tl.int32)
    width = tl.zeros([2, 1], dtype=tl.int32) + n_p  # the answer lies in [lo, lo + width]
    for _ in range(LEVELS):
        step = (width + FAN - 1) // FAN
        inside = i * step < width
        p = tl.load(P + lo + i * step, mask=inside, other=0)
        below = inside & ((p < x) if STRICT else (p <= x))
        m = tl.sum(below.to(tl.int32), 1)[:, None]
        new_lo = tl.where(m > 0, lo + (m - 1) * step + 1, lo)
        width = tl.minimum(lo + m * step, lo + width) - new_lo
        lo = new_lo
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
def _rows(P, b, h, offs_m, offs_x, m_mask, s_b, s_t, s_h, DX: tl.constexpr):
    """A [BLOCK_M, BLOCK_X] tile of a [B, Tq, H, X] tensor (zeros outside)."""
    return tl.load(P + b.to(tl.int64) * s_b + h * s_h + offs_m[:, None].to(tl.int64) * s_t + offs_x[None, :],
                   mask=m_mask[:, None] & (offs_x[None, :] < DX), other=0.0)



@triton.jit
def _last_piece(CNT, cidx, n_act):
    """Whether this program is the last of its block's n_act pieces to finish (after its partials are stored);
    the last one resets the block's counter for the next call."""
    tl.debug_barrier()  # every thread's partial stores precede the release below
    last = tl.atomic_add(CNT + cidx, 1, sem="acq_rel", scope="gpu") == n_act - 1
    if last:
        tl.store(CNT + cidx, 0)
    return last
