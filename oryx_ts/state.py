"""Explicit streaming state of an OryxForecaster for a batch of series.

Legend: B series, S cache slots, H heads, K key dim, V value dim, W-1 conv tail, C channels.

`OryxForecaster.step` updates a `State` in place and returns it: the service holds one state per
series batch and keeps its buffers; a caller that wants to keep the old state takes `clone()` first.
The KV cache is preallocated with a capacity; under retention `all` it doubles when full.
Under retention `bounded` it has `window + pinned` slots and never grows: slot `n % window`
takes token n, and a token that leaves the window is moved to the pinned slots if it ran in
attention mode (the router's event and anomaly tokens), replacing the oldest pinned one.
`bounded_until` gives the same policy in parallel form (when each key stops being visible), so
`forward` and `step` agree. States serialize to safetensors and restore bit for bit.
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


NEVER = torch.iinfo(torch.int64).max  # "until" of a key that is never evicted


def bounded_until(m_BT: torch.Tensor, window: int, pinned: int) -> torch.Tensor:
    """Bounded retention in parallel form: for each token, the first position that no longer sees it.

    A token stays in the recent window for `window` positions. An attention-mode token is then
    pinned until the `pinned`-th later attention-mode token leaves the window and takes its slot.
    """
    B, T = m_BT.shape
    pos_T = torch.arange(T, device=m_BT.device)
    until_BT = (pos_T + window).expand(B, T).clone()
    if pinned == 0:
        return until_BT
    for b in range(B):
        att = (m_BT[b] > 0.5).nonzero().squeeze(1)
        replaced = att[:-pinned] if len(att) > pinned else att[:0]
        until_BT[b, att] = NEVER
        until_BT[b, replaced] = att[pinned:] + window
    return until_BT


@dataclass
class SlotPlan:
    """What one bounded step does to every layer's cache: pin the leaving token, then write the new one."""

    write_slot: int
    pin_rows_B: torch.Tensor  # series whose leaving token is pinned
    pin_slot_B: torch.Tensor  # its destination slot
    valid_BS: torch.Tensor  # slots holding a token after the step


@dataclass
class State:
    """Streaming state for a batch of series: per-layer states, token count, normalization stats.

    Under bounded retention the slot bookkeeping (shared by all layers) is kept here too.
    """

    layers: list[LayerState]
    norm_stats_B3C: torch.Tensor  # fp64 decayed (count, sum, sum of squares) per channel
    n_tokens: int = 0
    slot_pos_BS: torch.Tensor | None = None  # bounded: token held by each slot, -1 = empty
    slot_mode_BS: torch.Tensor | None = None  # bounded: whether that token ran attention
    pins_B: torch.Tensor | None = None  # bounded: tokens pinned so far per series

    @property
    def bounded(self) -> bool:
        return self.slot_pos_BS is not None

    def plan_bounded_step(self, m_B: torch.Tensor, window: int, pinned: int) -> SlotPlan:
        """Advance the slot bookkeeping by one token with modes `m_B`; the layers then apply the plan."""
        assert self.bounded
        n = self.n_tokens
        write = n % window
        leaving = self.slot_pos_BS[:, write]
        pin_rows = (leaving >= 0) & self.slot_mode_BS[:, write] & (pinned > 0)
        pin_slot = window + self.pins_B % max(pinned, 1)
        rows = pin_rows.nonzero().squeeze(1)
        self.slot_pos_BS[rows, pin_slot[rows]] = leaving[rows]
        self.pins_B += pin_rows.long()
        self.slot_pos_BS[:, write] = n
        self.slot_mode_BS[:, write] = m_B > 0.5
        return SlotPlan(write, pin_rows, pin_slot, self.slot_pos_BS >= 0)

    @property
    def batch_size(self) -> int:
        return self.norm_stats_B3C.shape[0]

    def clone(self) -> "State":
        maybe = lambda t: None if t is None else t.clone()  # noqa: E731
        return State(
            layers=[LayerState(**{f.name: getattr(ls, f.name).clone() for f in fields(LayerState)}) for ls in self.layers],
            norm_stats_B3C=self.norm_stats_B3C.clone(),
            n_tokens=self.n_tokens,
            slot_pos_BS=maybe(self.slot_pos_BS),
            slot_mode_BS=maybe(self.slot_mode_BS),
            pins_B=maybe(self.pins_B),
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
        if self.bounded:
            out.update(slot_pos=self.slot_pos_BS, slot_mode=self.slot_mode_BS, pins=self.pins_B)
        for i, ls in enumerate(self.layers):
            for f in fields(LayerState):
                t = getattr(ls, f.name)
                # under retention `all` only the filled part of the cache is worth writing
                growing = "cache" in f.name and not self.bounded
                out[f"layers.{i}.{f.name}"] = (t[:, : self.n_tokens] if growing else t).contiguous()
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
            if "slot_pos" not in tensors:
                layers[-1].ensure_capacity(max(capacity or 0, n_tokens, 1))
        if "norm_stats" not in tensors:
            raise ValueError(f"state file {path} lacks tensor 'norm_stats'")
        return cls(
            layers=layers,
            norm_stats_B3C=tensors["norm_stats"],
            n_tokens=n_tokens,
            slot_pos_BS=tensors.get("slot_pos"),
            slot_mode_BS=tensors.get("slot_mode"),
            pins_B=tensors.get("pins"),
        )
