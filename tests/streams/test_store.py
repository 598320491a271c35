"""A snapshot store must hand back exactly what it was given, keep the last whole snapshot through a failed write, and refuse a corrupt one clearly."""

import json

import pytest
import torch

from oryx_ts.streams.store import FileStore, MemoryStore, StateStore


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_snapshot_comes_back_bit_for_bit(kind, tmp_path):
    store = MemoryStore() if kind == "memory" else FileStore(tmp_path / "s", shard_bytes=1000)
    assert isinstance(store, StateStore) and store.read() is None
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(17, 9, generator=g, dtype=torch.float64) for i in range(5)}
    tensors["n"] = torch.arange(17)
    store.write(tensors, {"format": "x", "series": [{"id": "a"}]})
    got, index = store.read()
    assert index["series"] == [{"id": "a"}] and set(got) == set(tensors)
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    tensors["t0"] += 1  # later changes of the caller's tensors do not reach the stored snapshot
    again, _ = store.read()
    assert not torch.equal(again["t0"], tensors["t0"])
    if kind == "file":
        assert len(json.loads((tmp_path / "s" / "current" / "index.json").read_text())["shards"]) > 1


def test_a_write_interrupted_before_the_swap_leaves_the_last_snapshot(tmp_path):
    store = FileStore(tmp_path / "s")
    store.write({"a": torch.ones(3)}, {"v": 1})
    (tmp_path / "s" / "incoming").mkdir()  # what a crash mid-write leaves behind
    (tmp_path / "s" / "incoming" / "index.json").write_text("{")
    tensors, index = store.read()
    assert index["v"] == 1 and torch.equal(tensors["a"], torch.ones(3))
    store.write({"a": torch.zeros(3)}, {"v": 2})
    assert store.read()[1]["v"] == 2


def test_a_corrupt_snapshot_is_refused(tmp_path):
    store = FileStore(tmp_path / "s")
    store.write({"a": torch.ones(3)}, {"v": 1})
    shard = next((tmp_path / "s" / "current").glob("shard-*.safetensors"))
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt snapshot"):
        store.read()
