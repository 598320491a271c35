"""Checkpoints: weights in safetensors, config in JSON beside them. Nothing is ever unpickled.

A checkpoint path names a directory holding `model.safetensors` and `config.json`. The JSON holds
the config, a sha256 checksum of every weights file, free-form `extra` metadata and, when the
model was trained on a file, a `DataInfo` (channel names, step, timestamp column, normalization,
training span and a fingerprint of the values). Loading checks the checksums, that the file
parses, that every tensor the config implies is present with the right shape, and that no extra
tensor is there; any failure raises `ValueError` saying what is wrong. A checkpoint written
before checksums existed loads with a warning.

A trained `LearnedRouter` may be saved beside the model (`router.safetensors`, its settings in the
JSON); `load_router` reads it back with the same checks.
"""

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from oryx_ts.config import OryxConfig, Retention, RouterConfig
from oryx_ts.model import OryxForecaster
from oryx_ts.routers.features import N_FEATURES
from oryx_ts.routers.learned import LearnedRouter

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ROUTER_WEIGHTS = "router.safetensors"


def fingerprint(values: np.ndarray | torch.Tensor) -> str:
    """sha256 of a `(L, C)` stream's float32 bytes and its shape: equal fingerprints, equal data (NaN included)."""
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class DataInfo:
    """What a checkpoint knows of the data it was trained on.

    channels: the column names, in the model's channel order; with `univariate`, the columns a 1-channel
        model learned from, each as a series of its own (it forecasts any of them the same way).
    step_seconds: the grid step in seconds; None when the clock is a row or step index.
    timestamp: the timestamp column (None: the row order was the clock).
    start: the first timestamp (ISO 8601) or None.
    rows, train_rows: the stream's length; steps `[0, train_rows)` trained, the rest validated.
    fingerprint: `fingerprint(values)` of the whole stream.
    normalization: the tokenizer's causal normalization policy (kind, decay, eps, clip).
    """

    channels: tuple[str, ...]
    step_seconds: int | None = None
    timestamp: str | None = None
    start: str | None = None
    rows: int = 0
    train_rows: int = 0
    fingerprint: str = ""
    normalization: dict = field(default_factory=dict)
    univariate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict) -> "DataInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown data fields {unknown}; expected {sorted(names)}")
        return cls(**data)

    def check(self, channels: list[str] | tuple[str, ...], step_seconds: int | None, *, source: str = "the data") -> None:
        """Raise `ValueError` when a file's columns or step differ from the training data's, naming both."""
        if self.univariate:
            unknown = [c for c in channels if c not in self.channels]
            if unknown or not channels:
                raise ValueError(f"{source} has channels {list(channels)}; this univariate model was trained on the columns "
                                 f"{list(self.channels)}, each on its own (pick any of them with --channels)")
        elif tuple(channels) != self.channels:
            raise ValueError(f"{source} has channels {list(channels)}, the model was trained on {list(self.channels)} "
                             "(same names in the same order; pick them with --channels)")
        if step_seconds != self.step_seconds:
            def show(s: int | None) -> str:
                return "a row index (no clock)" if s is None else f"{s}s"
            raise ValueError(f"{source} has step {show(step_seconds)}, the model was trained on step {show(self.step_seconds)} "
                             "(resample it with --step)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, name: str, meta: dict) -> None:
    """Check weights file `name` against the checksum in `meta`; an old checkpoint without one warns."""
    expected = meta.get("sha256", {}).get(name)
    if expected is None:
        warnings.warn(f"{path / name} has no checksum in {CONFIG} (written by an older oryx_ts); loading it unverified",
                      stacklevel=3)
        return
    actual = _sha256(path / name)
    if actual != expected:
        raise ValueError(f"corrupt checkpoint weights {path / name}: sha256 {actual[:16]}... does not match "
                         f"the {expected[:16]}... recorded in {CONFIG}")


def save(
    model: OryxForecaster, path: str | Path, *, extra: dict | None = None, router: LearnedRouter | None = None,
    data: DataInfo | None = None,
) -> Path:
    """Write `model` (and a learned `router`, if given) to directory `path` (created if needed).

    `extra` goes into the JSON as metadata, `data` (what the model was trained on) under `"data"`;
    the sha256 of each weights file goes under `"sha256"`. Raises `TypeError` for a router that has
    no weights to save.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "oryx_ts"})
    meta = {"oryx_ts": 1, "config": model.config.to_dict(), "extra": extra or {}, "sha256": {WEIGHTS: _sha256(path / WEIGHTS)}}
    if data is not None:
        meta["data"] = data.to_dict()
    if router is not None:
        if not isinstance(router, LearnedRouter):
            raise TypeError(f"only a LearnedRouter has weights to save, got {type(router).__name__}")
        router_tensors = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
        save_file(router_tensors, str(path / ROUTER_WEIGHTS), metadata={"format": "oryx_ts.router"})
        meta["sha256"][ROUTER_WEIGHTS] = _sha256(path / ROUTER_WEIGHTS)
        meta["router"] = {"kind": "learned", "d_model": router.d_model, "config": dataclasses.asdict(router.config)}
    elif (path / ROUTER_WEIGHTS).exists():
        (path / ROUTER_WEIGHTS).unlink()  # a stale router must not pair with new weights
    (path / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt checkpoint config {path / CONFIG}: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint config {path / CONFIG}: not a JSON object")
    return meta


def read_config(path: str | Path) -> OryxConfig:
    """The config stored with a checkpoint; raises `ValueError` for a missing or corrupt one."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise ValueError(f"{path} is not an oryx_ts checkpoint: expected {CONFIG} in it")
    try:
        return OryxConfig.from_dict(_read_meta(path)["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"corrupt checkpoint config {path / CONFIG}: {e}") from e


def with_retention(model: OryxForecaster, retention: Retention, *, window: int | None = None,
                   pinned: int | None = None) -> OryxForecaster:
    """A copy of `model` (same weights, device, dtype and train/eval mode) under another KV-cache retention.

    `retention`, `window`, `pinned` as in `OryxConfig.with_retention` (window and pinned default
    to the model's). The copy forecasts as a model built from the changed config and given these
    weights, and its `init_state` makes states of the new policy. Raises `ValueError` for a
    retention the config refuses.
    """
    config = model.config.with_retention(retention, window=window, pinned=pinned)
    p = next(model.parameters())
    out = OryxForecaster(config).to(device=p.device, dtype=p.dtype)
    out.load_state_dict(model.state_dict())
    return out.train(model.training)


def load(
    path: str | Path, *, map_location: str | torch.device = "cpu", config: OryxConfig | None = None,
    retention: Retention | None = None, window: int | None = None, pinned: int | None = None,
) -> OryxForecaster:
    """Read a checkpoint written by `save`; raises `ValueError` for a missing, corrupt or mismatched one.

    `config` (default: the checkpoint's own) builds the model that receives the weights, e.g. to
    fine-tune with other training settings; its shapes must match the weights. `retention` (with
    `window`, `pinned`; see `OryxConfig.with_retention`) switches that config's KV-cache
    retention, e.g. `load(path, retention="bounded", window=512, pinned=64)` for endless streams.
    """
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise ValueError(f"{path} is not an oryx_ts checkpoint: expected {WEIGHTS} and {CONFIG} in it")
    meta = _read_meta(path)
    try:
        stored = OryxConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint config {path / CONFIG}: {e}") from e
    config = config or stored
    if retention is not None:
        config = config.with_retention(retention, window=window, pinned=pinned)
    elif window is not None or pinned is not None:
        raise ValueError("window and pinned come with retention='bounded'")
    _verify(path, WEIGHTS, meta)
    try:
        tensors = load_file(str(path / WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"corrupt checkpoint weights {path / WEIGHTS}: {e}") from e
    model = OryxForecaster(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"checkpoint {path}: tensor {name} has shape {tuple(t.shape)}, config implies {tuple(expected[name].shape)}")
    model.load_state_dict(tensors)
    return model.to(map_location).eval()


def read_extra(path: str | Path) -> dict:
    """The `extra` metadata stored with a checkpoint."""
    return _read_meta(Path(path)).get("extra", {})


def read_data(path: str | Path) -> DataInfo | None:
    """What the checkpoint's model was trained on, or None for a model trained on an array; raises `ValueError` if corrupt."""
    spec = _read_meta(Path(path)).get("data")
    if spec is None:
        return None
    try:
        return DataInfo.from_dict(spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"corrupt data settings in {Path(path) / CONFIG}: {e}") from e


def load_router(path: str | Path, *, map_location: str | torch.device = "cpu") -> LearnedRouter | None:
    """The learned router saved with a checkpoint, or None if it has none; raises `ValueError` for a corrupt one."""
    path = Path(path)
    meta = _read_meta(path)
    spec = meta.get("router")
    if spec is None:
        return None
    try:
        router = LearnedRouter(int(spec["d_model"]), RouterConfig(**spec["config"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"corrupt router settings in {path / CONFIG}: {e}") from e
    if not (path / ROUTER_WEIGHTS).is_file():
        raise ValueError(f"checkpoint {path} names a learned router but has no {ROUTER_WEIGHTS}")
    _verify(path, ROUTER_WEIGHTS, meta)
    try:
        tensors = load_file(str(path / ROUTER_WEIGHTS), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"corrupt router weights {path / ROUTER_WEIGHTS}: {e}") from e
    expected = router.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"router weights in {path} do not match its settings (this version's router reads the token "
                         f"embedding and {N_FEATURES} surprise features; a router saved by another version must be retrained)")
    router.load_state_dict(tensors)
    return router.to(map_location).eval()
