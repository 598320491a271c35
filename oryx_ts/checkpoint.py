"""Checkpoints: weights in safetensors, config in JSON beside them. Nothing is ever unpickled.

A checkpoint path names a directory holding `model.safetensors` and `config.json`. Loading checks
that the file parses, that every tensor the config implies is present with the right shape, and
that no extra tensor is there; any failure raises `ValueError` saying what is wrong.

A trained `LearnedRouter` may be saved beside the model (`router.safetensors`, its settings in the
JSON); `load_router` reads it back with the same checks.
"""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from oryx_ts.config import OryxConfig, RouterConfig
from oryx_ts.model import OryxForecaster
from oryx_ts.routers.features import N_FEATURES
from oryx_ts.routers.learned import LearnedRouter

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ROUTER_WEIGHTS = "router.safetensors"


def save(model: OryxForecaster, path: str | Path, *, extra: dict | None = None, router: LearnedRouter | None = None) -> Path:
    """Write `model` (and a learned `router`, if given) to directory `path` (created if needed).

    `extra` goes into the JSON as metadata. Raises `TypeError` for a router that has no weights to save.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "oryx_ts"})
    meta = {"oryx_ts": 1, "config": model.config.to_dict(), "extra": extra or {}}
    if router is not None:
        if not isinstance(router, LearnedRouter):
            raise TypeError(f"only a LearnedRouter has weights to save, got {type(router).__name__}")
        router_tensors = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
        save_file(router_tensors, str(path / ROUTER_WEIGHTS), metadata={"format": "oryx_ts.router"})
        meta["router"] = {"kind": "learned", "d_model": router.d_model, "config": dataclasses.asdict(router.config)}
    elif (path / ROUTER_WEIGHTS).exists():
        (path / ROUTER_WEIGHTS).unlink()  # a stale router must not pair with new weights
    (path / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> OryxForecaster:
    """Read a checkpoint written by `save`; raises `ValueError` for a missing, corrupt or mismatched one."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise ValueError(f"{path} is not an oryx_ts checkpoint: expected {WEIGHTS} and {CONFIG} in it")
    try:
        meta = json.loads((path / CONFIG).read_text())
        config = OryxConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt checkpoint config {path / CONFIG}: {e}") from e
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
    return json.loads((Path(path) / CONFIG).read_text()).get("extra", {})


def load_router(path: str | Path, *, map_location: str | torch.device = "cpu") -> LearnedRouter | None:
    """The learned router saved with a checkpoint, or None if it has none; raises `ValueError` for a corrupt one."""
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt checkpoint config {path / CONFIG}: {e}") from e
    spec = meta.get("router")
    if spec is None:
        return None
    try:
        router = LearnedRouter(int(spec["d_model"]), RouterConfig(**spec["config"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"corrupt router settings in {path / CONFIG}: {e}") from e
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
