"""A long stretch is replayed in parallel chunks only if prefilling from any state, restored ones included, gives what stepping every patch from it gives."""

import numpy as np
import pytest
import torch

from oryx_ts import block as block_module
from oryx_ts.kernels import dispatch
from oryx_ts.routers import BudgetConfig, RandomRouter, RoutedForecaster
from oryx_ts.state import State
from oryx_ts.streams import AdapterConfig, Engine
from tests.conftest import random_model

P, C = 8, 4
RETENTIONS = {
    "all": {},
    "bounded": {"retention": "bounded", "window": 5, "pinned": 3},
    "no-pins": {"retention": "bounded", "window": 4, "pinned": 0},
}
# fp32: the chunked linear mixer and attention over a chunk against T single-token updates
TOL = {"rtol": 1e-4, "atol": 1e-4}


def stream(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random walks with missing values, and random modes (hard, plus a few soft ones)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T * P, C, generator=g).cumsum(1) * 0.3
    x[torch.rand(x.shape, generator=g) < 0.05] = float("nan")
    u = torch.rand(B, T, generator=g)
    modes = torch.where(u < 0.35, 1.0, torch.where(u < 0.45, u, 0.0))
    return x, modes


def step_through(model, x, modes, state, a: int, b: int) -> torch.Tensor:
    return torch.stack([model.step(x[:, n * P : (n + 1) * P], state, modes[:, n])[0] for n in range(a, b)], dim=1)


def prefill_chunks(model, x, modes, state, cuts: list[int]) -> tuple[torch.Tensor, State]:
    edges = [0, *cuts, modes.shape[1]]
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        f, state = model.prefill(x[:, a * P : b * P], modes[:, a:b], state=state)
        out.append(f)
    return torch.cat(out, dim=1), state


def assert_states_equal(got: State, want: State) -> None:
    """Every tensor: the same shape, integers and flags exactly, floats within `TOL`."""
    g, w = got.tensors(), want.tensors()
    assert g.keys() == w.keys()
    for name, t in w.items():
        assert g[name].shape == t.shape and g[name].dtype == t.dtype, name
        if t.is_floating_point():
            torch.testing.assert_close(g[name], t, **TOL, equal_nan=True, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(g[name], t), name


@pytest.mark.parametrize("retention", list(RETENTIONS))
@pytest.mark.parametrize("cuts", [[5, 21], [1, 16, 17]], ids=["off-chunk", "on-and-off-chunk"])
def test_chunked_prefill_equals_one_prefill_equals_stepping(mixer, retention, cuts):
    model = random_model(mixer, block=RETENTIONS[retention])
    assert model.config.block.chunk_size == 16  # the cuts and the length 38 fall inside and on the mixer's chunks
    x, modes = stream(3, 38, seed=len(cuts))
    with torch.no_grad():
        stepped = model.init_state(3, capacity=4)
        want = step_through(model, x, modes, stepped, 0, 38)
        once, one = model.prefill(x, modes, capacity=4)
        chunked, state = prefill_chunks(model, x, modes, model.init_state(3, capacity=4), cuts)
    torch.testing.assert_close(once, want, **TOL)
    torch.testing.assert_close(chunked, want, **TOL)
    assert_states_equal(one, stepped)
    assert_states_equal(state, stepped)


@pytest.mark.parametrize("retention", list(RETENTIONS))
def test_prefill_from_a_restored_state_equals_stepping_on(mixer, retention, tmp_path):
    model = random_model(mixer, block=RETENTIONS[retention])
    x, modes = stream(2, 45, seed=7)
    T0 = 13  # mid-stream, inside a mixer chunk, after the window has filled and tokens were pinned
    with torch.no_grad():
        state = model.init_state(2, capacity=4)
        step_through(model, x, modes, state, 0, T0)
        state.save(tmp_path / "state.safetensors")
        want = step_through(model, x, modes, state, T0, 45)
        restored = State.load(tmp_path / "state.safetensors")
        xs, ms = x[:, T0 * P :], modes[:, T0:]
        got, restored = prefill_chunks(model, xs, ms, restored, [6, 25])
    torch.testing.assert_close(got, want, **TOL)
    assert_states_equal(restored, state)


@pytest.mark.parametrize("retention", ["all", "bounded"])
def test_series_at_different_positions_prefill_together(mixer, retention):
    model = random_model(mixer, block=RETENTIONS[retention])
    lengths, T = [0, 3, 11], 12
    alone, heads, wants = [], [], []
    for i, n in enumerate(lengths):
        x, modes = stream(1, n + T, seed=20 + i)
        with torch.no_grad():
            head = model.init_state(1, capacity=4)
            if n:
                step_through(model, x, modes, head, 0, n)
            heads.append(head.clone())
            wants.append(step_through(model, x, modes, head, n, n + T))
        alone.append((x[:, n * P :], modes[:, n:], head))
    with torch.no_grad():
        got, state = model.prefill(torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone]), state=State.concat(heads))
    for i, (_, _, want_state) in enumerate(alone):
        torch.testing.assert_close(got[i : i + 1], wants[i], **TOL)
        row = state.select([i])
        for ls in row.layers:  # a batch's cache has the largest series' capacity; compare the slots it holds
            ls.k_cache_BSHK, ls.v_cache_BSHV = (t[:, : want_state.layers[0].slots] for t in (ls.k_cache_BSHK, ls.v_cache_BSHV))
        assert_states_equal(row, want_state)


def test_prefill_checks_its_state():
    model = random_model("gdn")
    x, modes = stream(2, 4, seed=0)
    with pytest.raises(ValueError, match="holds 3 series"):
        model.prefill(x, modes, state=model.init_state(3))
    with pytest.raises(ValueError, match="parts apply to a new state only"):
        model.prefill(x, modes, state=model.init_state(2), parts={})


@pytest.mark.parametrize("retention", ["all", "bounded"])
def test_routed_prefill_from_a_restored_state_equals_routed_steps(mixer, retention, tmp_path):
    model = random_model(mixer, block=RETENTIONS[retention])
    routed = RoutedForecaster(model, RandomRouter(0.4, seed=3), BudgetConfig(fraction=0.4, window=6))
    x, _ = stream(2, 40, seed=5)
    T0 = 9
    with torch.no_grad():
        state = routed.init_state(2, capacity=4)
        for n in range(T0):
            routed.step(x[:, n * P : (n + 1) * P], state)
        state.save(tmp_path / "routed.safetensors")
        want, want_modes = [], []
        for n in range(T0, 40):
            want.append(routed.step(x[:, n * P : (n + 1) * P], state)[0])
            want_modes.append(state.parts["routing"].last_mode_B.clone())
        restored = State.load(tmp_path / "routed.safetensors")
        got, modes = [], []
        for a, b in ((T0, 10), (10, 27), (27, 40)):
            out, restored = routed.prefill(x[:, a * P : b * P], state=restored)
            got.append(out.forecast)
            modes.append(out.modes_BT)
    assert torch.equal(torch.cat(modes, 1), torch.stack(want_modes, 1))
    torch.testing.assert_close(torch.cat(got, 1), torch.stack(want, 1), **TOL)
    assert_states_equal(restored, state)


class Recorder:
    def __init__(self):
        self.served, self.modes = {}, {}

    def __call__(self, rec):
        for i, sid in enumerate(rec.series_ids):
            self.served[(sid, int(rec.tokens_R[i]))] = rec.served_RHzCQ[i]
            self.modes[(sid, int(rec.tokens_R[i]))] = float(rec.modes_R[i])


def test_chunked_engine_prefill_of_a_long_stream_equals_ingest_and_flush_in_bounded_memory(mixer, monkeypatch):
    block = {"retention": "bounded", "window": 16, "pinned": 4}
    routed = RoutedForecaster(random_model(mixer, block=block), RandomRouter(0.2, seed=4), BudgetConfig(fraction=0.3, window=8))
    T, chunk = 1000, 64
    rng = np.random.default_rng(3)
    values = (rng.normal(size=(T * P + 5, C)).cumsum(0) * 0.3).astype(np.float32)
    values[rng.random(values.shape) < 0.02] = np.nan
    stamps = np.arange(len(values))
    head, tail = 37 * P + 3, T * P - 21  # streamed before (ends inside a patch), prefilled, streamed after
    runs = {}
    for use_prefill in (False, True):
        rec = Recorder()
        engine = Engine(routed, adapter=AdapterConfig(enabled=False), on_step=rec)
        engine.add_series("s", step=1, origin=0, labels=[(2000, 2400), (7000, 7100)])
        engine.ingest("s", stamps[:head], values[:head])
        engine.flush()
        if use_prefill:
            calls, keys = [], []
            inner, attend = routed.model.prefill, dispatch.routed_attention
            monkeypatch.setattr(routed.model, "prefill", lambda x, *a, **k: calls.append(x.shape[1] // P) or inner(x, *a, **k))
            monkeypatch.setattr(dispatch, "routed_attention", lambda q, k, *a, **kw: keys.append((q.shape[1], k.shape[1])) or attend(q, k, *a, **kw))
            engine.prefill("s", stamps[head:tail], values[head:tail], chunk_tokens=chunk)
            monkeypatch.undo()
            # memory per chunk: at most `chunk` tokens, each query over the retained slots plus the chunk's keys
            assert sum(calls) == (tail - 37 * P) // P and max(calls) == chunk
            assert keys and all(q <= chunk and k <= 16 + 4 + chunk for q, k in keys)
        else:
            engine.ingest("s", stamps[head:tail], values[head:tail])
        engine.flush()
        engine.ingest("s", stamps[tail:], values[tail:])
        engine.flush()
        runs[use_prefill] = (rec, engine.audit("s"), engine.forecast("s"))
    (r0, a0, f0), (r1, a1, f1) = runs[False], runs[True]
    assert set(r0.served) == set(r1.served) and len(r0.served) == T
    assert r0.modes == r1.modes
    # over 1,000 tokens fp32 rounding reaches a few 1e-4 in data units: compare on the stream's scale
    tol = {"rtol": 1e-4, "atol": 1e-4 * float(np.nanstd(values))}
    np.testing.assert_allclose(np.stack([r1.served[k] for k in sorted(r0.served)]),
                               np.stack([r0.served[k] for k in sorted(r0.served)]), **tol)
    np.testing.assert_allclose(f1.values, f0.values, **tol)
    for k in ("tokens", "matured_entries", "state_bytes", "state_bytes_history", "window_recall", "windows_seen", "attention_rate"):
        assert a1[k] == a0[k], k
    for k in ("mae_served", "crps_served", "mae_frozen", "mae_in_windows", "mae_outside_windows", "flops_spent", "flops_allowed"):
        assert a1[k] == pytest.approx(a0[k], rel=1e-5), k


def test_attention_over_a_long_cache_runs_in_query_groups(monkeypatch):
    model = random_model("gdn")
    x, modes = stream(2, 30, seed=9)
    with torch.no_grad():
        want, want_state = prefill_chunks(model, x, modes, model.init_state(2, capacity=4), [11])
        monkeypatch.setattr(block_module, "ATTENTION_LOGITS", 1)  # one routed query per call
        got, state = prefill_chunks(model, x, modes, model.init_state(2, capacity=4), [11])
    torch.testing.assert_close(got, want, **TOL)
    assert_states_equal(state, want_state)
