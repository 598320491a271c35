"""The online engine: sources, regularizer, engine, online adaptation and state stores."""

from oryx_ts.streams.adapter import Adapter, AdapterConfig, AdapterState
from oryx_ts.streams.engine import Engine
from oryx_ts.streams.records import Forecast, ForecastState, IngestResult, StepRecord
from oryx_ts.streams.regularizer import Regularizer, RegularizerPolicy, Rejection
from oryx_ts.streams.store import FileStore, MemoryStore, StateStore

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterState",
    "Engine",
    "FileStore",
    "Forecast",
    "ForecastState",
    "IngestResult",
    "MemoryStore",
    "Regularizer",
    "RegularizerPolicy",
    "Rejection",
    "StateStore",
    "StepRecord",
]
