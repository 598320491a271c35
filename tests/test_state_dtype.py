"""A state allocated with `state_dtype` bf16/fp16 keeps its recurrent state and KV cache in that dtype
through steps, save/load, select and scatter, and forecasts close to the fp32 state (CPU paths)."""

import pytest
import torch

from oryx_ts.evaluation.state_precision import compare_state_dtypes
from oryx_ts.kernels import dispatch
from oryx_ts.state import State
from tests.conftest import random_model

BOUNDED = {"retention": "bounded", "window": 5, "pinned": 3}
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("state_dtype", HALF)
def test_allocate_stores_recurrent_state_and_cache_in_state_dtype(state_dtype):
    model = random_model("gdn")
    state = model.init_state(3, state_dtype=state_dtype)
    ls = state.layers[0]
    assert ls.rec_BHKV.dtype == ls.k_cache_BSHK.dtype == ls.v_cache_BSHV.dtype == state_dtype
    assert ls.conv_k_BWX.dtype == torch.float32  # the conv tails stay in the model's dtype
    default = model.init_state(3)
    assert default.layers[0].rec_BHKV.dtype == torch.float32
    assert state.nbytes() < default.nbytes()


def test_allocate_refuses_other_dtypes():
    with pytest.raises(ValueError, match="state_dtype"):
        random_model("gdn").init_state(2, state_dtype=torch.int8)


@pytest.mark.parametrize("state_dtype", HALF)
@pytest.mark.parametrize("retention", ["all", "bounded"])
@pytest.mark.parametrize("fused_twin", [False, True], ids=["general", "fused-twin"])
def test_half_state_steps_keep_the_dtype_and_stay_close(mixer, retention, state_dtype, fused_twin, monkeypatch, tmp_path):
    """30 steps with random modes, the general CPU step and the fused step's torch twin: the dtype
    holds, forecasts stay within 3e-2 of the fp32 state's, and a save/load round trip is exact."""
    model = random_model(mixer, seed=1, block=BOUNDED if retention == "bounded" else {})
    if fused_twin:
        monkeypatch.setattr(dispatch, "use_layer_step", lambda *a: True)
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    B, T = 4, 30
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, P, C, generator=gen) * 3 + 1
    modes = (torch.rand(B, T, generator=gen) < 0.3).float()
    out = {}
    with torch.no_grad():
        for sd in (None, state_dtype):
            state = model.init_state(B, capacity=4, state_dtype=sd)
            out[sd] = torch.stack([model.step(x[:, t], state, modes[:, t])[0] for t in range(T)], 1)
            for ls in state.layers:
                assert ls.rec_BHKV.dtype == (sd or torch.float32) and ls.k_cache_BSHK.dtype == (sd or torch.float32)
    if fused_twin:
        assert dispatch.last_backend["mixer_step"] == "torch"
    err = float((out[state_dtype] - out[None]).norm() / out[None].norm())
    assert err < 3e-2, err
    state.save(tmp_path / "s.safetensors")
    back = State.load(tmp_path / "s.safetensors")
    for (name, a), b in zip(state.tensors().items(), back.tensors().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    part = state.select([2, 0])
    assert part.layers[0].rec_BHKV.dtype == state_dtype
    state.scatter([0, 2], part)
    assert state.layers[0].rec_BHKV.dtype == state_dtype


def test_compare_state_dtypes_reports_error_and_drift_per_window():
    model = random_model("gdn", seed=3, block=BOUNDED)
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    x = torch.randn(2, 25 * P, C, generator=torch.Generator().manual_seed(4))
    res = compare_state_dtypes(model, x, window=10, modes_BT=(torch.rand(2, 25) < 0.3).float())
    assert res["step"] == [10, 20, 24] and res["steps"] == 24
    for name in ("fp32", "bfloat16", "float16"):
        assert len(res[name]["mae"]) == 3 and all(v > 0 for v in res[name]["quantile_loss"])
    for name in ("bfloat16", "float16"):
        assert all(0 < d < 5e-2 for d in res[name]["drift"])
