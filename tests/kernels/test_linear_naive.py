"""The chunked torch references must equal their token-by-token recurrences, and both must equal fla's references."""

import pytest
import torch

from oryx_ts.kernels.gdn.naive import gdn_step, naive_chunk_gdn, naive_recurrent_gdn
from oryx_ts.kernels.mamba2.naive import naive_chunk_ssd, naive_recurrent_ssd, ssd_step

CHUNK = 16
# (label, T): shorter than a chunk, one token, chunk-1, chunk+1, several chunks, several and a bit
LENGTHS = [("one", 1), ("short", 7), ("chunk-1", CHUNK - 1), ("chunk", CHUNK), ("chunk+1", CHUNK + 1),
           ("3 chunks", 3 * CHUNK), ("3 chunks+5", 3 * CHUNK + 5)]
TOL = 1e-5  # fp32 everywhere


def _run(mixer, fn, q, k, v, g, beta, **kw):
    if mixer == "gdn":
        return fn(q, k, v, g, beta, **kw)
    return fn(q, k, v, g, **kw)


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("init_state", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("label,T", LENGTHS, ids=[x[0] for x in LENGTHS])
def test_chunk_equals_recurrent(mixer, init_state, label, T, inputs, rel):
    q, k, v, g, beta, h0 = inputs(2, T, 3, 8, 16, mixer=mixer, seed=T, init_state=init_state)
    rec, chunk = (naive_recurrent_gdn, naive_chunk_gdn) if mixer == "gdn" else (naive_recurrent_ssd, naive_chunk_ssd)
    o_ref, s_ref = _run(mixer, rec, q, k, v, g, beta, initial_state=h0)
    o, s = _run(mixer, chunk, q, k, v, g, beta, initial_state=h0, chunk_size=CHUNK)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape == (2, 3, 8, 16)
    assert rel(o, o_ref) < TOL
    assert rel(s, s_ref) < TOL


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_chunk_gradients_equal_recurrent(mixer, inputs, rel):
    q, k, v, g, beta, h0 = inputs(1, CHUNK + 3, 2, 8, 8, mixer=mixer, seed=1, init_state=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, h0) + ((beta,) if beta is not None else ())]
    rec, chunk = (naive_recurrent_gdn, naive_chunk_gdn) if mixer == "gdn" else (naive_recurrent_ssd, naive_chunk_ssd)
    grads = []
    for fn, kw in ((rec, {}), (chunk, {"chunk_size": CHUNK})):
        qq, kk, vv, gg, hh = leaves[:5]
        bb = leaves[5] if mixer == "gdn" else None
        o, s = _run(mixer, fn, qq, kk, vv, gg, bb, initial_state=hh, **kw)
        gen = torch.Generator().manual_seed(7)
        loss = (o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for name, a, b in zip(["q", "k", "v", "g", "h0", "beta"], *grads):
        assert rel(b, a) < 1e-4, name


@pytest.mark.parametrize("init_state", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_gdn_matches_fla_reference(init_state, T, inputs, rel, fla_naive):
    fla = fla_naive("gated_delta_rule")
    q, k, v, g, beta, h0 = inputs(2, T, 3, 16, 16, mixer="gdn", seed=T + 100, init_state=init_state)
    o_ref, s_ref = fla.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    for fn in (naive_recurrent_gdn, naive_chunk_gdn):
        o, s = fn(q, k, v, g, beta, initial_state=h0)
        assert rel(o, o_ref) < TOL and rel(s, s_ref) < TOL, fn.__name__


@pytest.mark.parametrize("init_state", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_ssd_matches_fla_simple_gla_reference(init_state, T, inputs, rel, fla_naive):
    fla = fla_naive("simple_gla")
    q, k, v, g, _, h0 = inputs(2, T, 3, 16, 16, mixer="mamba2", seed=T + 200, init_state=init_state)
    o_ref, s_ref = fla.naive_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    for fn in (naive_recurrent_ssd, naive_chunk_ssd):
        o, s = fn(q, k, v, g, initial_state=h0)
        assert rel(o, o_ref) < TOL and rel(s, s_ref) < TOL, fn.__name__


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_step_does_not_modify_inputs(mixer, inputs, rel):
    q, k, v, g, beta, h0 = inputs(2, 1, 2, 8, 8, mixer=mixer, init_state=True)
    before = h0.clone()
    if mixer == "gdn":
        gdn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
    else:
        ssd_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], h0)
    assert torch.equal(h0, before)
