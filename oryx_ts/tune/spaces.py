"""Search spaces as data next to the model: which config fields a sweep varies, and over what.

A `Space` names config fields by `section.key` (the same names as `--set`), each with a `Param`:
a grid of values, a categorical choice, or a uniform / log-uniform / integer range. Every sample
becomes a typed `OryxConfig` through `parse_overrides` on the space's base config before it
touches the model, so a value of the wrong type or an invalid combination fails with the config's
own `ValueError`; `Space.check()` runs that on every grid point (or the ends of every range) before
any trial starts.

Spaces come from `SPACES` by name or from a JSON or YAML file:

    {"name": "mine", "base": "debug", "overrides": ["train.steps=200"],
     "params": {"budget.fraction": {"grid": [0.05, 0.1]}, "block.mixer": {"choice": ["gdn", "mamba2"]},
                "train.lr": {"loguniform": [1e-4, 1e-2]}, "block.pinned": {"int": [0, 64]}}}

Fields in `SHARED_SECTIONS` / `SHARED_BLOCK_FIELDS` do not change how the forecaster trains, so a
space that varies only those shares one trained forecaster across its trials; retention
(`block.retention`, `block.window`, `block.pinned`) counts as a deployment setting: the shared
forecaster trains under the base config's retention and is evaluated under each trial's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from oryx_ts.config import OryxConfig, parse_overrides, preset

__all__ = ["Param", "Space", "SPACES", "SHARED_SECTIONS", "SHARED_BLOCK_FIELDS", "load_space", "forecaster_key"]

Kind = Literal["grid", "choice", "uniform", "loguniform", "int"]
KINDS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "int")
SHARED_SECTIONS = ("router", "budget")
SHARED_BLOCK_FIELDS = ("retention", "window", "pinned")


@dataclass(frozen=True)
class Param:
    """One swept field: `values` for grid/choice, `low`/`high` for the ranges (inclusive)."""

    kind: Kind
    values: tuple = ()
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a parameter's kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in ("grid", "choice"):
            if not self.values:
                raise ValueError(f"a {self.kind} parameter needs at least one value")
        elif self.low is None or self.high is None or not self.low <= self.high:
            raise ValueError(f"a {self.kind} parameter needs low <= high, got [{self.low}, {self.high}]")
        elif self.kind == "loguniform" and not self.low > 0:
            raise ValueError(f"a loguniform parameter needs low > 0, got {self.low}")

    def corners(self) -> tuple:
        """The values `Space.check` validates: every listed value, or both ends of a range."""
        if self.kind in ("grid", "choice"):
            return self.values
        if self.kind == "int":
            return (int(self.low), int(self.high))
        return (float(self.low), float(self.high))

    def to_dict(self) -> dict:
        return {self.kind: list(self.values) if self.kind in ("grid", "choice") else [self.low, self.high]}

    @classmethod
    def from_dict(cls, data: Any, *, name: str = "?") -> Param:
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"parameter {name!r}: expected one of {{{', '.join(KINDS)}}}: [...], got {data!r}")
        (kind, arg), = data.items()
        if kind not in KINDS or not isinstance(arg, list):
            raise ValueError(f"parameter {name!r}: expected one of {{{', '.join(KINDS)}}}: [...], got {data!r}")
        if kind in ("grid", "choice"):
            return cls(kind, values=tuple(arg))
        if len(arg) != 2:
            raise ValueError(f"parameter {name!r}: a {kind} range is [low, high], got {arg!r}")
        return cls(kind, low=arg[0], high=arg[1])


def _text(value: Any) -> str:
    """A sample's value as `--set` text; an integral float (80.0 from a JSON range) also reads as an int field."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


@dataclass(frozen=True)
class Space:
    """A named sweep: the base config (`base` preset plus `overrides`) and the fields it varies."""

    name: str
    params: dict[str, Param]
    base: str = "debug"
    overrides: tuple[str, ...] = ()
    description: str = ""
    base_config_: OryxConfig | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.params:
            raise ValueError(f"space {self.name!r} varies nothing: give at least one parameter")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "base_config_", parse_overrides(preset(self.base), list(self.overrides)))

    @property
    def mode(self) -> Literal["grid", "search"]:
        """`grid` when every parameter is a grid (every point runs), else `search` (Optuna samples)."""
        return "grid" if all(p.kind == "grid" for p in self.params.values()) else "search"

    @property
    def shared_forecaster(self) -> bool:
        """True when no parameter changes how the forecaster trains (one trained forecaster serves every trial)."""
        return all(_is_shared(key) for key in self.params)

    def base_config(self) -> OryxConfig:
        assert self.base_config_ is not None
        return self.base_config_

    def config(self, sample: dict[str, Any], base: OryxConfig | None = None) -> OryxConfig:
        """The typed config of one sample `{"section.key": value}`; raises the config's `ValueError`."""
        unknown = set(sample) - set(self.params)
        if unknown:
            raise ValueError(f"sample sets {sorted(unknown)}, which space {self.name!r} does not vary ({sorted(self.params)})")
        return parse_overrides(base or self.base_config(), [f"{k}={_text(v)}" for k, v in sorted(sample.items())])

    def grid(self) -> list[dict[str, Any]]:
        """Every point of a grid space, in the order its values are listed (last parameter fastest)."""
        if self.mode != "grid":
            raise ValueError(f"space {self.name!r} has ranges or choices; it is searched, not enumerated")
        keys = list(self.params)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.params[k].values for k in keys))]

    def check(self) -> None:
        """Validate the space before any trial: every grid point, or every listed value and range end
        against the base config. Raises the config's `ValueError`, prefixed with the space's name."""
        samples = self.grid() if self.mode == "grid" else [{k: v} for k, p in self.params.items() for v in p.corners()]
        for sample in samples:
            try:
                self.config(sample)
            except (ValueError, TypeError) as e:
                raise ValueError(f"space {self.name!r}, sample {sample}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "overrides": list(self.overrides), "description": self.description,
                "params": {k: p.to_dict() for k, p in self.params.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> Space:
        if not isinstance(data, dict):
            raise ValueError(f"a space must be an object, got {type(data).__name__}")
        bad = set(data) - {"name", "base", "overrides", "description", "params"}
        if bad:
            raise ValueError(f"unknown keys {sorted(bad)} in a space; expected name, base, overrides, description, params")
        params = data.get("params")
        if not isinstance(params, dict):
            raise ValueError("a space needs `params`: an object of section.key -> {grid|choice|uniform|loguniform|int: [...]}")
        return cls(name=str(data.get("name", "space")), base=str(data.get("base", "debug")),
                   overrides=tuple(data.get("overrides", ())), description=str(data.get("description", "")),
                   params={k: Param.from_dict(v, name=k) for k, v in params.items()})


def _is_shared(key: str) -> bool:
    section, _, name = key.partition(".")
    return section in SHARED_SECTIONS or (section == "block" and name in SHARED_BLOCK_FIELDS)


def forecaster_key(config: OryxConfig, data_key: str = "") -> str:
    """Hash of what a trained forecaster depends on: every config field except the shared ones, and the data.

    Two trials with the same key can share one trained forecaster (cached on disk under it).
    """
    d = config.to_dict()
    for section in SHARED_SECTIONS:
        d.pop(section)
    for name in SHARED_BLOCK_FIELDS:
        d["block"].pop(name)
    return hashlib.sha256(json.dumps({"config": d, "data": data_key}, sort_keys=True).encode()).hexdigest()[:16]


def training_config(config: OryxConfig, base: OryxConfig) -> OryxConfig:
    """The config a shared forecaster trains under: `config` with the base's retention (see the module doc)."""
    return config.replace(block={n: getattr(base.block, n) for n in SHARED_BLOCK_FIELDS})


# The sweeps' training is short on purpose (a 2-core CPU runs a budget sweep in a few minutes);
# raise train.steps / router.steps through `overrides` or a file for a real run.
_TINY = ("train.steps=300", "router.steps=150")
BUDGETS = (0.0, 0.02, 0.05, 0.10, 0.25, 0.50, 1.0)

SPACES: dict[str, Space] = {
    "budget": Space(
        "budget", {"budget.fraction": Param("grid", values=BUDGETS)}, overrides=_TINY,
        description="the expected-FLOPs budget from all-recurrent to all-attention, one trained forecaster"),
    "budget-quick": Space(
        "budget-quick", {"budget.fraction": Param("grid", values=(0.0, 0.05, 0.10, 0.25, 0.50, 1.0))},
        overrides=("train.steps=60", "train.window_tokens=64", "router.steps=30"),
        description="the budget sweep in under a minute of training (smoke tests, --quick)"),
    "routing": Space(
        "routing", {
            "budget.fraction": Param("choice", values=(0.02, 0.05, 0.10, 0.25)),
            "budget.window": Param("choice", values=(32, 64, 128, 256)),
            "budget.reserve": Param("uniform", low=0.0, high=0.7),
            "budget.spike_z": Param("uniform", low=1.5, high=4.0),
            "block.retention": Param("choice", values=("all", "bounded")),
            "block.window": Param("choice", values=(64, 128, 256)),
            "block.pinned": Param("int", low=0, high=64),
            "router.surprise_weight": Param("uniform", low=0.0, high=3.0),
            "router.steps": Param("int", low=50, high=300),
        }, overrides=_TINY,
        description="budget, controller, retention and router settings over one trained forecaster"),
    "shape": Space(
        "shape", {
            "budget.fraction": Param("choice", values=(0.05, 0.10, 0.25)),
            "block.mixer": Param("choice", values=("gdn", "mamba2")),
            "block.head_dim_k": Param("choice", values=(8, 16)),
            "block.rope_base": Param("loguniform", low=100.0, high=10000.0),
            "train.attention_fraction": Param("uniform", low=0.1, high=0.6),
        }, overrides=_TINY,
        description="the model's shape and mixed-mode training; every trial trains its own forecaster (ASHA stops the weak)"),
}


def load_space(name_or_path: str | Path) -> Space:
    """A space from `SPACES` by name, or read from a `.json` / `.yaml` / `.yml` file; the space is checked.

    Raises `ValueError` for an unknown name, an unreadable or malformed file, or a sample the config refuses.
    """
    key = str(name_or_path)
    if key in SPACES:
        space = SPACES[key]
    else:
        path = Path(key)
        if path.suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"unknown space {key!r}: give one of {', '.join(SPACES)} or a .json/.yaml file")
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read space file {key}: {e.strerror or e}") from e
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"space file {key} is not valid JSON: {e}") from e
        else:
            try:
                import yaml
            except ImportError as e:
                raise ValueError(f"reading {key} needs PyYAML (pip install pyyaml), or give the space as JSON") from e
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"space file {key} is not valid YAML: {e}") from e
        space = Space.from_dict(data)
    space.check()
    return space


def space_to_json(space: Space) -> str:
    return json.dumps(space.to_dict(), indent=2)
