"""Every GPU fast path must compute what its torch reference computes: outputs, gradients and final
states, in bf16 and fp32, at lengths off the chunk boundaries.

References run in fp32 on the same (already rounded) inputs. Tolerances are on the relative error
||fast - ref|| / ||ref||: fp32 inputs 2e-3 (fla and our kernels may use tf32 tensor cores),
bf16 inputs 2e-2 (16-bit operands and outputs). Outputs are poisoned with NaN before fast calls
that write into given buffers. Skipped with a reason where CUDA or a package is missing.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from oryx_ts.kernels import dispatch
from oryx_ts.kernels.attention.naive import routed_attention
from oryx_ts.kernels.gdn.naive import gdn_step, naive_chunk_gdn
from oryx_ts.kernels.mamba2.naive import naive_chunk_ssd, ssd_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]
needs_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla (flash-linear-attention)")
needs_mamba = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba-ssm")

TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# (label, B, T, H, K, V, initial state): one token, shorter than a chunk, chunk+1 with K=V=128,
# several chunks and a bit. B and H stay fixed: fla and mamba-ssm re-autotune for every new (B, H).
SHAPES = [
    ("T1", 2, 1, 4, 64, 64, False),
    ("T37-h0", 2, 37, 4, 64, 64, True),
    ("T65-K128-h0", 2, 65, 4, 128, 128, True),
    ("T300", 2, 300, 4, 64, 64, False),
]
GRAD_SHAPES = [("T100", 2, 100, 4, 64, 64)]


def _grads(fn, leaves, seed=0):
    """Outputs and gradients of `fn(*leaves)` against fixed random cotangents."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    o, s = fn(*leaves)
    gen = torch.Generator(device=o.device).manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, device=o.device)
    ds = torch.randn(s.shape, generator=gen, device=o.device)
    loss = (o.float() * do).sum() + (s.float() * ds).sum()
    return o.detach(), s.detach(), torch.autograd.grad(loss, leaves)


def _up(t):
    return t.detach().float()


def _check(name, fast, ref, rel, dtype):
    err = rel(fast, ref)
    assert err < TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e}"


@needs_fla
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label,B,T,H,K,V,init_state", SHAPES, ids=[s[0] for s in SHAPES])
def test_gdn_chunk_forward(label, B, T, H, K, V, init_state, dtype, inputs, rel):
    q, k, v, g, beta, h0 = inputs(B, T, H, K, V, mixer="gdn", dtype=dtype, device="cuda", seed=T, init_state=init_state)
    o, s = dispatch.linear_chunk("gdn", q, k, v, g, beta, initial_state=h0, backend="triton")
    assert dispatch.last_backend["linear_chunk"] == "triton" and dispatch.last_backend["linear_chunk_impl"] == "fla"
    o_ref, s_ref = naive_chunk_gdn(_up(q), _up(k), _up(v), g, beta, initial_state=h0)
    assert o.dtype == dtype and s.dtype == torch.float32
    _check("o", o, o_ref, rel, dtype)
    _check("final state", s, s_ref, rel, dtype)


@needs_fla
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label,B,T,H,K,V", GRAD_SHAPES, ids=[s[0] for s in GRAD_SHAPES])
def test_gdn_chunk_gradients(label, B, T, H, K, V, dtype, inputs, rel):
    q, k, v, g, beta, h0 = inputs(B, T, H, K, V, mixer="gdn", dtype=dtype, device="cuda", seed=T, init_state=True)
    if dtype == torch.float32 and dispatch._fla_bwd_via_tilelang(0):
        # fla's TileLang backward does not compile for fp32 here: dispatch must refuse, and auto must fall back
        with pytest.raises(ValueError, match="TileLang"):
            _grads(lambda *a: dispatch.linear_chunk("gdn", *a[:5], initial_state=a[5], backend="triton"), [q, k, v, g, beta, h0])
        _grads(lambda *a: dispatch.linear_chunk("gdn", *a[:5], initial_state=a[5], backend="auto"), [q, k, v, g, beta, h0])
        assert dispatch.last_backend["linear_chunk"] == "torch"
        return
    fast = _grads(lambda *a: dispatch.linear_chunk("gdn", *a[:5], initial_state=a[5], backend="triton"),
                  [q, k, v, g, beta, h0])
    ref = _grads(lambda q_, k_, v_, *a: naive_chunk_gdn(q_.float(), k_.float(), v_.float(), *a[:2], initial_state=a[2]),
                 [q, k, v, g, beta, h0])
    _check("o", fast[0], ref[0], rel, dtype)
    _check("final state", fast[1], ref[1], rel, dtype)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], fast[2], ref[2]):
        _check(name, a, b, rel, dtype)


@pytest.mark.parametrize("impl", [pytest.param("mamba_ssm", marks=needs_mamba), pytest.param("fla", marks=needs_fla)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label,B,T,H,K,V,init_state", SHAPES, ids=[s[0] for s in SHAPES])
def test_mamba2_chunk_forward(label, B, T, H, K, V, init_state, dtype, impl, inputs, rel):
    q, k, v, g, _, h0 = inputs(B, T, H, K, V, mixer="mamba2", dtype=dtype, device="cuda", seed=T, init_state=init_state)
    o, s = dispatch.linear_chunk("mamba2", q, k, v, g, None, initial_state=h0, backend="triton", impl=impl)
    assert dispatch.last_backend["linear_chunk_impl"] == impl
    o_ref, s_ref = naive_chunk_ssd(_up(q), _up(k), _up(v), g, initial_state=h0)
    assert o.dtype == dtype and s.dtype == torch.float32 and s.shape == s_ref.shape
    _check("o", o, o_ref, rel, dtype)
    _check("final state", s, s_ref, rel, dtype)


@needs_mamba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label,B,T,H,K,V", GRAD_SHAPES, ids=[s[0] for s in GRAD_SHAPES])
def test_mamba2_mamba_ssm_gradients(label, B, T, H, K, V, dtype, inputs, rel):
    q, k, v, g, _, h0 = inputs(B, T, H, K, V, mixer="mamba2", dtype=dtype, device="cuda", seed=T, init_state=True)
    fast = _grads(lambda *a: dispatch.linear_chunk("mamba2", *a[:4], None, initial_state=a[4], backend="triton",
                                                   impl="mamba_ssm"), [q, k, v, g, h0])
    ref = _grads(lambda q_, k_, v_, g_, h_: naive_chunk_ssd(q_.float(), k_.float(), v_.float(), g_, initial_state=h_),
                 [q, k, v, g, h0])
    _check("o", fast[0], ref[0], rel, dtype)
    _check("final state", fast[1], ref[1], rel, dtype)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dh0"], fast[2], ref[2]):
        _check(name, a, b, rel, dtype)


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,K,V", [(3, 2, 64, 64), (5, 4, 128, 128), (16384, 8, 64, 64)],
                         ids=["B3", "B5-K128", "B16384"])
def test_linear_step(mixer, dtype, B, H, K, V, inputs, rel):
    q, k, v, g, beta, h0 = inputs(B, 1, H, K, V, mixer=mixer, dtype=dtype, device="cuda", seed=B, init_state=True)
    args = (q[:, 0], k[:, 0], v[:, 0], g[:, 0], None if beta is None else beta[:, 0])
    before = h0.clone()
    o, s = dispatch.linear_step(mixer, *args, h0, backend="triton")
    torch.cuda.synchronize()
    assert dispatch.last_backend["linear_step"] == "triton" and torch.equal(h0, before)
    ref_fn = gdn_step if mixer == "gdn" else (lambda q_, k_, v_, g_, b_, s_: ssd_step(q_, k_, v_, g_, s_))
    o_ref, s_ref = ref_fn(*(_up(t) if t is not None and t.dtype != torch.float32 else t for t in args), h0)
    _check("o", o, o_ref, rel, dtype)
    _check("state", s, s_ref, rel, dtype)


@needs_fla
def test_fla_fused_recurrent_split_survives_16384_series(inputs, rel):
    from oryx_ts.kernels.gdn.fast import fla_fused_recurrent_gdn

    q, k, v, g, beta, h0 = inputs(16384, 1, 8, 64, 64, mixer="gdn", dtype=torch.bfloat16, device="cuda", init_state=True)
    o, s = fla_fused_recurrent_gdn(q, k, v, g, beta, initial_state=h0)
    torch.cuda.synchronize()
    o_ref, s_ref = gdn_step(_up(q[:, 0]), _up(k[:, 0]), _up(v[:, 0]), g[:, 0], beta[:, 0], h0)
    _check("o", o[:, 0], o_ref, rel, torch.bfloat16)
    _check("state", s, s_ref, rel, torch.bfloat16)


ATT_SHAPES = [  # (label, B, T, H, K, V, routed fraction, bounded cache)
    ("T300-K64", 2, 300, 2, 64, 64, 0.3, False),
    ("T1000-K128", 1, 1000, 2, 128, 128, 0.1, False),
    ("T513-K64-bounded", 2, 513, 2, 64, 64, 0.25, True),
    ("T200-K32-all", 1, 200, 3, 32, 32, 1.0, False),
    ("T128-K16-V32-all", 8, 128, 4, 16, 32, 1.0, False),  # key and value widths differ: fp32 once faulted here
    ("T128-K32-V16-all", 8, 128, 4, 32, 16, 1.0, False),
]


def _routed_inputs(B, T, H, K, frac, bounded, dtype, seed, V=None):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chunk = 16
    routed_chunks = torch.rand((T + chunk - 1) // chunk, generator=gen) < frac
    routed_chunks[-1] = True
    q_pos = (routed_chunks.repeat_interleave(chunk)[:T]).nonzero().squeeze(1)
    q = F.normalize(torch.randn(B, len(q_pos), H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V or K, generator=gen)
    scale = 2 + 8 * torch.rand(H, generator=gen)
    valid = None
    if bounded:  # a recent window of 128 plus pinned tokens, different per series
        pos = torch.arange(T)
        valid = (pos[None] >= T - 128) | (torch.rand(B, T, generator=gen) < 0.05)
        valid[:, 0] = True  # the first token is pinned, so every query sees a key
    cuda = lambda t: t.to("cuda", dtype) if t.is_floating_point() else t.to("cuda")  # noqa: E731
    kw = dict(q_pos_Tq=q_pos.cuda(), k_pos_S=torch.arange(T, device="cuda"), scale_H=scale.cuda(),
              k_valid_BS=None if valid is None else valid.cuda())
    return cuda(q), cuda(k), cuda(v), kw


@pytest.fixture(params=[False, True], ids=["two-launch", "fused"])
def backward_kind(request, monkeypatch):
    """Both backwards of the Triton routed attention: dq then dk/dv, and the fused one launch (atomic dq)."""
    from oryx_ts.kernels.attention import routed_triton

    monkeypatch.setitem(routed_triton._FORCE, "fuse_dq", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label,B,T,H,K,V,frac,bounded", ATT_SHAPES, ids=[s[0] for s in ATT_SHAPES])
def test_routed_attention(label, B, T, H, K, V, frac, bounded, dtype, rel, backward_kind):
    q, k, v, kw = _routed_inputs(B, T, H, K, frac, bounded, dtype, seed=T, V=V)
    scale = kw.pop("scale_H")

    def fast(q_, k_, v_, s_):
        out = dispatch.routed_attention(q_, k_, v_, scale_H=s_, backend="triton", **kw)
        return out, s_

    def ref(q_, k_, v_, s_):
        return routed_attention(q_.float(), k_.float(), v_.float(), scale_H=s_, **kw), s_

    _check_routed(fast, ref, [q, k, v, scale], rel, dtype)


def _check_routed(fast, ref, leaves, rel, dtype):
    """Output and gradients of the Triton routed attention (`fast`) against the reference; returns the fast gradients."""
    o, _, g_fast = _grads(fast, leaves)
    assert dispatch.last_backend["routed_attention"] == "triton"
    o_ref, _, g_ref = _grads(ref, leaves)
    _check("o", o, o_ref, rel, dtype)
    for name, a, b in zip(["dq", "dk", "dv", "dscale"], g_fast, g_ref):
        _check(name, a, b, rel, dtype)
    return g_fast


# the backward's cases: head widths 64 and 128, few (2-5%) and many (60-100%) routed queries, lengths
# off the 128-key and 32/128-query blocks, caches long enough that the key ranges are split into pieces
# (S >= 2,048) and that the on-device searches take three levels (S > 16,384)
ATT_BWD_SHAPES = [  # (label, B, T, H, K, V, routed fraction, bounded cache)
    ("T2100-K64-few", 1, 2100, 2, 64, 64, 0.03, False),
    ("T2100-K128-few", 2, 2100, 2, 128, 128, 0.05, False),
    ("T3001-K64-many", 1, 3001, 2, 64, 64, 0.6, False),
    ("T1500-K128-many", 1, 1500, 2, 128, 128, 1.0, False),
    ("T1537-K128-few-bounded", 2, 1537, 2, 128, 128, 0.05, True),
    ("T17000-K64-few", 1, 17000, 1, 64, 64, 0.02, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label,B,T,H,K,V,frac,bounded", ATT_BWD_SHAPES, ids=[s[0] for s in ATT_BWD_SHAPES])
def test_routed_attention_backward(label, B, T, H, K, V, frac, bounded, dtype, rel, backward_kind):
    """Output and every gradient against the fp32 reference (TOL: 2e-3 fp32, 2e-2 bf16); keys that no
    routed query sees get exactly zero gradient (the kernels write every row of dk, dv)."""
    q, k, v, kw = _routed_inputs(B, T, H, K, frac, bounded, dtype, seed=T + K, V=V)
    scale = kw.pop("scale_H")
    keep = kw["q_pos_Tq"] < T - 100  # the last 100 keys stay unseen
    q, kw["q_pos_Tq"] = q[:, keep], kw["q_pos_Tq"][keep]
    assert q.shape[1] > 0

    def fast(q_, k_, v_, s_):
        return dispatch.routed_attention(q_, k_, v_, scale_H=s_, backend="triton", **kw), s_

    def ref(q_, k_, v_, s_):
        return routed_attention(q_.float(), k_.float(), v_.float(), scale_H=s_, **kw), s_

    g = _check_routed(fast, ref, [q, k, v, scale], rel, dtype)
    unseen = (kw["k_pos_S"] > kw["q_pos_Tq"].max())[None].expand(B, -1)
    if bounded:
        unseen = unseen | ~kw["k_valid_BS"]
    assert not g[1][unseen].any() and not g[2][unseen].any()
    assert all(torch.isfinite(t).all() for t in g)


@needs_fla
@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_inputs_compiled_matches_eager(dtype, rel):
    """The compiled gather, L2 norm and RoPE of the routed queries (and the keys' RoPE) against the eager
    ops (fla's rotation) and the fp32 reference: outputs and both input gradients, positions from a
    million on, two counts of routed tokens through the one dynamic-shape graph."""
    from oryx_ts.kernels.attention.naive import routed_inputs

    B, T, H, K = 2, 300, 4, 64
    gen = torch.Generator(device="cpu").manual_seed(5)
    k = torch.randn(B, T, H, K, generator=gen).to("cuda", dtype)
    q_rows = torch.randn(B, T, H * K, generator=gen).to("cuda", dtype)
    pos = torch.arange(10**6, 10**6 + T, device="cuda")
    for n in (37, 120):
        idx = torch.randperm(T, generator=gen)[:n].sort().values.cuda()
        cot = [torch.randn(B, T, H, K, generator=gen).cuda(), torch.randn(B, n, H, K, generator=gen).cuda()]
        out = {}
        for backend in ("triton", "torch", "reference"):
            leaves = [t.detach().clone().requires_grad_() for t in (k, q_rows)]
            if backend == "reference":
                ys = routed_inputs(leaves[0].float(), leaves[1].float(), idx, pos, 10000.0)
            else:
                ys = dispatch.routed_inputs(leaves[0], leaves[1], idx, pos, rope_base=10000.0, backend=backend)
                assert dispatch.last_backend["routed_inputs"] == backend and all(y.dtype == dtype for y in ys)
            grads = torch.autograd.grad(sum((y.float() * c).sum() for y, c in zip(ys, cot)), leaves)
            out[backend] = [y.detach() for y in ys] + list(grads)
        for name, a, b, c in zip(["keys", "q", "dk", "dq_rows"], out["triton"], out["torch"], out["reference"]):
            _check(f"{name} (n={n}) vs reference", a, c, rel, dtype)
            _check(f"{name} (n={n}) vs eager", a, b, rel, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_attention_keys_may_be_views_with_gaps(dtype, rel):
    # keys and values as the first S rows of longer buffers (as a cache slice is): the backward
    # must write dk, dv with their own strides, not the views' (which skip the buffers' tails)
    B, T, H, K = 2, 200, 2, 64
    q, k, v, kw = _routed_inputs(B, T, H, K, 0.25, False, dtype, seed=11)
    scale = kw.pop("scale_H")
    tail = torch.randn(B, 56, H, K, device="cuda").to(dtype)
    k_buf, v_buf = torch.cat([k, tail], 1), torch.cat([v, -tail], 1)

    def fast(q_, kb, vb, s_):
        return dispatch.routed_attention(q_, kb[:, :T], vb[:, :T], scale_H=s_, backend="triton", **kw), s_

    def ref(q_, kb, vb, s_):
        return routed_attention(q_.float(), kb[:, :T].float(), vb[:, :T].float(), scale_H=s_, **kw), s_

    g_fast = _check_routed(fast, ref, [q, k_buf, v_buf, scale], rel, dtype)
    assert not g_fast[1][:, T:].any() and not g_fast[2][:, T:].any()  # nothing lands in the buffers' tails


def test_routed_attention_query_without_keys_gives_zeros():
    q, k, v, kw = _routed_inputs(1, 300, 2, 64, 0.5, True, torch.bfloat16, seed=9)
    kw["k_valid_BS"][:, :150] = False  # queries before position 150 see no retained key
    o = dispatch.routed_attention(q, k, v, backend="triton", **kw)
    ref = routed_attention(q.float(), k.float(), v.float(), **kw)
    unseen = torch.isnan(ref)
    assert unseen.any() and torch.equal(o[unseen], torch.zeros_like(o[unseen]))
    assert torch.isfinite(o).all()


LAYER_STEP_PLANS = ["all", "bounded-pins", "bounded-no-pins"]


def _layer_step_inputs(mixer, dtype, plan, inputs, B=64, H=4, K=64, V=64, S=300):
    """Random inputs of one layer step with a slot plan like `State.plan_step` makes (per-series lengths)."""
    q, k, v, g, beta, h0 = inputs(B, 1, H, K, V, mixer=mixer, dtype=dtype, device="cuda", seed=3, init_state=True)
    gen = torch.Generator(device="cpu").manual_seed(4)
    gate = beta[:, 0] if mixer == "gdn" else torch.rand(B, H, generator=gen).cuda() * 0.1
    qa = F.normalize(torch.randn(B, H, K, generator=gen), dim=-1).to("cuda", dtype)
    ka = F.normalize(torch.randn(B, H, K, generator=gen), dim=-1).to("cuda", dtype)
    kc = F.normalize(torch.randn(B, S, H, K, generator=gen), dim=-1).to("cuda", dtype)
    vc = torch.randn(B, S, H, V, generator=gen).to("cuda", dtype)
    route = torch.where(torch.rand(B, generator=gen) < 0.4, 1.0, 0.0)
    route[:4] = torch.tensor([0.5, 0.25, 1.0, 0.0])  # fractional modes take the general mix
    kw = dict(q_att_BHK=qa, k_att_BHK=ka, k_cache_BSHK=kc, v_cache_BSHV=vc, route_B=route.cuda(),
              scale_H=(2 + 8 * torch.rand(H, generator=gen)).cuda())
    n = torch.randint(0, 3 * S, (B,), generator=gen)
    n[:3] = torch.tensor([0, 1, S - 1])
    if plan == "all":  # slot = position, slots past the new token empty
        slot = n % S
        kw.update(write_slot_B=slot.cuda(), valid_BS=(torch.arange(S)[None] <= slot[:, None]).cuda(),
                  len_B=(slot + 1).cuda())
    else:  # a recent window of W slots and P pinned slots behind it
        P = 44 if plan == "bounded-pins" else 0
        W = S - P
        slot = n % W
        valid = torch.arange(S)[None] < torch.minimum(n + 1, torch.tensor(W))[:, None]
        if P:
            pin = (n >= W) & (torch.rand(B, generator=gen) < 0.5)
            pins = torch.randint(0, 2 * P, (B,), generator=gen) * (n >= W)
            valid |= (torch.arange(S)[None] >= W) & (torch.arange(S)[None] < W + torch.minimum(pins + pin, torch.tensor(P))[:, None])
            kw.update(pin_B=pin.cuda(), pin_slot_B=(W + pins % P).cuda())
        kw.update(write_slot_B=slot.cuda(), valid_BS=valid.cuda())
    d = torch.rand(H, generator=gen).cuda() if mixer == "mamba2" else None
    return (q[:, 0], k[:, 0], v[:, 0], g[:, 0], gate, h0), kw, d


@pytest.mark.parametrize("plan", LAYER_STEP_PLANS)
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_layer_step_matches_its_naive_twin(mixer, dtype, plan, inputs, rel):
    """One launch against `naive_layer_step` (fp32 reference on the same rounded inputs): output,
    state in place, and the cache after the slot plan (bit for bit: both only copy)."""
    from oryx_ts.kernels.step_naive import naive_layer_step

    (q, k, v, g, gate, h0), kw, d = _layer_step_inputs(mixer, dtype, plan, inputs)
    state, kc, vc = h0.clone(), kw["k_cache_BSHK"].clone(), kw["v_cache_BSHV"].clone()
    out = torch.full(v.shape, float("nan"), device="cuda", dtype=dtype)
    o = dispatch.layer_step(mixer, q, k, v, g, gate, state, **{**kw, "k_cache_BSHK": kc, "v_cache_BSHV": vc}, d_H=d,
                            out_BHV=out, backend="triton")
    assert dispatch.last_backend["layer_step"] == "triton" and o is out
    ref_state, kc_ref, vc_ref = h0.clone(), kw["k_cache_BSHK"].clone(), kw["v_cache_BSHV"].clone()
    o_ref = naive_layer_step(mixer, _up(q), _up(k), _up(v), g, gate, ref_state,
                             **{**kw, "q_att_BHK": _up(kw["q_att_BHK"]), "k_cache_BSHK": kc_ref, "v_cache_BSHV": vc_ref},
                             d_H=d)
    assert torch.equal(kc, kc_ref.to(dtype)) and torch.equal(vc, vc_ref.to(dtype))
    _check("state", state, ref_state, rel, dtype)
    _check("o", out, o_ref, rel, dtype)
    routed = kw["route_B"] != 0
    _check("o of routed series", out[routed], o_ref[routed], rel, dtype)


@needs_fla
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [32, 64, 128])
def test_rope_fused_matches_torch(K, dtype, rel):
    """fla's fused rotation with our tables vs the torch reference: output and input gradient,
    positions from a million on (the tables must keep their phase)."""
    from oryx_ts.kernels.attention.rope import rope as rope_torch

    g = torch.Generator(device="cuda").manual_seed(K)
    x = torch.randn(2, 300, 4, K, device="cuda", generator=g).to(dtype)
    pos = torch.arange(10**6, 10**6 + 300, device="cuda")
    dy = torch.randn(x.shape, device="cuda", generator=g)
    out = {}
    for backend in ("triton", "torch"):
        xi = x.clone().requires_grad_()
        y = dispatch.rope(xi, pos, base=10000.0, backend=backend)
        assert dispatch.last_backend["rope"] == backend and y.dtype == dtype
        (y.float() * dy).sum().backward()
        out[backend] = (y.detach(), xi.grad)
    ref = rope_torch(x.float(), pos)
    _check("rope", out["triton"][0], ref, rel, dtype)
    _check("rope grad", out["triton"][1], out["torch"][1], rel, dtype)


RETENTIONS = {"all": {}, "bounded": {"retention": "bounded", "window": 5, "pinned": 3}}
# relative error of the streamed forecasts against the fp32 parallel forward of the same weights
STEP_TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("retention", list(RETENTIONS))
@pytest.mark.parametrize("mixer", [pytest.param("gdn", marks=needs_fla), pytest.param("mamba2", marks=needs_mamba)])
def test_model_step_equals_forward_on_gpu(mixer, retention, dtype, rel):
    """Series at different positions in one batch (staggered starts, random subsets stepped through
    `State.select` / `scatter`), random modes with some fractional ones, through the fused step."""
    from tests.conftest import random_model
    from tests.kernels.test_layer_step import _run

    model = random_model(mixer, seed=5, block={"head_dim_k": 16, "head_dim_v": 32, **RETENTIONS[retention]}).cuda()
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    B, T = 5, 37
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(B, T * P, C, generator=gen) * 5 + 2).cuda()
    u = torch.rand(B, T, generator=gen)
    modes = torch.where(u < 0.3, 1.0, torch.where(u < 0.4, 0.5, 0.0)).cuda()
    with torch.no_grad():
        parallel = model(x, modes)
        assert dispatch.last_backend["linear_chunk"] == "triton"
        stepper = model.to(dtype)
        streamed = _run(stepper, x, modes, stagger=[0, 4, 9, 1, 17])
        assert dispatch.last_backend["mixer_step"] == "triton"
    assert torch.isfinite(parallel).all()
    err = rel(streamed.float(), parallel)
    assert err < STEP_TOL[dtype], f"step vs forward: relative error {err:.2e} > {STEP_TOL[dtype]:.0e}"
