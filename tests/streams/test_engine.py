"""The engine is the one streaming runtime: per series it must reproduce the parallel forward whatever shares its micro-batches, survive snapshots bit for bit, account for every observation, and never score a forecast against a value it has not seen."""

import numpy as np
import pytest
import torch

from oryx_ts.routers import AllRouter, BudgetConfig, NoneRouter, RandomRouter, RoutedForecaster, SurpriseRouter
from oryx_ts.streams.adapter import AdapterConfig
from oryx_ts.streams.engine import Engine, StepRecord
from oryx_ts.streams.store import FileStore, MemoryStore
from tests.conftest import random_model

P, C = 8, 4
OFF = AdapterConfig(enabled=False)
RETENTIONS = {"all": {}, "bounded": {"retention": "bounded", "window": 6, "pinned": 3}}
ROUTERS = {"all-0": NoneRouter, "all-1": AllRouter, "random": lambda: RandomRouter(0.4, seed=1)}


def streams(n: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": (rng.normal(size=(tokens * P, C)).cumsum(0) * 0.3).astype(np.float32) for i in range(n)}


class Recorder:
    def __init__(self):
        self.frozen, self.served, self.modes = {}, {}, {}

    def __call__(self, rec: StepRecord) -> None:
        for i, sid in enumerate(rec.series_ids):
            n = int(rec.tokens_R[i])
            assert (sid, n) not in self.frozen, "a token was stepped twice"
            self.frozen[sid, n], self.served[sid, n], self.modes[sid, n] = rec.frozen_RHzCQ[i], rec.served_RHzCQ[i], rec.modes_R[i]

    def stack(self, sid: str, what: str = "frozen") -> np.ndarray:
        got = getattr(self, what)
        return np.stack([got[sid, n] for n in range(sum(1 for k in got if k[0] == sid))])


def schedule(data: dict[str, np.ndarray], starts: dict[str, int], seed: int, rounds: int) -> list[list]:
    """Per round: `(series, first_row, rows)` ingests in random order and random chunk sizes, then a flush or not."""
    rng = np.random.default_rng(seed)
    cursor = {sid: 0 for sid in data}
    plan = []
    for r in range(rounds):
        events = []
        for sid in rng.permutation(list(data)):
            if r < starts[sid] or cursor[sid] >= len(data[sid]):
                continue
            k = int(rng.integers(1, 2 * P + 1))
            events.append((str(sid), cursor[sid], k))
            cursor[sid] += k
        plan.append([events, bool(rng.random() < 0.6)])
    return plan


def replay(engine: Engine, data: dict[str, np.ndarray], plan: list[list]) -> None:
    for events, flush in plan:
        for sid, start, k in events:
            part = data[sid][start : start + k]
            result = engine.ingest(sid, np.arange(start, start + len(part)), part)
            assert result.accepted == len(part) and not result.rejected
        if flush:
            engine.flush()


@pytest.mark.parametrize("retention", list(RETENTIONS))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_each_series_equals_its_own_parallel_forward_inside_mixed_batches(mixer, retention, router):
    model = random_model(mixer, block=RETENTIONS[retention])
    routed = RoutedForecaster(model, ROUTERS[router]())
    data = streams(8, 12, seed=hash((mixer, retention, router)) % 1000)
    rng = np.random.default_rng(0)
    rec = Recorder()
    engine = Engine(routed, adapter=OFF, max_batch=3, capacity=4, on_step=rec)
    starts = {sid: int(rng.integers(0, 10)) for sid in data}
    for sid in data:
        engine.add_series(sid, step=1, origin=0)
    replay(engine, data, schedule(data, starts, seed=1, rounds=200))
    engine.flush()
    for sid, values in data.items():
        ref = routed(torch.from_numpy(values)[None])
        got = rec.stack(sid)
        assert got.shape == ref.forecast.shape[1:]
        # step against the chunked parallel forward: fp32 rounding only
        np.testing.assert_allclose(got, ref.forecast[0].numpy(), rtol=1e-4, atol=1e-4)
        assert np.array_equal(np.stack([rec.modes[sid, n] for n in range(12)]), ref.modes_BT[0].numpy())
        np.testing.assert_array_equal(engine.forecast(sid).values, got[-1])  # adaptation off: served = frozen


@pytest.mark.parametrize("retention", list(RETENTIONS))
def test_a_snapshot_restored_into_a_fresh_engine_continues_bit_for_bit(mixer, retention, tmp_path):
    model = random_model(mixer, block=RETENTIONS[retention])
    routed = RoutedForecaster(model, SurpriseRouter(), BudgetConfig(fraction=0.3, window=8))
    data = streams(5, 14, seed=3)
    starts = {sid: i for i, sid in enumerate(data)}
    labels = [(40, 60)]

    plan = schedule(data, starts, seed=7, rounds=120)

    def run(snapshot_at: int | None, store):
        rec = Recorder()
        engine = Engine(routed, store, max_batch=2, capacity=4, on_step=rec)  # adaptation on: its state must survive too
        for sid in data:
            engine.add_series(sid, step=1, origin=0, labels=labels)
        if snapshot_at is None:
            replay(engine, data, plan)
        else:
            replay(engine, data, plan[:snapshot_at])
            engine.snapshot()
            engine = Engine(routed, store, max_batch=2, capacity=4, on_step=rec)
            assert engine.restore() == len(data)
            replay(engine, data, plan[snapshot_at:])
        engine.flush()
        return rec, engine

    straight, e1 = run(None, MemoryStore())
    resumed, e2 = run(30, FileStore(tmp_path / "snap"))
    assert set(straight.served) == set(resumed.served)
    for key in straight.served:
        assert np.array_equal(straight.served[key], resumed.served[key]), key
    for sid in data:
        a, b = e1.audit(sid), e2.audit(sid)
        assert a["mae_served"] == b["mae_served"] and a["adapter_rollbacks"] == b["adapter_rollbacks"]


def test_every_observation_is_accepted_once_or_rejected_with_a_reason():
    model = random_model("gdn")
    rng = np.random.default_rng(11)
    L = 160
    truth = rng.normal(size=(L, C)).astype(np.float32)
    keep = rng.random(L) > 0.15  # gaps
    rows_t, rows_v, expected_bad = [], [], 0
    for t in np.flatnonzero(keep):
        rows_t.append(int(t))
        rows_v.append(list(truth[t]))
    bad = [(5, [1.0, 2.0]), (9, [np.inf, 0, 0, 0]), (12, [np.nan] * C), (3.5, [0.0] * C)]
    engine = Engine(model, adapter=OFF)
    engine.add_series("x", step=1, origin=0)
    reference = np.full((L, C), np.nan, dtype=np.float32)
    accepted_rows = 0
    rec = Recorder()
    engine.on_step = rec
    for chunk in np.array_split(np.arange(len(rows_t)), 20):
        ts = [rows_t[i] for i in chunk]
        vs = [rows_v[i] for i in chunk]
        # a duplicate of the first row and a shuffled copy of its order: late rows are refused once released
        if len(ts) > 2:
            ts, vs = ts + [ts[0]], vs + [vs[0]]
            perm = rng.permutation(len(ts))
            ts, vs = [ts[i] for i in perm], [vs[i] for i in perm]
        for t, v in bad[:1] if rng.random() < 0.5 else bad:
            ts, vs = ts + [t], vs + [v]
            expected_bad += 1
        result = engine.ingest("x", np.asarray(ts, dtype=np.float64), vs)
        assert all(r.reason and r.detail for r in result.rejected)
        rejected = {r.index for r in result.rejected}
        for i, (t, v) in enumerate(zip(ts, vs)):
            if i not in rejected:
                assert np.isnan(reference[int(t)]).all(), f"row {t} accepted twice"
                reference[int(t)] = v
                accepted_rows += 1
        engine.flush()
    engine.advance("x", L - 1)
    engine.flush()
    audit = engine.audit("x")
    assert sum(audit["rejected"].values()) >= expected_bad
    assert {"wrong_width", "not_finite"} <= set(audit["rejected"])
    # what was accepted, and only that, is what the model consumed: the forecasts equal a forward over the reference grid
    T = L // P
    accepted_grid = reference[: T * P]
    with torch.no_grad():
        ref = model(torch.from_numpy(accepted_grid)[None])[0].numpy()
    np.testing.assert_allclose(rec.stack("x"), ref, rtol=1e-4, atol=1e-4)
    assert accepted_rows == int((~np.isnan(reference).all(1)).sum())


def test_no_forecast_is_scored_against_a_value_before_it_was_ingested():
    model = random_model("gdn")
    Hz = model.config.head.horizon
    rng = np.random.default_rng(5)
    values = rng.normal(size=(10 * P, C)).astype(np.float32)
    rec = Recorder()
    engine = Engine(model, adapter=OFF, on_step=rec)
    engine.add_series("x", step=1, origin=0)
    for n in range(10):
        engine.ingest("x", np.arange(n * P, (n + 1) * P), values[n * P : (n + 1) * P])
        engine.flush()
        # brute force: every (origin j, horizon h) whose target step lies inside the patches ingested so far
        last = (n + 1) * P - 1
        expected_entries = sum(1 for j in range(n + 1) for h in range(Hz) if (j + 1) * P + h <= last) * C
        mae = []
        for j in range(n + 1):
            for h in range(Hz):
                t = (j + 1) * P + h
                if t <= last:
                    mae.append(np.abs(rec.frozen[("x", j)][h, :, model.config.head.median_index] - values[t]))
        audit = engine.audit("x")
        assert audit["matured_entries"] == expected_entries
        if mae:
            # errors are kept in each origin's normalized units: compare counts exactly and recompute in data units from the record
            assert np.isfinite(audit["mae_frozen"]) and audit["mae_frozen"] > 0
    # the future must not leak: changing values not yet ingested changes no score so far
    before = engine.audit("x")
    engine2 = Engine(model, adapter=OFF)
    engine2.add_series("x", step=1, origin=0)
    poisoned = values.copy()
    poisoned[-P:] += 1000.0
    for n in range(9):
        engine2.ingest("x", np.arange(n * P, (n + 1) * P), poisoned[n * P : (n + 1) * P])
    engine2.flush()
    engine3 = Engine(model, adapter=OFF)
    engine3.add_series("x", step=1, origin=0)
    for n in range(9):
        engine3.ingest("x", np.arange(n * P, (n + 1) * P), values[n * P : (n + 1) * P])
    engine3.flush()
    assert engine2.audit("x")["mae_frozen"] == engine3.audit("x")["mae_frozen"]
    assert before["matured_entries"] > engine3.audit("x")["matured_entries"]


def test_adaptation_lowers_the_error_after_a_level_shift_and_holds_on_a_stationary_stream():
    model = random_model("gdn")
    rng = np.random.default_rng(2)
    L = 400 * P
    t = np.arange(L)
    base = np.sin(2 * np.pi * t / 48)[:, None] + 0.3 * rng.normal(size=(L, C))
    shifted = base + np.where(t >= L // 2, 4.0, 0.0)[:, None]
    results = {}
    for name, values in (("stationary", base), ("shift", shifted)):
        for enabled in (False, True):
            engine = Engine(model, adapter=AdapterConfig(enabled=enabled))
            engine.add_series("x", step=1, origin=0)
            engine.ingest("x", t, values.astype(np.float32))
            engine.flush()
            results[name, enabled] = engine.audit("x")
    shift_on, shift_off = results["shift", True], results["shift", False]
    assert shift_on["crps_served"] < 0.97 * shift_off["crps_served"]
    assert results["stationary", True]["crps_served"] <= 1.01 * results["stationary", False]["crps_served"]
    assert shift_on["adaptation_gain"] > 0.03


def test_series_come_and_go_and_bad_requests_change_nothing():
    model = random_model("gdn")
    engine = Engine(model, adapter=OFF)
    engine.add_series("a", step=1, origin=0)
    with pytest.raises(ValueError, match="already exists"):
        engine.add_series("a")
    with pytest.raises(KeyError, match="unknown series"):
        engine.ingest("nope", [0], [[0.0] * C])
    with pytest.raises(ValueError, match="no forecast yet"):
        engine.forecast("a")
    engine.ingest("a", np.arange(2 * P), np.ones((2 * P, C), dtype=np.float32))
    engine.flush()
    before = engine.forecast("a")
    with pytest.raises(ValueError):
        engine.ingest("a", np.arange(3), np.ones((2, C)))  # lengths differ: the whole batch is refused
    assert engine.forecast("a").token == before.token
    engine.add_series("b", step=1, origin=0)
    engine.remove_series("a")
    engine.add_series("c", step=1, origin=0)  # reuses a's row, from an empty state
    with pytest.raises(ValueError, match="no forecast yet"):
        engine.forecast("c")
    assert engine.audit("c")["tokens"] == 0 and engine.audit("c")["matured_entries"] == 0


def test_bounded_state_bytes_stay_constant_and_labels_are_recalled():
    model = random_model("gdn", block=RETENTIONS["bounded"])
    routed = RoutedForecaster(model, AllRouter(), BudgetConfig(fraction=0.5, window=4))
    engine = Engine(routed, state_bytes_every=5)
    engine.add_series("x", step=1, origin=0, labels=[(80, 100), (200, 220)])
    values = np.random.default_rng(1).normal(size=(40 * P, C)).astype(np.float32)
    engine.ingest("x", np.arange(len(values)), values)
    engine.flush()
    audit = engine.audit("x")
    sizes = {b for _, b in audit["state_bytes_history"]}
    assert len(audit["state_bytes_history"]) == 8 and len(sizes) == 1
    assert audit["window_recall"] == 1.0 and audit["labelled_windows"] == 2
    assert 0 < audit["attention_rate"] < 1 and audit["realized_over_allowance"] <= 1 + 1e-9


def test_forecast_timestamps_follow_the_series_clock():
    model = random_model("gdn")
    engine = Engine(model, adapter=OFF)
    engine.add_series("x", step=10, origin=0)
    start = 1000  # the first row lies on the grid, far from its origin
    values = np.random.default_rng(0).normal(size=(2 * P, C)).astype(np.float32)
    engine.ingest("x", start + 10 * np.arange(2 * P), values)
    engine.flush()
    f = engine.forecast("x")
    assert f.token == 1 and f.origin_timestamp == start + 10 * (2 * P - 1)
    assert np.array_equal(f.timestamps, f.origin_timestamp + 10 * np.arange(1, model.config.head.horizon + 1))


@pytest.mark.slow
def test_a_compiled_engine_serves_what_the_eager_one_does():
    model = random_model("gdn", block=RETENTIONS["bounded"])
    data = streams(1, 20, seed=4)["s0"]
    served = {}
    for compiled in (False, True):
        rec = Recorder()
        engine = Engine(RoutedForecaster(model, RandomRouter(0.4, seed=2)), compile=compiled, on_step=rec)
        engine.add_series("s0", step=1, origin=0)
        for n in range(20):
            engine.ingest("s0", np.arange(n * P, (n + 1) * P), data[n * P : (n + 1) * P])
            engine.flush()
        served[compiled] = rec.stack("s0", "served")
        assert engine.audit("s0")["matured_entries"] > 0
    # inductor reorders fp32 arithmetic: equal within rounding, modes identical
    np.testing.assert_allclose(served[True], served[False], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("retention", list(RETENTIONS))
def test_prefill_then_ingest_equals_ingesting_everything(mixer, retention):
    model = random_model(mixer, block=RETENTIONS[retention])
    routed = RoutedForecaster(model, RandomRouter(0.3, seed=5), BudgetConfig(fraction=0.4, window=6))
    values = streams(1, 30, seed=8)["s0"]
    cut = 17 * P + 3  # the history ends inside a patch
    runs = {}
    for use_prefill in (False, True):
        rec = Recorder()
        engine = Engine(routed, adapter=OFF, capacity=4, on_step=rec)
        engine.add_series("s0", step=1, origin=0, labels=[(60, 90)])
        head = (np.arange(cut), values[:cut])
        (engine.prefill if use_prefill else engine.ingest)("s0", *head)
        engine.flush()
        for n in range(cut, len(values), 5):
            engine.ingest("s0", np.arange(n, min(n + 5, len(values))), values[n : n + 5])
            engine.flush()
        runs[use_prefill] = (rec, engine.audit("s0"), engine.forecast("s0"))
    (r0, a0, f0), (r1, a1, f1) = runs[False], runs[True]
    assert set(r0.served) == set(r1.served)
    for key in r0.served:
        np.testing.assert_allclose(r1.served[key], r0.served[key], rtol=1e-4, atol=1e-4)
        assert r1.modes[key] == r0.modes[key]
    np.testing.assert_allclose(f1.values, f0.values, rtol=1e-4, atol=1e-4)
    for k in ("tokens", "matured_entries", "state_bytes", "window_recall", "attention_rate"):
        assert a1[k] == a0[k] or (np.isnan(a1[k]) and np.isnan(a0[k])), k
    for k in ("mae_served", "crps_served", "mae_in_windows", "mae_outside_windows", "flops_spent"):
        assert a1[k] == pytest.approx(a0[k], rel=1e-5), k


def test_prefill_refuses_surprise_routers_and_queued_patches():
    model = random_model("gdn")
    engine = Engine(RoutedForecaster(model, SurpriseRouter()))
    engine.add_series("x", step=1, origin=0)
    with pytest.raises(ValueError, match="earlier forecasts"):
        engine.prefill("x", np.arange(16), np.zeros((16, C), dtype=np.float32))
    plain = Engine(model)
    plain.add_series("x", step=1, origin=0)
    plain.ingest("x", np.arange(P), np.zeros((P, C), dtype=np.float32))
    with pytest.raises(ValueError, match="flush before a prefill"):
        plain.prefill("x", np.arange(P, P + 16), np.zeros((16, C), dtype=np.float32))
    with pytest.raises(ValueError, match="chunk_tokens"):
        plain.prefill("x", np.arange(P, P + 16), np.zeros((16, C), dtype=np.float32), chunk_tokens=0)
