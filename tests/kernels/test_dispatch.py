"""The dispatch point must take the torch path on CPU, refuse a demanded fast path there, and keep triton out of the CPU install."""

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from oryx_ts.kernels import dispatch
from oryx_ts.kernels.attention.naive import routed_attention, routed_inputs
from oryx_ts.kernels.gdn.naive import gdn_step, naive_chunk_gdn
from oryx_ts.kernels.mamba2.naive import naive_chunk_ssd, ssd_step


def _attention_inputs(B=2, T=12, H=2, K=16):
    q_pos = torch.tensor([3, 4, 9, 11])
    q = F.normalize(torch.randn(B, len(q_pos), H, K), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, K)
    return q, k, v, dict(q_pos_Tq=q_pos, k_pos_S=torch.arange(T), scale_H=torch.full((H,), 5.0))


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_takes_torch_path_and_matches_reference(mixer, backend, inputs, rel):
    q, k, v, g, beta, h0 = inputs(2, 21, 2, 16, 16, mixer=mixer, init_state=True)
    o, s = dispatch.linear_chunk(mixer, q, k, v, g, beta, initial_state=h0, chunk_size=8, backend=backend)
    assert dispatch.last_backend["linear_chunk"] == "torch"
    ref = naive_chunk_gdn(q, k, v, g, beta, initial_state=h0, chunk_size=8) if mixer == "gdn" else \
        naive_chunk_ssd(q, k, v, g, initial_state=h0, chunk_size=8)
    assert torch.equal(o, ref[0]) and torch.equal(s, ref[1])

    o1, s1 = dispatch.linear_step(mixer, q[:, 0], k[:, 0], v[:, 0], g[:, 0], None if beta is None else beta[:, 0], h0,
                                  backend=backend)
    assert dispatch.last_backend["linear_step"] == "torch"
    ref1 = gdn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0) if mixer == "gdn" else \
        ssd_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], h0)
    assert torch.equal(o1, ref1[0]) and torch.equal(s1, ref1[1])


@pytest.mark.parametrize("rope_base", [10000.0, None])
def test_routed_inputs_cpu_takes_torch_path(rope_base):
    k, q_rows = torch.randn(2, 20, 2, 8), torch.randn(2, 20, 16)
    idx, pos = torch.tensor([3, 7, 19]), torch.arange(20)
    out = dispatch.routed_inputs(k, q_rows, idx, pos, rope_base=rope_base)
    assert dispatch.last_backend["routed_inputs"] == "torch"
    assert all(torch.equal(a, b) for a, b in zip(out, routed_inputs(k, q_rows, idx, pos, rope_base)))
    assert out[1].shape == (2, 3, 2, 8) and (rope_base is not None or out[0] is k)
    with pytest.raises(ValueError, match="cannot run"):
        dispatch.routed_inputs(k, q_rows, idx, pos, rope_base=rope_base, backend="triton")


@pytest.mark.parametrize("env, path, long", [(None, "triton", False), ("1", "triton", False), ("0", "torch", False),
                                             (None, "torch", True)])
def test_routed_inputs_auto_compiles_where_the_fast_path_runs(monkeypatch, env, path, long):
    # where the fast path can run (CUDA), `auto` takes the compiled graph unless ORYX_COMPILE_ROUTED_INPUTS=0 or
    # the input has more tokens than ROUTED_INPUTS_COMPILE_MAX_TOKENS (there the eager ops are faster); here the
    # fast path is faked available and the "compiled" graph is the eager twin itself
    if env is None:
        monkeypatch.delenv("ORYX_COMPILE_ROUTED_INPUTS", raising=False)
    else:
        monkeypatch.setenv("ORYX_COMPILE_ROUTED_INPUTS", env)
    monkeypatch.setattr(dispatch, "select_backend", lambda x, backend, *a, **kw: "torch" if backend == "torch" else "triton")
    monkeypatch.setattr(dispatch, "_routed_inputs_compiled", lambda: routed_inputs)
    monkeypatch.setattr(dispatch, "rope", functools.partial(dispatch.rope, backend="torch"))  # no fla on the CPU
    monkeypatch.setattr(dispatch, "ROUTED_INPUTS_COMPILE_MAX_TOKENS", 39 if long else 40)  # 2 x 20 tokens below
    k, q_rows = torch.randn(2, 20, 2, 8), torch.randn(2, 20, 16)
    idx, pos = torch.tensor([3, 7, 19]), torch.arange(20)
    out = dispatch.routed_inputs(k, q_rows, idx, pos, rope_base=10000.0)
    assert dispatch.last_backend["routed_inputs"] == path
    assert all(torch.allclose(a, b) for a, b in zip(out, routed_inputs(k, q_rows, idx, pos, 10000.0)))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_routed_attention_cpu_takes_torch_path(backend, inputs, rel):
    q, k, v, kw = _attention_inputs()
    o = dispatch.routed_attention(q, k, v, backend=backend, **kw)
    assert dispatch.last_backend["routed_attention"] == "torch"
    assert torch.equal(o, routed_attention(q, k, v, **kw))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_rope_cpu_takes_torch_path(backend):
    from oryx_ts.kernels.attention.rope import rope

    x = torch.randn(2, 9, 3, 16)
    pos = torch.arange(5, 14)
    assert torch.equal(dispatch.rope(x, pos, base=500.0, backend=backend), rope(x, pos, base=500.0))
    assert dispatch.last_backend["rope"] == "torch"


def test_triton_backend_raises_on_cpu(inputs, rel):
    q, k, v, g, beta, h0 = inputs(1, 4, 2, 16, 16, mixer="gdn", init_state=True)
    with pytest.raises(ValueError, match="cannot run"):
        dispatch.linear_chunk("gdn", q, k, v, g, beta, backend="triton")
    with pytest.raises(ValueError, match="cannot run"):
        dispatch.linear_step("gdn", q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0, backend="triton")
    qa, ka, va, kw = _attention_inputs()
    with pytest.raises(ValueError, match="cannot run"):
        dispatch.routed_attention(qa, ka, va, backend="triton", **kw)
    with pytest.raises(ValueError, match="cannot run"):
        dispatch.rope(qa, kw["q_pos_Tq"], backend="triton")
    ok, why = dispatch.fast_path_available(torch.device("cpu"))
    assert not ok and "cpu" in why


def test_bad_arguments_raise(inputs, rel):
    q, k, v, g, beta, _ = inputs(1, 4, 2, 16, 16, mixer="gdn")
    with pytest.raises(ValueError, match="backend"):
        dispatch.linear_chunk("gdn", q, k, v, g, beta, backend="cuda")
    with pytest.raises(ValueError, match="mixer"):
        dispatch.linear_chunk("rwkv", q, k, v, g, beta)
    with pytest.raises(ValueError, match="impl"):
        dispatch.linear_chunk("mamba2", q, k, v, g, None, impl="flash")


def test_cpu_install_never_imports_triton(inputs, rel):
    code = (
        "import sys, torch, oryx_ts, oryx_ts.kernels.dispatch as d, oryx_ts.model, oryx_ts.block\n"
        "q = torch.randn(1, 3, 2, 16); g = -torch.rand(1, 3, 2)\n"
        "d.linear_chunk('mamba2', q, q, q, g, None)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'fla', 'mamba_ssm')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
