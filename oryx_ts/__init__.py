"""oryx_ts: a streaming multivariate forecaster built on Oryx multi-mixer blocks."""

from oryx_ts.checkpoint import load, save, with_retention
from oryx_ts.config import OryxConfig, preset
from oryx_ts.model import OryxForecaster
from oryx_ts.state import State

__all__ = ["OryxConfig", "OryxForecaster", "State", "load", "preset", "save", "with_retention"]
__version__ = "0.1.0"
