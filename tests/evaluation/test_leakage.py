"""No forecast sees the future: perturbing every row after an origin changes no forecast made at or before it,
for oryx through the engine (online adaptation on, which learns from matured targets) and for every peer."""

import numpy as np
import pytest
import torch

from oryx_ts import OryxForecaster, preset
from oryx_ts.datasets import generate
from oryx_ts.evaluation.backtest import backtest_streams
from oryx_ts.evaluation.peers import PeerBudget, make_peer
from oryx_ts.routers import BudgetConfig, RoutedForecaster, SurpriseRouter
from oryx_ts.streams.adapter import AdapterConfig

HORIZON, QUANTILES = 8, (0.1, 0.5, 0.9)


@pytest.fixture(scope="module")
def values():
    return generate(1600, 2, seed=3).values


def _perturbed(values: np.ndarray, after: int) -> np.ndarray:
    other = values.copy()
    rng = np.random.default_rng(0)
    other[after + 1 :] = rng.normal(50.0, 20.0, other[after + 1 :].shape)
    other[after + 1 :: 7, 0] = np.nan
    return other


def test_oryx_engine_forecasts_ignore_the_future(values):
    torch.manual_seed(0)
    config = preset("debug").replace(tokenizer={"channels": 2}, head={"horizon": HORIZON})
    routed = RoutedForecaster(OryxForecaster(config).eval(), SurpriseRouter(), BudgetConfig(fraction=0.1, window=16))
    P = config.tokenizer.patch_len
    x = values[: 64 * P]
    origin = 40 * P - 1  # last row of token 39
    adapter = AdapterConfig(guard_min=8)
    a = backtest_streams(routed, {"s": x}, adapter=adapter)["s"]
    b = backtest_streams(routed, {"s": _perturbed(x, origin)}, adapter=adapter)["s"]
    n = (origin + 1) // P  # tokens 0..n-1 end at or before the origin
    np.testing.assert_array_equal(a.forecasts_THzCQ[:n], b.forecasts_THzCQ[:n])
    np.testing.assert_array_equal(a.modes_T[:n], b.modes_T[:n])
    assert not np.allclose(a.forecasts_THzCQ[n:], b.forecasts_THzCQ[n:])  # the test can fail: later tokens do change


PEERS = ["seasonal_naive", "nhits", "patchtst", "deepar"]


@pytest.mark.parametrize("name", PEERS)
def test_peer_forecasts_ignore_the_future(values, name):
    if name != "seasonal_naive":
        pytest.importorskip("gluonts" if name != "nhits" else "pytorch_forecasting", reason="the forecasting extra")
    peer = make_peer(name, horizon=HORIZON, quantiles=QUANTILES, period=16,
                     budget=PeerBudget(epochs=1, batches_per_epoch=2, batch_size=8, context=32), progress=False)
    train = values[:1200]
    if name == "seasonal_naive":
        peer.fit(train, freq="5min", start=np.datetime64("2024-01-01"), horizon=HORIZON)
    else:
        peer.fit(train, freq="5min", start=np.datetime64("2024-01-01"))
    ends = np.arange(1207, 1500, 24)
    origin = int(ends[len(ends) // 2])
    a = peer.predict(values, ends, HORIZON)
    b = peer.predict(_perturbed(values, origin), ends, HORIZON)
    assert a.shape == (len(ends), HORIZON, 2, len(QUANTILES)) and np.isfinite(a).all()
    early = ends <= origin
    np.testing.assert_allclose(a[early], b[early], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[~early], b[~early])  # the test can fail: origins after the change do move
