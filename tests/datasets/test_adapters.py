"""Peers (gluonts, pytorch-forecasting) must train on exactly our values and our split, so every adapter
must round-trip the stream bit for bit."""

import numpy as np
import pytest

from oryx_ts.datasets import SyntheticConfig, TelemetryStream, adapters, generate

pytest.importorskip("pandas", reason="adapters need the forecasting extra (pandas)")


@pytest.fixture(scope="module")
def stream() -> TelemetryStream:
    return generate(3_000, 3, seed=2, config=SyntheticConfig(missing_rate=0.05))


def test_freq_follows_the_step(stream):
    assert adapters.freq_of(stream) == "5min"
    assert adapters.freq_of(TelemetryStream(np.zeros((3, 1), np.float32), step=np.timedelta64(3600, "s"))) == "1h"
    assert adapters.freq_of(TelemetryStream(np.zeros((3, 1), np.float32)), default="D") == "D"


def test_long_frame_round_trip(stream):
    frame = adapters.to_long_frame(stream)
    assert frame["value"].notna().all() and len(frame) == np.isfinite(stream.values).sum()
    back = adapters.from_long_frame(frame, length=len(stream))
    assert np.array_equal(back.values, stream.values, equal_nan=True)
    assert back.channels == stream.channels and back.start == stream.start and back.step == stream.step


@pytest.mark.parametrize("multivariate", [False, True])
def test_gluonts_round_trip(stream, multivariate):
    pytest.importorskip("gluonts", reason="needs the forecasting extra (gluonts)")
    dataset = adapters.to_gluonts(stream, multivariate=multivariate)
    back = adapters.from_gluonts(dataset, multivariate=multivariate)
    assert np.array_equal(back.values, stream.values, equal_nan=True)
    assert back.start == stream.start and back.step == stream.step
    train = adapters.to_gluonts(stream, end=2_000, multivariate=multivariate)
    assert np.array_equal(adapters.from_gluonts(train, multivariate=multivariate).values, stream.values[:2_000],
                          equal_nan=True)


def test_gluonts_entries_follow_gluonts_conventions(stream):
    pytest.importorskip("gluonts", reason="needs the forecasting extra (gluonts)")
    entries = list(adapters.to_gluonts(stream))
    assert [e["item_id"] for e in entries] == list(stream.channels)
    assert str(entries[0]["start"]) == "2024-01-01 00:00" and entries[0]["target"].dtype == np.float32
    (multi,) = list(adapters.to_gluonts(stream, multivariate=True))
    assert multi["target"].shape == (3, 3_000)


def test_timeseries_datasets_share_our_split(stream):
    pytest.importorskip("pytorch_forecasting", reason="needs the forecasting extra (pytorch-forecasting)")
    split, encoder, horizon = 2_000, 64, 16
    train, validation = adapters.to_timeseries_datasets(stream, split, max_encoder_length=encoder,
                                                        max_prediction_length=horizon)
    assert np.array_equal(adapters.from_timeseries_dataset(train, length=split).values, stream.values[:split],
                          equal_nan=True)
    held = adapters.from_timeseries_dataset(validation, length=len(stream)).values
    assert np.array_equal(held[split - encoder :], stream.values[split - encoder :], equal_nan=True)
    batch = next(iter(train.to_dataloader(batch_size=10**6, train=False)))[0]
    assert train.x_to_index(batch)["time_idx"].max() + horizon <= split  # no training target after the split
    batch = next(iter(validation.to_dataloader(batch_size=10**6, train=False)))[0]
    assert validation.x_to_index(batch)["time_idx"].min() >= split
    with pytest.raises(ValueError, match="split"):
        adapters.to_timeseries_datasets(stream, 10, max_encoder_length=encoder, max_prediction_length=horizon)
