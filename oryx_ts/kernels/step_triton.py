"""Fused streaming step in Triton: one token per series through a layer's mixers, for many series.

One program per (series, head) holds that head's recurrent state in registers and, in one launch:
advances the state (Gated DeltaNet or Mamba-2 SSD) and reads it out; applies the step's slot plan
to the KV cache (moves a leaving attention-mode token to its pinned slot, writes the new key and
value); and, only for series whose mode is nonzero this step, attends over the retained slots plus
the new key. The output is the attention output where the mode is 1, else
`m * o_att + (1 - m) * o_lin`. Every input is a device tensor (modes, slots, slot mask), so the
step never waits on the host and can be captured in a CUDA graph. The state and the cache are
updated in place: they are the preallocated buffers of the streaming state.

`fused_mixer_step` runs the whole mixer step from the token's projections: a prologue kernel of one
warp per (series, head) (`mixer_prologue`: short convs over the tails, moved on in place;
activations, L2 norms, gates, RoPE), the layer step above, and the mixer's output gate (RMSNorm
over each head, times silu(z)), in a launch of its own or in the layer step's epilogue
(`gated_layer_step`, `LAUNCH`). The prologue and the layer step stay apart because they want
different shapes: the layer step holds a 64x64 state per program in registers and so runs few
programs at a time, where the prologue's cross-warp reductions would each cost a barrier on the
path between reading and writing the state (measured: one launch took 2.3x the layer step alone).
A prologue of one program per series (all heads as (heads, dim) tiles) was slower on an H200:
1.09 ms for four layers of 16,384 series against 0.89 ms for the one-warp programs.

`naive_layer_step` and `naive_mixer_step` (`kernels/step_naive.py`) are the pure-torch twins with
the same signatures.

Legend: B series, H heads, K key dim, V value dim, S cache slots.
"""

import torch
import triton
import triton.language as tl

_GDN, _SSD = 0, 1
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# where `fused_mixer_step` applies the output gate: "kernel", a launch of its own after the layer
# step, or "in_step", in the layer step's epilogue (benchmarks/gpu.py times both)
LAUNCH = dict(output_gate="kernel")


@triton.jit
def _conv_in(p_x, tail_row, s_tw, CW, CB, col, mask, W: tl.constexpr, BLOCK_W: tl.constexpr):
    """One channel slice of a short causal conv over [tail, x]: `(y fp32, shifted tail, x)`; stores nothing."""
    x = tl.load(p_x + col, mask=mask, other=0.0)
    offs_w = tl.arange(0, BLOCK_W)
    m2 = (offs_w[:, None] < W - 1) & mask[None, :]
    t = tl.load(tail_row + offs_w[:, None] * s_tw + col[None, :], mask=m2, other=0.0)
    wt = tl.load(CW + col[None, :] * W + offs_w[:, None], mask=m2, other=0.0).to(tl.float32)
    y = tl.sum(t.to(tl.float32) * wt, 0) + x.to(tl.float32) * tl.load(CW + col * W + (W - 1), mask=mask, other=0.0).to(tl.float32)
    y = y + tl.load(CB + col, mask=mask, other=0.0).to(tl.float32)
    # the tail after this token: row j takes row j + 1, the last row takes x
    t1 = tl.load(tail_row + (offs_w[:, None] + 1) * s_tw + col[None, :], mask=(offs_w[:, None] < W - 2) & mask[None, :], other=0.0)
    t1 = tl.where(offs_w[:, None] == W - 2, x[None, :].to(t1.dtype), t1)
    return y, t1


@triton.jit
def _store_tail(tail_row, s_tw, t1, col, mask, W: tl.constexpr, BLOCK_W: tl.constexpr):
    offs_w = tl.arange(0, BLOCK_W)
    m2 = (offs_w[:, None] < W - 1) & mask[None, :]
    tl.store(tail_row + offs_w[:, None] * s_tw + col[None, :], t1.to(tail_row.dtype.element_ty), mask=m2)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _prologue_kernel(PROJ, TK, TV, TQ, CWK, CWV, CWQ, CBK, CBV, CBQ, ALOG, DTB, COS, SIN,
                     Q, Kn, Vn, QA, KA, G, GATE,
                     s_proj, s_tkb, s_tkw, s_tvb, s_tvw, s_tqb, s_tqw, H, l2_eps,
                     K: tl.constexpr, V: tl.constexpr, BLOCK_V: tl.constexpr, MIXER: tl.constexpr,
                     HAS_ROPE: tl.constexpr, CONV_W: tl.constexpr, BLOCK_W: tl.constexpr):
    """One (series, head): the token's projections to the layer step's inputs; conv tails moved on in place.

    A program of one warp: its few reductions stay inside the warp, and the many small programs keep
    the memory system busy (the fused layer step holds a 64x64 state per program and runs few at once).
    """
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    offs_k = tl.arange(0, K)
    offs_v = tl.arange(0, BLOCK_V)
    mk = offs_k < K
    mv = offs_v < V
    row = b * H + h
    # the token's projections (one row of PROJ: k | v | q | q_att | z | a or dt | beta) through the
    # short convs, activations, L2 norms, gates and RoPE, as `OryxMixer._qkv` / `_gates` compute them
    HK = H * K
    HV = H * V
    p_row = PROJ + b * s_proj
    col_k = h * K + offs_k
    col_v = h * V + offs_v
    yk, tk1 = _conv_in(p_row, TK + b * s_tkb, s_tkw, CWK, CBK, col_k, mk, CONV_W, BLOCK_W)
    yv, tv1 = _conv_in(p_row + HK, TV + b * s_tvb, s_tvw, CWV, CBV, col_v, mv, CONV_W, BLOCK_W)
    yq, tq1 = _conv_in(p_row + HK + HV, TQ + b * s_tqb, s_tqw, CWQ, CBQ, col_k, mk, CONV_W, BLOCK_W)
    # RoPE pairs element i with i +- K/2 (rotate-half): the partners come from the same conv on
    # permuted channels (loads that hit the cache), so nothing is shuffled between threads
    part = (offs_k + K // 2) % K
    col_r = h * K + part
    yk_r, _ = _conv_in(p_row, TK + b * s_tkb, s_tkw, CWK, CBK, col_r, mk, CONV_W, BLOCK_W)
    if MIXER == 0:
        yk, yv, yq, yk_r = _silu(yk), _silu(yv), _silu(yq), _silu(yk_r)
    rk = 1.0 / tl.sqrt(tl.sum(yk * yk, 0) + l2_eps)
    k = yk * rk
    k_r = yk_r * rk
    v = yv
    q = yq / tl.sqrt(tl.sum(yq * yq, 0) + l2_eps)
    qa = tl.load(p_row + 2 * HK + HV + col_k, mask=mk, other=0.0).to(tl.float32)
    qa_r = tl.load(p_row + 2 * HK + HV + col_r, mask=mk, other=0.0).to(tl.float32)
    ra = 1.0 / tl.sqrt(tl.sum(qa * qa, 0) + l2_eps)
    qa, qa_r = qa * ra, qa_r * ra
    if HAS_ROPE:
        c = tl.load(COS + b * (K // 2) + offs_k % (K // 2), mask=mk, other=1.0)
        s = tl.load(SIN + b * (K // 2) + offs_k % (K // 2), mask=mk, other=0.0)
        s = tl.where(offs_k < K // 2, -s, s)
        ka = k * c + k_r * s
        qa = qa * c + qa_r * s
    else:
        ka = k
    a_raw = tl.load(p_row + 3 * HK + 2 * HV + h).to(tl.float32)
    sp = _softplus(a_raw + tl.load(DTB + h).to(tl.float32))
    if MIXER == 0:
        gv = 1.0 / (1.0 + tl.exp(-tl.load(p_row + 3 * HK + 2 * HV + H + h).to(tl.float32)))
    else:
        gv = sp
    # every thread has read the old tails before any writes them back
    tl.debug_barrier()
    _store_tail(TK + b * s_tkb, s_tkw, tk1, col_k, mk, CONV_W, BLOCK_W)
    _store_tail(TV + b * s_tvb, s_tvw, tv1, col_v, mv, CONV_W, BLOCK_W)
    _store_tail(TQ + b * s_tqb, s_tqw, tq1, col_k, mk, CONV_W, BLOCK_W)
    out_k = row * K + offs_k
    tl.store(Q + out_k, q.to(Q.dtype.element_ty))
    tl.store(Kn + out_k, k.to(Kn.dtype.element_ty))
    tl.store(QA + out_k, qa.to(QA.dtype.element_ty))
    tl.store(KA + out_k, ka.to(KA.dtype.element_ty))
    tl.store(Vn + row * V + offs_v, v.to(Vn.dtype.element_ty), mask=mv)
    tl.store(G + row, -tl.exp(tl.load(ALOG + h).to(tl.float32)) * sp)
    tl.store(GATE + row, gv)


@triton.jit
def _output_gate_kernel(O, PROJ, ONW, s_proj, z_off, H, eps, V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr):
    """The mixer's output gate of one series in place: RMSNorm over each head's V values, times silu(z)."""
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_v = tl.arange(0, BLOCK_V)
    m = (offs_h[:, None] < H) & (offs_v[None, :] < V)
    col = offs_h[:, None] * V + offs_v[None, :]
    o = tl.load(O + b * H * V + col, mask=m, other=0.0).to(tl.float32)
    z = tl.load(PROJ + b * s_proj + z_off + col, mask=m, other=0.0).to(tl.float32)
    w = tl.load(ONW + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)
    o = o / tl.sqrt(tl.sum(o * o, 1) / V + eps)[:, None] * w[None, :] * _silu(z)
    tl.store(O + b * H * V + col, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _step_kernel(Q, Kn, Vn, G, GATE, DSKIP, STATE, O,
                 QA, KA, KC, VC, WSLOT, PIN, PSLOT, VALID, LEN, ROUTE, SCALE_H,
                 PROJ, ONW,
                 s_q, s_k, s_v, s_qa, s_ka, s_kcb, s_kcs, s_vcb, s_vcs, s_valid, s_proj, z_off,
                 H, S, scale, on_eps,
                 K: tl.constexpr, V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_N: tl.constexpr, MIXER: tl.constexpr, HAS_DT: tl.constexpr, HAS_D: tl.constexpr,
                 HAS_ATT: tl.constexpr, HAS_PIN: tl.constexpr, HAS_LEN: tl.constexpr, EPI: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    mk = offs_k < K
    mv = offs_v < V
    row = b * H + h
    # the loads that do not wait on the state are issued before it (the cache slots, the modes, the
    # leaving token, the epilogue's z): few programs run per SM, each holding a 64x64 state (on an
    # H200 this timed the same as loading them where they are used, within 2%)
    q = tl.load(Q + b * s_q + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(Kn + b * s_k + h * K + offs_k, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(Vn + b * s_v + h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(G + row).to(tl.float32))
    gv = tl.load(GATE + row).to(tl.float32)
    if EPI:
        z = tl.load(PROJ + b * s_proj + z_off + h * V + offs_v, mask=mv, other=0.0).to(tl.float32)
        onw = tl.load(ONW + offs_v, mask=mv, other=0.0).to(tl.float32)
    if HAS_ATT:
        wslot = tl.load(WSLOT + b).to(tl.int64)
        route = tl.load(ROUTE + b).to(tl.float32)
        ka = tl.load(KA + b * s_ka + h * K + offs_k, mask=mk, other=0.0)
        p_kc = KC + b * s_kcb + h * K
        p_vc = VC + b * s_vcb + h * V
        if HAS_PIN:
            pin = tl.load(PIN + b) != 0
            pslot = tl.load(PSLOT + b).to(tl.int64)
    p_state = STATE + row * (K * V) + offs_k[:, None] * V + offs_v[None, :]
    m_kv = mk[:, None] & mv[None, :]
    # the state is stored in its own dtype (fp32, or bf16/fp16 to move fewer bytes) and advanced in fp32
    st = tl.load(p_state, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_ATT:
        if HAS_PIN:
            # the token leaving the recent window (it may move to its pinned slot), read while the state is in flight
            k_old = tl.load(p_kc + wslot * s_kcs + offs_k, mask=mk, other=0.0)
            v_old = tl.load(p_vc + wslot * s_vcs + offs_v, mask=mv, other=0.0)
    st = st * decay
    if MIXER == 0:  # Gated DeltaNet: S <- g S + beta k (v - k^T g S)^T; GATE is beta
        delta = gv * (v - tl.sum(k[:, None] * st, 0))
        st = st + k[:, None] * delta[None, :]
    else:  # SSD: S <- g S + k (dt v)^T; GATE is dt when HAS_DT, else v comes scaled
        v_in = v
        if HAS_DT:
            v_in = v * gv
        st = st + k[:, None] * v_in[None, :]
    tl.store(p_state, st.to(STATE.dtype.element_ty), mask=m_kv)
    o = tl.sum(q[:, None] * st, 0) * scale
    if HAS_D:  # Mamba-2's skip connection on the unscaled value
        o = o + tl.load(DSKIP + h).to(tl.float32) * v

    if HAS_ATT:
        k_new = ka.to(KC.dtype.element_ty)  # as the cache will hold them
        v_new = v.to(VC.dtype.element_ty)
        if HAS_PIN:
            # the leaving token moves to its pinned slot; it stays in registers, so neither slot this
            # program writes is read back from memory
            tl.debug_barrier()  # every warp holds the leaving token before any overwrites its slot
            tl.store(p_kc + pslot * s_kcs + offs_k, k_old, mask=mk & pin)
            tl.store(p_vc + pslot * s_vcs + offs_v, v_old, mask=mv & pin)
            skip_p = tl.where(pin, pslot, -1)  # the moved token is read from registers, not its slot
        tl.store(p_kc + wslot * s_kcs + offs_k, k_new, mask=mk)
        tl.store(p_vc + wslot * s_vcs + offs_v, v_new, mask=mv)
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
                s_n = tl.where(ok, tl.sum(kb * qa[None, :], 1), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s_n, 0))
                p = tl.math.exp2(s_n - m_new)
                alpha = tl.math.exp2(m_i - m_new)
                vb = tl.load(p_vc + offs_n[:, None].to(tl.int64) * s_vcs + offs_v[None, :],
                             mask=ok[:, None] & mv[None, :], other=0.0).to(tl.float32)
                l_i = l_i * alpha + tl.sum(p, 0)
                acc = acc * alpha + tl.sum(p[:, None] * vb, 0)
                m_i = m_new
            att = acc / l_i
            o = tl.where(route == 1.0, att, route * att + (1.0 - route) * o)
    if EPI:
        # the mixer's output gate: RMSNorm over the head's V values, times silu(z) (z in PROJ's row)
        o = o / tl.sqrt(tl.sum(tl.where(mv, o * o, 0.0), 0) / V + on_eps)
        o = o * onw * _silu(z)
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
        q, k, q, q, g, g, g, g, g, g, g, q, g,
        q.stride(0), k.stride(0), v.stride(0), 0, 0, 0, 0, 0, 0, 0, 0, 0,
        H, 0, scale, 0.0,
        K=K, V=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_N=64,
        MIXER=_GDN if mixer == "gdn" else _SSD, HAS_DT=False, HAS_D=False,
        HAS_ATT=False, HAS_PIN=False, HAS_LEN=False, EPI=False,
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
    gate_out: tuple[torch.Tensor, torch.Tensor, int, float] | None = None,
) -> torch.Tensor:
    """One streaming step of a layer's mixers for B series, in one launch; state and cache in place.

    Args:
        q_lin_BHK, k_BHK, v_BHV: the token's recurrent query, key (no RoPE) and value (unscaled).
        g_BH: fp32 log decay. gate_BH: fp32 beta (gdn) or dt (mamba2, which steps on `dt * v`).
        state_BHKV: contiguous recurrent state (fp32, bf16 or fp16), advanced in place in fp32.
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
        gate_out: `(proj_BN, o_norm_weight_V, z offset in a row of proj_BN, eps)`: the output then
            takes the mixer's output gate, RMSNorm over each head times silu(z) (`fused_mixer_step`).

    Returns:
        o_BHV in v's dtype (written into `out_BHV` when given).
    """
    B, H, K = q_lin_BHK.shape
    V = v_BHV.shape[-1]
    S = k_cache_BSHK.shape[1]
    scale = K**-0.5 if scale is None else scale
    assert state_BHKV.is_contiguous() and state_BHKV.dtype in STATE_DTYPES and state_BHKV.shape == (B, H, K, V)
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
        scale_H.contiguous(), q if gate_out is None else gate_out[0], g if gate_out is None else gate_out[1],
        q.stride(0), k.stride(0), v.stride(0), qa.stride(0), ka.stride(0), kc.stride(0), kc.stride(1),
        vc.stride(0), vc.stride(1), valid.stride(0), 0 if gate_out is None else gate_out[0].stride(0),
        0 if gate_out is None else gate_out[2],
        H, S, scale, 0.0 if gate_out is None else gate_out[3],
        K=K, V=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_N=64,
        MIXER=_GDN if mixer == "gdn" else _SSD, HAS_DT=mixer == "mamba2", HAS_D=d_H is not None,
        HAS_ATT=True, HAS_PIN=has_pin, HAS_LEN=len_B is not None, EPI=gate_out is not None,
        num_warps=4 if BLOCK_K * BLOCK_V <= 4096 else 8,
    )
    return o


def mixer_prologue(
    mixer: str,
    proj_BN: torch.Tensor,
    state_BHKV: torch.Tensor,
    *,
    tails: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv_biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_log_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    pos_B: torch.Tensor | None,
    rope_base: float,
    l2_eps: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """The first launch of `fused_mixer_step`: the layer step's inputs from the token's projections
    (`q_lin_BHK`, `k_BHK`, `v_BHV`, `g_BH`, `gate_BH`, `q_att_BHK`, `k_att_BHK`); the tails move on in place."""
    B, H, K, V = state_BHKV.shape
    tk, tv, tq = tails
    W = tk.shape[1] + 1
    assert proj_BN.stride(-1) == 1 and all(t.stride(-1) == 1 for t in tails)
    assert K == triton.next_power_of_2(K), "the prologue pairs RoPE partners by index: K must be a power of two"
    cw = [w.reshape(w.shape[0], W).contiguous() for w in conv_weights]
    cb = [t.contiguous() for t in conv_biases]
    if pos_B is not None:
        from oryx_ts.kernels.attention.rope import rope_tables

        cos, sin = (t.contiguous() for t in rope_tables(pos_B, K, base=rope_base))
    else:
        cos = sin = a_log_H
    dt = proj_BN.dtype
    q, k, qa, ka = (torch.empty(B, H, K, device=proj_BN.device, dtype=dt) for _ in range(4))
    v = torch.empty(B, H, V, device=proj_BN.device, dtype=dt)
    g, gate = (torch.empty(B, H, device=proj_BN.device, dtype=torch.float32) for _ in range(2))
    args = (proj_BN, tk, tv, tq, *cw, *cb, a_log_H.contiguous(), dt_bias_H.contiguous(), cos, sin,
            q, k, v, qa, ka, g, gate,
            proj_BN.stride(0), tk.stride(0), tk.stride(1), tv.stride(0), tv.stride(1), tq.stride(0), tq.stride(1), H, l2_eps)
    meta = dict(K=K, V=V, BLOCK_V=triton.next_power_of_2(V), MIXER=_GDN if mixer == "gdn" else _SSD,
                HAS_ROPE=pos_B is not None, CONV_W=W, BLOCK_W=triton.next_power_of_2(max(W - 1, 1)))
    _prologue_kernel[(B * H,)](*args, **meta, num_warps=1)
    return dict(q_lin_BHK=q, k_BHK=k, v_BHV=v, g_BH=g, gate_BH=gate, q_att_BHK=qa, k_att_BHK=ka)


def fused_mixer_step(
    mixer: str,
    proj_BN: torch.Tensor,
    state_BHKV: torch.Tensor,
    *,
    tails: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv_biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_log_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    o_norm_weight_V: torch.Tensor,
    o_norm_eps: float,
    pos_B: torch.Tensor | None,
    rope_base: float,
    l2_eps: float = 1e-6,
    **cache_kwargs,
) -> torch.Tensor:
    """A whole mixer step from the token's projections, in two launches (`mixer_prologue`, then the
    layer step with the output gate); see `step_naive.naive_mixer_step`. `cache_kwargs`: the KV
    cache, slot plan, modes and `d_H` of `fused_layer_step`.

    Returns the gated mixer output `(B, H * V)` in `proj_BN`'s dtype (before `o_proj`). The conv
    tails, the recurrent state and the cache are updated in place.
    """
    B, H, K, V = state_BHKV.shape
    x = mixer_prologue(mixer, proj_BN, state_BHKV, tails=tails, conv_weights=conv_weights, conv_biases=conv_biases,
                       a_log_H=a_log_H, dt_bias_H=dt_bias_H, pos_B=pos_B, rope_base=rope_base, l2_eps=l2_eps)
    return gated_layer_step(mixer, x, state_BHKV, proj_BN, o_norm_weight_V, o_norm_eps, **cache_kwargs).view(B, H * V)


def gated_layer_step(
    mixer: str, x: dict[str, torch.Tensor], state_BHKV: torch.Tensor, proj_BN: torch.Tensor,
    o_norm_weight_V: torch.Tensor, o_norm_eps: float, **cache_kwargs,
) -> torch.Tensor:
    """The rest of `fused_mixer_step` after `mixer_prologue` (its tensors `x`): the layer step and the
    output gate, in the layer step's epilogue or in a launch of its own (`LAUNCH["output_gate"]`).
    Returns o_BHV, gated."""
    B, H, K, V = state_BHKV.shape
    z_off = 3 * H * K + H * V  # where z starts in a row of proj_BN
    in_step = LAUNCH["output_gate"] == "in_step"
    o = fused_layer_step(
        mixer, x["q_lin_BHK"], x["k_BHK"], x["v_BHV"], x["g_BH"], x["gate_BH"], state_BHKV,
        q_att_BHK=x["q_att_BHK"], k_att_BHK=x["k_att_BHK"], **cache_kwargs,
        gate_out=(proj_BN, o_norm_weight_V.contiguous(), z_off, o_norm_eps) if in_step else None,
    )
    if not in_step:
        # a launch of its own: in the layer step's epilogue the gate's cross-warp reduction and the z
        # load come after the state's store, with that state's registers still held
        _output_gate_kernel[(B,)](o, proj_BN, o_norm_weight_V.contiguous(), proj_BN.stride(0), z_off, H, o_norm_eps,
                                  V=V, BLOCK_H=triton.next_power_of_2(H), BLOCK_V=triton.next_power_of_2(V), num_warps=4)
    return o
