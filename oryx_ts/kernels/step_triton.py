"""Fused streaming step in Triton: one token per series through a layer's mixers, for many series.

One program per (series, head) holds that head's recurrent state in registers and, in one launch:
advances the state (Gated DeltaNet or Mamba-2 SSD) and reads it out; applies the step's slot plan
to the KV cache (moves a leaving attention-mode token to its pinned slot, writes the new key and
value); and, only for series whose mode is nonzero this step, attends over the retained slots plus
the new key. The output is the attention output where the mode is 1, else
`m * o_att + (1 - m) * o_lin`. Every input is a device tensor (modes, slots, slot mask), so the
step never waits on the host and can be captured in a CUDA graph. The state and the cache are
updated in place: they are the preallocated buffers of the streaming state.

`naive_layer_step` (`kernels/step_naive.py`) is the pure-torch twin with the same signature.

Legend: B series, H heads, K key dim, V value dim, S cache slots.
"""

import torch
import triton
import triton.language as tl

_GDN, _SSD = 0, 1


@triton.jit
def _step_kernel(Q, Kn, Vn, G, GATE, DSKIP, STATE, O,
                 QA, KA, KC, VC, WSLOT, PIN, PSLOT, VALID, LEN, ROUTE, SCALE_H,
                 s_q, s_k, s_v, s_qa, s_ka, s_kcb, s_kcs, s_vcb, s_vcs, s_valid,
                 H, S, scale,
                 K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_N: tl.constexpr, MIXER: tl.constexpr, HAS_DT: tl.constexpr, HAS_D: tl.constexpr,
                 HAS_ATT: tl.constexpr, HAS_PIN: tl.constexpr, HAS_LEN: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mk = offs_k < K
    mv = offs_v < V
    row = b * H + h
    q = tl.load(Q + b * s_q + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(Kn + b * s_k + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(Vn + b * s_v + h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(G + row).to(tl.float32))
    p_state = STATE + row * (K * V) + offs_k[:, None] * V + offs_v[None, :]
    m_kv = mk[:, None] & mv[None, :]
    st = tl.load(p_state, mask=m_kv, other=0.0) * decay
    if MIXER == 0:  # Gated DeltaNet: S <- g S + beta k (v - k^T g S)^T; GATE is beta
        beta = tl.load(GATE + row).to(tl.float32)
        delta = beta * (v - tl.sum(k[:, None] * st, 0))
        st = st + k[:, None] * delta[None, :]
    else:  # SSD: S <- g S + k (dt v)^T; GATE is dt when HAS_DT, else v comes scaled
        v_in = v
        if HAS_DT:
            v_in = v * tl.load(GATE + row).to(tl.float32)
        st = st + k[:, None] * v_in[None, :]
    tl.store(p_state, st, mask=m_kv)
    o = tl.sum(q[:, None] * st, 0) * scale
    if HAS_D:  # Mamba-2's skip connection on the unscaled value
        o = o + tl.load(DSKIP + h).to(tl.float32) * v

    if HAS_ATT:
        wslot = tl.load(WSLOT + b).to(tl.int64)
        p_kc = KC + b * s_kcb + h * K
        p_vc = VC + b * s_vcb + h * V
        ka = tl.load(KA + b * s_ka + h * K + offs_k, mask=mk, other=0.0)
        k_new = ka.to(KC.dtype.element_ty)  # as the cache will hold them
        v_new = v.to(VC.dtype.element_ty)
        if HAS_PIN:
            # the token leaving the recent window moves to its pinned slot; it stays in registers,
            # so neither slot this program writes is read back from memory
            pin = tl.load(PIN + b) != 0
            pslot = tl.load(PSLOT + b).to(tl.int64)
            k_old = tl.load(p_kc + wslot * s_kcs + offs_k, mask=mk, other=0.0)
            v_old = tl.load(p_vc + wslot * s_vcs + offs_v, mask=mv, other=0.0)
            tl.store(p_kc + pslot * s_kcs + offs_k, k_old, mask=mk & pin)
            tl.store(p_vc + pslot * s_vcs + offs_v, v_old, mask=mv & pin)
            skip_p = tl.where(pin, pslot, -1)  # the moved token is read from registers, not its slot
        tl.store(p_kc + wslot * s_kcs + offs_k, k_new, mask=mk)
        tl.store(p_vc + wslot * s_vcs + offs_v, v_new, mask=mv)
        route = tl.load(ROUTE + b).to(tl.float32)
        if route != 0.0:
            qa = tl.load(QA + b * s_qa + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
            qa = qa * tl.load(SCALE_H + h).to(tl.float32) * 1.4426950408889634
            m_i = tl.sum(qa * k_new.to(tl.float32), 0)
            l_i = m_i * 0.0 + 1.0
            acc = v_new.to(tl.float32)
            if HAS_PIN:
                s_p = tl.where(pin, tl.sum(qa * k_old.to(tl.float32), 0), float("-inf"))
                m_p = tl.maximum(m_i, s_p)
                a_p = tl.math.exp2(m_i - m_p)
                e_p = tl.math.exp2(s_p - m_p)
                l_i = l_i * a_p + e_p
                acc = acc * a_p + e_p * v_old.to(tl.float32)
                m_i = m_p
            n_keys = S
            if HAS_LEN:
                n_keys = tl.load(LEN + b)
            for start in range(0, n_keys, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                inside = offs_n < n_keys
                ok = inside & (offs_n != wslot)
                ok = ok & (tl.load(VALID + b * s_valid + offs_n, mask=inside, other=0) != 0)
                if HAS_PIN:
                    ok = ok & (offs_n != skip_p)
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
            att = acc / l_i
            o = tl.where(route == 1.0, att, route * att + (1.0 - route) * o)
    tl.store(O + row * V + offs_v, o.to(O.dtype.element_ty), mask=mv)


def _heads_contiguous(t: torch.Tensor) -> torch.Tensor:
    """(B, H, X) with the heads of one series contiguous (any series stride); copies only if needed."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


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
    B, H, K = q_BHK.shape
    V = v_BHV.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if in_place:
        state = state_BHKV
    else:
        state = state_BHKV.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    assert state.is_contiguous() and state.dtype == torch.float32 and state.shape == (B, H, K, V)
    q, k, v = (_heads_contiguous(t) for t in (q_BHK, k_BHK, v_BHV))
    o = torch.empty(B, H, V, device=v.device, dtype=v.dtype)
    g = g_BH.contiguous()
    gate = g if beta_BH is None else beta_BH.contiguous()
    BLOCK_K, BLOCK_V = triton.next_power_of_2(K), triton.next_power_of_2(V)
    _step_kernel[(B * H,)](
        q, k, v, g, gate, g, state, o,
        q, k, q, q, g, g, g, g, g, g, g,
        q.stride(0), k.stride(0), v.stride(0), 0, 0, 0, 0, 0, 0, 0,
        H, 0, scale,
        K=K, V=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_N=64,
        MIXER=_GDN if mixer == "gdn" else _SSD, HAS_DT=False, HAS_D=False,
        HAS_ATT=False, HAS_PIN=False, HAS_LEN=False,
        num_warps=4 if BLOCK_K * BLOCK_V <= 4096 else 8,
    )
    return o, state


def fused_layer_step(
    mixer: str,
    q_lin_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    gate_BH: torch.Tensor,
    state_BHKV: torch.Tensor,
    *,
    q_att_BHK: torch.Tensor,
    k_att_BHK: torch.Tensor,
    k_cache_BSHK: torch.Tensor,
    v_cache_BSHV: torch.Tensor,
    write_slot_B: torch.Tensor,
    valid_BS: torch.Tensor,
    route_B: torch.Tensor,
    scale_H: torch.Tensor,
    pin_B: torch.Tensor | None = None,
    pin_slot_B: torch.Tensor | None = None,
    len_B: torch.Tensor | None = None,
    d_H: torch.Tensor | None = None,
    scale: float | None = None,
    out_BHV: torch.Tensor | None = None,
) -> torch.Tensor:
    """One streaming step of a layer's mixers for B series, in one launch; state and cache in place.

    Args:
        q_lin_BHK, k_BHK, v_BHV: the token's recurrent query, key (no RoPE) and value (unscaled).
        g_BH: fp32 log decay. gate_BH: fp32 beta (gdn) or dt (mamba2, which steps on `dt * v`).
        state_BHKV: fp32 contiguous recurrent state, advanced in place.
        q_att_BHK: attention query (L2 norm and RoPE applied). k_att_BHK: the key as the cache
            stores it (RoPE applied).
        k_cache_BSHK, v_cache_BSHV: the cache (heads contiguous within a slot), updated in place
            by the slot plan: where `pin_B`, slot `write_slot_B` moves to `pin_slot_B` first; then
            the new key and value go to `write_slot_B`.
        valid_BS: bool, slots holding a token after the step (the new one included).
        route_B: per-series mode in [0, 1]; attention is computed only where it is nonzero.
        scale_H: per-head attention logit scale.
        len_B: optional int64 bound on the slots to scan (slots at or past it are not valid).
        d_H: Mamba-2's skip weight (`o += d * v`), None for none.

    Returns:
        o_BHV in v's dtype (written into `out_BHV` when given).
    """
    B, H, K = q_lin_BHK.shape
    V = v_BHV.shape[-1]
    S = k_cache_BSHK.shape[1]
    scale = K**-0.5 if scale is None else scale
    assert state_BHKV.is_contiguous() and state_BHKV.dtype == torch.float32 and state_BHKV.shape == (B, H, K, V)
    kc, vc = k_cache_BSHK, v_cache_BSHV
    assert kc.stride(-1) == 1 and kc.stride(-2) == K and vc.stride(-1) == 1 and vc.stride(-2) == V
    assert valid_BS.dtype == torch.bool and valid_BS.stride(-1) == 1 and valid_BS.shape == (B, S)
    assert (pin_B is None) == (pin_slot_B is None)
    q, k, v, qa, ka = (_heads_contiguous(t) for t in (q_lin_BHK, k_BHK, v_BHV, q_att_BHK, k_att_BHK))
    o = torch.empty(B, H, V, device=v.device, dtype=v.dtype) if out_BHV is None else out_BHV
    assert o.is_contiguous() and o.shape == (B, H, V)
    g, gate = g_BH.contiguous(), gate_BH.contiguous()
    valid = valid_BS.view(torch.uint8)
    has_pin = pin_B is not None
    pin = pin_B.contiguous().view(torch.uint8) if has_pin else valid
    pslot = pin_slot_B.contiguous() if has_pin else write_slot_B
    length = len_B.contiguous() if len_B is not None else write_slot_B
    BLOCK_K, BLOCK_V = triton.next_power_of_2(K), triton.next_power_of_2(V)
    _step_kernel[(B * H,)](
        q, k, v, g, gate, g if d_H is None else d_H.contiguous(), state_BHKV, o,
        qa, ka, kc, vc, write_slot_B.contiguous(), pin, pslot, valid, length, route_B.contiguous(),
        scale_H.contiguous(),
        q.stride(0), k.stride(0), v.stride(0), qa.stride(0), ka.stride(0), kc.stride(0), kc.stride(1),
        vc.stride(0), vc.stride(1), valid.stride(0),
        H, S, scale,
        K=K, V=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_N=64,
        MIXER=_GDN if mixer == "gdn" else _SSD, HAS_DT=mixer == "mamba2", HAS_D=d_H is not None,
        HAS_ATT=True, HAS_PIN=has_pin, HAS_LEN=len_B is not None,
        num_warps=4 if BLOCK_K * BLOCK_V <= 4096 else 8,
    )
    return o
