"""Fake wheels for the packaged-dataset tests: tiny files in each dataset's format, at the real paths."""

import dataclasses
import hashlib
import lzma
import zipfile

import pytest

from oryx_ts.datasets.packaged import DATASETS

HOUSEHOLD = (
    "Date,Time,Global_active_power,Global_reactive_power,Voltage,Global_intensity,Sub_metering_1,"
    "Sub_metering_2,Sub_metering_3\r\n"
    "16/12/2006,17:24:00,4.216,0.418,234.840,18.400,0.000,1.000,17.000\r\n"
    "16/12/2006,17:25:00,?,?,?,?,?,?,\r\n"
    "16/12/2006,17:26:00,5.374,0.498,233.290,23.000,0.000,2.000,17.000\r\n"
)
ENERGY_COLUMNS = ["Appliances", "lights"] + [f"{p}{i}" for i in range(1, 10) for p in ("T", "RH_")] + [
    "T_out", "Press_mm_hg", "RH_out", "Windspeed", "Visibility", "Tdewpoint", "rv1", "rv2"]
ENERGY = '"date",' + ",".join(f'"{c}"' for c in ENERGY_COLUMNS) + "\r\n" + "".join(
    f'"2016-01-11 17:{m}0:00","  {60 + m}",' + ",".join(f'"{m + i / 7:.15f}"' for i in range(27)) + "\r\n"
    for m in range(3))
NAB = "timestamp,value,anomaly\n" + "".join(
    f"2013-12-02 21:{m:02d}:00,{70 + m / 10},{int(10 <= m < 20)}\n" for m in range(0, 40, 5))
UCR_TEST = "timestamp,value,is_anomaly\n" + "".join(f"{i},{60 + i * 0.5},{int(i in (6, 7))}\n" for i in range(10))
UCR_TRAIN = "timestamp,value,is_anomaly\n" + "".join(f"{i},{60 + i * 0.5},0\n" for i in range(4))
MITDB = "data,label\n" + "".join(f"{-0.2 + i / 100},{int(i >= 5)}\n" for i in range(8))

FAKE = {
    "household_power": [lzma.compress(HOUSEHOLD.encode())],
    "energy_appliance": [lzma.compress(ENERGY.encode())],
    "nab_machine_temperature": [NAB.encode()],
    "ucr_internal_bleeding16": [UCR_TEST.encode(), UCR_TRAIN.encode()],
    "mitdb": [MITDB.encode()],
}


def make_wheel(cache, spec, contents) -> str:
    """A wheel-shaped zip holding `contents` at the spec's member paths, as pip would name it."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{spec.package}-{spec.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{spec.package}/__init__.py", "")
        for member, data in zip(spec.members, contents):
            archive.writestr(member, data)
    return path


def faked(name: str):
    """The registered spec with the sha256 of our fake members instead of the real ones."""
    return dataclasses.replace(DATASETS[name], sha256=tuple(hashlib.sha256(d).hexdigest() for d in FAKE[name]))


@pytest.fixture
def fake_wheel():
    """Write a fake wheel for dataset `name` into `cache`; returns the spec whose checksums match it."""

    def build(name: str, cache):
        spec = faked(name)
        make_wheel(cache, spec, FAKE[name])
        return spec

    return build
