"""Where engine snapshots live: an interface, an in-memory store and a file store.

A snapshot is a set of named tensors (the engine's pooled `State` plus per-series host arrays)
and a JSON-able index (series ids, their rows, regularizers, settings). The file store writes
safetensors shards plus `index.json` into a fresh directory and then swaps it in with one
`os.replace`, so a crash mid-write leaves the previous snapshot whole. Nothing is ever unpickled.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "index.json"


@runtime_checkable
class StateStore(Protocol):
    def write(self, tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> None:
        """Replace the stored snapshot with this one, atomically."""
        ...

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The stored snapshot, or None when there is none; raises `ValueError` for a corrupt one."""
        ...


class MemoryStore:
    """Keeps one snapshot in memory (tests, backtests); tensors are copied on write and on read."""

    def __init__(self) -> None:
        self._snapshot: tuple[dict[str, torch.Tensor], str] | None = None

    def write(self, tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> None:
        self._snapshot = ({k: v.detach().cpu().clone() for k, v in tensors.items()}, json.dumps(index))

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if self._snapshot is None:
            return None
        tensors, index = self._snapshot
        return {k: v.clone() for k, v in tensors.items()}, json.loads(index)


class FileStore:
    """Snapshots in a directory: `<dir>/current/{index.json, shard-00000.safetensors, ...}`.

    `shard_bytes` bounds a shard's size (tensors are grouped in order until a shard would exceed it).
    """

    def __init__(self, directory: str | Path, *, shard_bytes: int = 256 << 20, fsync: bool = True):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self.fsync = fsync

    @property
    def current(self) -> Path:
        return self.directory / "current"

    def write(self, tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / "incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > self.shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.detach().cpu().contiguous()
            size += nbytes
        names = []
        for i, shard in enumerate(shards):
            names.append(f"shard-{i:05d}.safetensors")
            save_file(shard, str(tmp / names[-1]), metadata={"format": "oryx_ts.snapshot"})
        (tmp / INDEX).write_text(json.dumps({**index, "shards": names}))
        if self.fsync:
            for name in [*names, INDEX]:
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
        old = self.directory / "previous"
        shutil.rmtree(old, ignore_errors=True)
        if self.current.exists():
            os.replace(self.current, old)
        os.replace(tmp, self.current)
        shutil.rmtree(old, ignore_errors=True)
        if self.fsync:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        # a crash between the two renames leaves only `previous`: that is the last whole snapshot
        where = self.current if self.current.exists() else self.directory / "previous"
        if not (where / INDEX).exists():
            return None
        try:
            index = json.loads((where / INDEX).read_text())
            tensors: dict[str, torch.Tensor] = {}
            for name in index.pop("shards"):
                with safe_open(str(where / name), framework="pt") as f:
                    tensors.update({k: f.get_tensor(k) for k in f.keys()})
        except (OSError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as e:
            raise ValueError(f"corrupt snapshot in {where}: {e}") from e
        return tensors, index
