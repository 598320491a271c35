"""The CUDA streaming step as the model runs it: the fused mixer step against its torch twin (every
state dtype, either place of the output gate), bf16/fp16 state against fp32, the graphed step against eager
steps, no host sync, and the step's norm and activation kernels against theirs.

Tolerances on ||fast - ref|| / ||ref||: fp32 2e-3, bf16 2e-2 (as in test_gpu_parity); a bf16 or
fp16 state against the fp32 state 3e-2 over 40 steps (rounding the stored state each step).
"""

import importlib.util

import pytest
import torch

from oryx_ts.kernels import dispatch
from tests.conftest import random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}
BOUNDED = {"retention": "bounded", "window": 5, "pinned": 3}


def _mixer_inputs(mixer, dtype, state_dtype, B=64, H=4, K=64, V=64, S=300, W=4, seed=0):
    """Random projections, tails, conv weights, gates, state and a bounded slot plan with pins."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    n_proj = 3 * H * K + 2 * H * V + (2 * H if mixer == "gdn" else H)
    proj = r(B, n_proj)
    tails = (r(B, W - 1, H * K), r(B, W - 1, H * V), r(B, W - 1, H * K))
    conv_w = tuple(r(x, 1, W) / W**0.5 for x in (H * K, H * V, H * K))
    conv_b = tuple(r(x) * 0.1 for x in (H * K, H * V, H * K))
    P = 44
    n = torch.randint(0, 3 * S, (B,), generator=gen)
    slot = n % (S - P)
    pin = (n >= S - P) & (torch.rand(B, generator=gen) < 0.5)
    route = torch.where(torch.rand(B, generator=gen) < 0.4, 1.0, 0.0)
    route[:4] = torch.tensor([0.5, 0.25, 1.0, 0.0])
    kw = dict(
        a_log_H=torch.log(1 + 15 * torch.rand(H, generator=gen)), dt_bias_H=r(H) - 4.0,
        o_norm_weight_V=1 + 0.1 * r(V), o_norm_eps=1e-6, pos_B=n, rope_base=10000.0,
        k_cache_BSHK=torch.nn.functional.normalize(r(B, S, H, K), dim=-1), v_cache_BSHV=r(B, S, H, V),
        write_slot_B=slot, valid_BS=torch.rand(B, S, generator=gen) < 0.8, route_B=route,
        scale_H=2 + 8 * torch.rand(H, generator=gen), pin_B=pin, pin_slot_B=S - P + torch.randint(0, P, (B,), generator=gen),
        d_H=torch.rand(H, generator=gen) if mixer == "mamba2" else None,
    )
    rows = torch.arange(B)
    kw["valid_BS"][rows, slot] = True  # the slot mask holds the new token, and the moved one where it pins
    kw["valid_BS"][rows[pin], kw["pin_slot_B"][pin]] = True
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    kw = {k: cuda(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    kw["k_cache_BSHK"], kw["v_cache_BSHV"] = kw["k_cache_BSHK"].to(state_dtype), kw["v_cache_BSHV"].to(state_dtype)
    state = (r(B, H, K, V) * 0.3).to("cuda", state_dtype)
    weights = dict(conv_weights=tuple(w.to("cuda", dtype) for w in conv_w), conv_biases=tuple(b.to("cuda", dtype) for b in conv_b))
    return proj.to("cuda", dtype), state, tuple(t.to("cuda", dtype) for t in tails), weights, kw


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32-state", "bf16-state", "fp16-state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_fused_mixer_step_matches_its_naive_twin(mixer, dtype, state_dtype, rel):
    """The fused step against `naive_mixer_step` on the same inputs: gated output, state, cache and conv
    tails after the step (the tails bit for bit: both only move values)."""
    _check_mixer_step(mixer, dtype, state_dtype, rel)


@pytest.mark.parametrize("output_gate", ["kernel", "in_step"])
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_fused_mixer_step_odd_heads_and_either_output_gate(mixer, output_gate, monkeypatch, rel):
    """3 heads (the output gate's head tile padded to 4) and V=32 != K, the output gate in its own
    launch or in the layer step's epilogue."""
    from oryx_ts.kernels import step_triton

    monkeypatch.setitem(step_triton.LAUNCH, "output_gate", output_gate)
    _check_mixer_step(mixer, torch.float32, torch.float32, rel, H=3, V=32)
    _check_mixer_step(mixer, torch.bfloat16, torch.bfloat16, rel)


def _check_mixer_step(mixer, dtype, state_dtype, rel, **shape):
    from oryx_ts.kernels.step_naive import naive_mixer_step

    proj, state, tails, weights, kw = _mixer_inputs(mixer, dtype, state_dtype, **shape)
    runs = {}
    for name, fn in (("fast", lambda *a, **k: dispatch.mixer_step(*a, backend="triton", **k)), ("ref", naive_mixer_step)):
        st, tl = state.clone(), tuple(t.clone() for t in tails)
        kc, vc = kw["k_cache_BSHK"].clone(), kw["v_cache_BSHV"].clone()
        o = fn(mixer, proj, st, tails=tl, **weights, **{**kw, "k_cache_BSHK": kc, "v_cache_BSHV": vc})
        runs[name] = (o, st, tl, kc, vc)
    assert dispatch.last_backend["mixer_step"] == "triton"
    (o, st, tl, kc, vc), (o_r, st_r, tl_r, kc_r, vc_r) = runs["fast"], runs["ref"]
    assert o.dtype == dtype and st.dtype == state_dtype and torch.isfinite(o).all()
    tol = max(TOL[dtype], TOL[state_dtype])
    for label, a, b in (("o", o, o_r), ("state", st, st_r), ("k cache", kc, kc_r), ("v cache", vc, vc_r)):
        err = rel(a.float(), b.float())
        assert err < tol, f"{label}: relative error {err:.2e} > {tol:.0e}"
    for a, b in zip(tl, tl_r, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_half_state_step_stays_close_to_fp32(mixer, state_dtype, rel):
    """40 fused steps of an fp32 model with the state stored in bf16/fp16 vs stored in fp32."""
    model = random_model(mixer, seed=1, block=BOUNDED).cuda()
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    B, T = 8, 40
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(B, T, P, C, generator=gen) * 3 + 1).cuda()
    modes = (torch.rand(B, T, generator=gen) < 0.3).float().cuda()
    out = {}
    with torch.no_grad():
        for sd in (None, state_dtype):
            state = model.init_state(B, state_dtype=sd)
            out[sd] = torch.stack([model.step(x[:, t], state, modes[:, t])[0] for t in range(T)], 1)
            assert dispatch.last_backend["mixer_step"] == "triton"
            assert state.layers[0].rec_BHKV.dtype == (sd or torch.float32)
            assert state.layers[0].k_cache_BSHK.dtype == (sd or torch.float32)
    err = rel(out[state_dtype], out[None])
    assert err < 3e-2, f"{state_dtype} state vs fp32: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_step_matches_eager_steps(dtype, rel):
    """A captured step replayed 12 times, random modes, against eager steps of a copy of the state
    (1e-5 in fp32; in bf16 the captured GEMMs may take other cuBLAS kernels than the eager ones)."""
    from oryx_ts.step_graph import GraphedStep

    model = random_model("gdn", seed=3, block=BOUNDED).cuda().to(dtype)
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    B = 5
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        state = model.init_state(B)
        for t in range(3):  # start from a state with history
            model.step(torch.randn(B, P, C, generator=gen).cuda(), state, None)
        eager_state = state.clone()
        graphed = GraphedStep(model, state)
        assert torch.equal(state.n_tokens_B, eager_state.n_tokens_B)  # capturing does not step
        for t in range(12):
            patch = (torch.randn(B, P, C, generator=gen) * 2).cuda()
            m = (torch.rand(B, generator=gen) < 0.4).float().cuda()
            f_graph = graphed(patch, m).clone()
            f_eager, eager_state = model.step(patch, eager_state, m)
            err = rel(f_graph.float(), f_eager.float())
            assert err < tol, f"step {t}: graphed vs eager relative error {err:.2e}"
        assert torch.equal(state.n_tokens_B, eager_state.n_tokens_B)
        for a, b in zip(state.tensors().values(), eager_state.tensors().values(), strict=True):
            assert torch.equal(a, b) or rel(a.float(), b.float()) < tol
        model.step(patch, state, m)
        with pytest.raises(ValueError, match="outside"):
            graphed(patch, m)


def test_model_step_never_syncs_the_host():
    """With CUDA's sync debug mode set to error, a bounded-retention step (device modes, the fused
    path) must not wait for the device."""
    model = random_model("gdn", seed=5, block=BOUNDED).cuda()
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    B = 6
    state = model.init_state(B)
    patch = torch.randn(B, P, C).cuda()
    m = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.0]).cuda()
    with torch.no_grad():
        model.step(patch, state, m)  # first call compiles the kernel
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model.step(patch, state, m)
                model.step(patch, state, None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert dispatch.last_backend["mixer_step"] == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 100, 512])
def test_rms_norm_matches_its_twin(D, dtype, rel):
    from oryx_ts.kernels.norm_naive import rms_norm

    x = (torch.randn(300, 1, D, device="cuda") * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(D, device="cuda")).to(dtype)
    y = dispatch.rms_norm(x, w, 1e-6, backend="triton")
    assert dispatch.last_backend["rms_norm"] == "triton" and y.dtype == dtype and y.shape == x.shape
    err = rel(y.float(), rms_norm(x.float(), w.float(), 1e-6))
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 100, 512])
def test_add_rms_norm_and_swiglu_match_their_twins(D, dtype, rel):
    """The residual add with the norm after it (the sum as torch rounds it), and SwiGLU's activation,
    each one launch, against `norm_naive` on the same inputs (rows not a multiple of the kernel's block)."""
    from oryx_ts.kernels.norm_naive import add_rms_norm, swiglu

    x, r = ((torch.randn(301, 1, D, device="cuda") * 3).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(D, device="cuda")).to(dtype)
    s, y = dispatch.add_rms_norm(x, r, w, 1e-6, backend="triton")
    assert dispatch.last_backend["add_rms_norm"] == "triton" and s.dtype == y.dtype == dtype and y.shape == x.shape
    s_ref, y_ref = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, s_ref)
    assert rel(y.float(), y_ref.float()) < TOL[dtype]
    gu = (torch.randn(301, 1, 2 * D, device="cuda") * 2).to(dtype)
    a = dispatch.swiglu(gu, backend="triton")
    assert dispatch.last_backend["swiglu"] == "triton" and a.shape == (301, 1, D) and a.dtype == dtype
    assert rel(a.float(), swiglu(gu).float()) < TOL[dtype]
