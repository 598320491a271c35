"""Fused streaming step in Triton: one token per series through a layer's mixers, for many series.

One program per (series, head) holds that head's recurrent state in registers and, in one launch:
advances the state (Gated DeltaNet or Mamba-2 SSD) and reads it out; writes the token's key and
value into its cache slot; and, only for series routed to attention this step, attends over the
retained cache plus the new key. The output is `m * o_att + (1 - m) * o_lin`. Every input is a
device tensor (routing bits, slots, lengths), so the step never waits on the host and can be
captured in a CUDA graph. The state and the cache are updated in place: they are the preallocated
buffers of the streaming state.

Legend: B series, H heads, K key dim, V value dim, S cache slots.
"""

import torch
import triton
import triton.language as tl

_GDN, _SSD = 0, 1


@triton.jit
def _fused_step_kernel(Q, Kn, Vn, G, BETA, STATE, O,
                       QA, KA, KC, VC, SLOT, LEN, ROUTE, SCALE_H,
                       s_q, s_k, s_v, s_kcb, s_kcs, s_vcb, s_vcs,
                       H, S, scale,
                       K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_N: tl.constexpr, MIXER: tl.constexpr, HAS_ATT: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mk = offs_k < K
    mv = offs_v < V
    row = b.to(tl.int64) * H + h
    q = tl.load(Q + b.to(tl.int64) * s_q + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(Kn + b.to(tl.int64) * s_k + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(Vn + b.to(tl.int64) * s_v + h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(G + row).to(tl.float32))
    p_state = STATE + row * (K * V) + offs_k[:, None] * V + offs_v[None, :]
    m_kv = mk[:, None] & mv[None, :]
    st = tl.load(p_state, mask=m_kv, other=0.0) * decay
    if MIXER == 0:  # Gated DeltaNet: S <- g S + beta k (v - k^T g S)^T
        beta = tl.load(BETA + row).to(tl.float32)
        delta = beta * (v - tl.sum(k[:, None] * st, 0))
        st = st + k[:, None] * delta[None, :]
    else:  # SSD: S <- g S + k v^T
        st = st + k[:, None] * v[None, :]
    tl.store(p_state, st, mask=m_kv)
    o = tl.sum(q[:, None] * st, 0) * scale

    if HAS_ATT:
        slot = tl.load(SLOT + b)
        n_keys = tl.load(LEN + b)
        # the new key lives in registers; the slot it is written to is skipped when reading the cache
        p_kc = KC + b.to(tl.int64) * s_kcb + h * K
        p_vc = VC + b.to(tl.int64) * s_vcb + h * V
        ka = tl.load(KA + b.to(tl.int64) * s_k + h * K + offs_k, mask=mk, other=0.0)
        tl.store(p_kc + slot.to(tl.int64) * s_kcs + offs_k, ka.to(KC.dtype.element_ty), mask=mk)
        tl.store(p_vc + slot.to(tl.int64) * s_vcs + offs_v, v.to(VC.dtype.element_ty), mask=mv)
        route = tl.load(ROUTE + b).to(tl.float32)
        if route != 0.0:
            qa = tl.load(QA + b.to(tl.int64) * s_q + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
            qa = qa * tl.load(SCALE_H + h).to(tl.float32) * 1.4426950408889634
            k_new = ka.to(KC.dtype.element_ty).to(tl.float32)  # as the cache will hold it
            v_new = v.to(VC.dtype.element_ty).to(tl.float32)
            m_i = tl.sum(qa * k_new, 0)
            l_i = m_i * 0.0 + 1.0
            acc = v_new
            for start in range(0, n_keys, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                ok = (offs_n < n_keys) & (offs_n != slot)
                kb = tl.load(p_kc + offs_n[:, None].to(tl.int64) * s_kcs + offs_k[None, :],
                             mask=ok[:, None] & mk[None, :], other=0.0).to(tl.float32)
                s = tl.where(ok, tl.sum(kb * qa[None, :], 1), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                p = tl.math.exp2(s - m_new)
                alpha = tl.math.exp2(m_i - m_new)
                vb = tl.load(p_vc + offs_n[:, None].to(tl.int64) * s_vcs + offs_v[None, :],
                             mask=ok[:, None] & mv[None, :], other=0.0).to(tl.float32)
                l_i = l_i * alpha + tl.sum(p, 0)
                acc = acc * alpha + tl.sum(p[:, None] * vb, 0)
                m_i = m_new
            o = route * (acc / l_i) + (1.0 - route) * o
    tl.store(O + row * V + offs_v, o.to(O.dtype.element_ty), mask=mv)


def _launch(mixer, q, k, v, g, beta, state, o, att, scale):
    B, H, K = q.shape
    V = v.shape[-1]
    assert state.is_contiguous() and state.dtype == torch.float32 and state.shape == (B, H, K, V)
    for t in (q, k, v):
        assert t.stride(-1) == 1 and t.stride(-2) == t.shape[-1], "heads of one series must be contiguous"
    g = g.contiguous()
    beta = g if beta is None else beta.contiguous()
    if att is None:
        qa, ka, kc, vc, slot, length, route, scale_h = q, q, q, q, g, g, g, g
        s_kc, s_vc = (0, 0), (0, 0)
    else:
        qa, ka, kc, vc, slot, length, route, scale_h = att
        assert qa.stride() == q.stride() and ka.stride() == k.stride(), "q_att, k_att must be laid out like q, k"
        assert kc.stride(-1) == 1 and kc.stride(-2) == K and vc.stride(-1) == 1 and vc.stride(-2) == V
        s_kc, s_vc = (kc.stride(0), kc.stride(1)), (vc.stride(0), vc.stride(1))
    n_slots = 0 if att is None else kc.shape[1]
    BLOCK_K, BLOCK_V = triton.next_power_of_2(K), triton.next_power_of_2(V)
    _fused_step_kernel[(B * H,)](
        q, k, v, g, beta, state, o, qa, ka, kc, vc, slot, length, route, scale_h,
        q.stride(0), k.stride(0), v.stride(0), *s_kc, *s_vc,
        H, n_slots, scale,
        K=K, V=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_N=64,
        MIXER=_GDN if mixer == "gdn" else _SSD, HAS_ATT=att is not None,
        num_warps=4 if BLOCK_K * BLOCK_V <= 4096 else 8,
    )
    return o


def recurrent_step_triton(
    mixer: str,
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor | None,
    state_BHKV: torch.Tensor,
    *,
    scale: float | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the linear mixer for every series; same contract as `gdn_step` / `ssd_step`.

    Returns `(o_BHV, new_state_BHKV fp32)`. With `in_place` the fp32 contiguous input state is
    overwritten and returned; otherwise it is left untouched.
    """
    K = q_BHK.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if in_place:
        state = state_BHKV
    else:
        state = state_BHKV.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    o = torch.empty_like(v_BHV)
    q, k, v = (t.contiguous() for t in (q_BHK, k_BHK, v_BHV))
    _launch(mixer, q, k, v, g_BH, beta_BH, state, o, None, scale)
    return o, state


def fused_layer_step(
    mixer: str,
    q_lin_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor | None,
    state_BHKV: torch.Tensor,
    *,
    q_att_BHK: torch.Tensor,
    k_att_BHK: torch.Tensor | None = None,
    k_cache_BSHK: torch.Tensor,
    v_cache_BSHV: torch.Tensor,
    slot_B: torch.Tensor,
    len_B: torch.Tensor,
    route_B: torch.Tensor,
    scale_H: torch.Tensor,
    scale: float | None = None,
    out_BHV: torch.Tensor | None = None,
) -> torch.Tensor:
    """One streaming step of a layer's mixers for B series, in one launch; state and cache in place.

    Args:
        q_lin_BHK, k_BHK, v_BHV, g_BH, beta_BH: the token's recurrent inputs (beta None for mamba2).
        state_BHKV: fp32 contiguous recurrent state, advanced in place.
        q_att_BHK: attention query (RoPE and L2 norm applied), laid out like q_lin.
        k_att_BHK: the key as the cache stores it (RoPE applied); defaults to `k_BHK`.
        k_cache_BSHK, v_cache_BSHV: the cache; the token's key and value are written at `slot_B`.
        slot_B: int64 cache slot each series writes (for a bounded cache, the evicted slot).
        len_B: int64 number of leading slots holding retained tokens before this step.
        route_B: per-series mode in [0, 1]; attention is computed only where it is nonzero.
        scale_H: per-head attention logit scale.

    Returns:
        o_BHV (written into `out_BHV` when given).
    """
    K = q_lin_BHK.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, qa = (t.contiguous() for t in (q_lin_BHK, k_BHK, v_BHV, q_att_BHK))
    ka = k if k_att_BHK is None else k_att_BHK.contiguous()
    o = torch.empty_like(v) if out_BHV is None else out_BHV
    att = (qa, ka, k_cache_BSHK, v_cache_BSHV, slot_B.contiguous(), len_B.contiguous(), route_B.contiguous(),
           scale_H.contiguous())
    return _launch(mixer, q, k, v, g_BH, beta_BH, state_BHKV, o, att, scale)
