"""Explicit streaming state of an OryxForecaster for a batch of series.

Legend: B series, S cache slots, H heads, K key dim, V value dim, W-1 conv tail, C channels.

`OryxForecaster.step` updates a `State` in place and returns it: the service holds one state per
series batch and keeps its buffers; a caller that wants to keep the old state takes `clone()` first.
The KV cache is preallocated with a capacity; under retention `all` it doubles when full.
States serialize to safetensors and restore bit for bit.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@dataclass
class LayerState:
    """One layer's two states (KV cache and recurrent state) and its convolution tails."""

    k_cache_BSHK: torch.Tensor  # keys after RoPE, as attention reads them
    v_cache_BSHV: torch.Tensor
    rec_BHKV: torch.Tensor  # fp32 recurrent state
    conv_k_BWX: torch.Tensor
    conv_v_BWX: torch.Tensor
    conv_q_BWX: torch.Tensor

    def ensure_capacity(self, needed: int) -> None:
        """Grow the KV cache (doubling) so that it holds at least `needed` slots."""
        cap = self.k_cache_BSHK.shape[1]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        for name in ("k_cache_BSHK", "v_cache_BSHV"):
            old = getattr(self, name)
            grown = old.new_zeros(old.shape[0], new_cap, *old.shape[2:])
            grown[:, :cap] = old
            setattr(self, name, grown)


@dataclass
class State:
    """Streaming state for a batch of series: per-layer states, token count, normalization stats."""

    layers: list[LayerState]
    norm_stats_B3C: torch.Tensor  # fp64 decayed (count, sum, sum of squares) per channel
    n_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.norm_stats_B3C.shape[0]

    def clone(self) -> "State":
        return State(
            layers=[LayerState(**{f.name: getattr(ls, f.name).clone() for f in fields(LayerState)}) for ls in self.layers],
            norm_stats_B3C=self.norm_stats_B3C.clone(),
            n_tokens=self.n_tokens,
        )

    def nbytes(self) -> int:
        """Bytes held, counting the KV cache up to the tokens retained (not its spare capacity)."""
        total = self.norm_stats_B3C.numel() * self.norm_stats_B3C.element_size()
        for ls in self.layers:
            for f in fields(LayerState):
                t = getattr(ls, f.name)
                per_slot = t[:, :1].numel() * t.element_size() if "cache" in f.name else None
                total += per_slot * min(self.n_tokens, t.shape[1]) if per_slot is not None else t.numel() * t.element_size()
        return total

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"norm_stats": self.norm_stats_B3C}
        for i, ls in enumerate(self.layers):
            for f in fields(LayerState):
                t = getattr(ls, f.name)
                # only the filled part of the cache is worth writing
                out[f"layers.{i}.{f.name}"] = (t[:, : self.n_tokens] if "cache" in f.name else t).contiguous()
        return out

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (bit-for-bit restorable with `State.load`)."""
        save_file(self.to_tensors(), str(path), metadata={"n_tokens": str(self.n_tokens), "n_layers": str(len(self.layers))})

    @classmethod
    def load(cls, path: str | Path, *, capacity: int | None = None) -> "State":
        """Read a state written by `save`; raises `ValueError` for a corrupt or incomplete file."""
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            n_tokens, n_layers = int(meta["n_tokens"]), int(meta["n_layers"])
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read state file {path}: {e}") from e
        layers = []
        for i in range(n_layers):
            try:
                parts = {f.name: tensors[f"layers.{i}.{f.name}"] for f in fields(LayerState)}
            except KeyError as e:
                raise ValueError(f"state file {path} lacks tensor {e}") from e
            layers.append(LayerState(**parts))
            layers[-1].ensure_capacity(max(capacity or 0, n_tokens, 1))
        return cls(layers=layers, norm_stats_B3C=tensors["norm_stats"], n_tokens=n_tokens)
