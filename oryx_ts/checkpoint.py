"""Checkpoints: weights in safetensors, config in JSON beside them. Nothing is ever unpickled.

A checkpoint path names a directory holding `model.safetensors` and `config.json`. Loading checks
that the file parses, that every tensor the config implies is present with the right shape, and
that no extra tensor is there; any failure raises `ValueError` saying what is wrong.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from oryx_ts.config import OryxConfig
from oryx_ts.model import OryxForecaster

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save(model: OryxForecaster, path: str | Path, *, extra: dict | None = None) -> Path:
    """Write `model` to directory `path` (created if needed). `extra` goes into the JSON as metadata."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "oryx_ts"})
    meta = {"oryx_ts": 1, "config": model.config.to_dict(), "extra": extra or {}}
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
