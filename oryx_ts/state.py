"""Explicit streaming state of an OryxForecaster: a batch of series, each on its own clock.

Legend: B series, S cache slots, H heads, K key dim, V value dim, W-1 conv tail, C channels.

A `State` is built by composition: per layer a `LayerState` (KV cache, recurrent state, conv
tails), the normalization statistics, the token count of every series (`n_tokens_B`: RoPE
positions, cache slots and budget windows are per series), the slot bookkeeping of bounded
retention (`Slots`), and named *parts* that the layers above the model add (routing, the
controller, the engine's forecasts and adapter). Every field of every part is a tensor whose
leading axis is the series, so one generic implementation selects, concatenates, scatters,
clones and serializes them all; a part type only has to be a dataclass registered with
`register_part`.

`OryxForecaster.step` updates a `State` in place and returns it; a caller that wants to keep
the old state takes `clone()` first. Under retention `all` the KV cache holds `capacity` slots and
doubles when a series needs more (slot = token position). Under `bounded` it has
`window + pinned` slots and never grows: slot `n % window` takes token n of that series, and a
token that leaves the window is moved to the pinned slots if it ran in attention mode, replacing
the oldest pinned one. `bounded_until` gives the same policy in parallel form, so `forward` and
`step` agree. States serialize to safetensors (tensors) plus JSON (layout) and restore bit for bit.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from oryx_ts.config import OryxConfig

FORMAT = "oryx_ts.state/2"
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)  # `State.allocate`'s state_dtype
PART_TYPES: dict[str, type] = {}


def register_part(cls: type) -> type:
    """Register a dataclass as a state part type, so that `State.load` can rebuild it by name."""
    assert is_dataclass(cls), cls
    PART_TYPES[cls.__name__] = cls
    return cls


def _tensors_of(part: Any) -> dict[str, torch.Tensor]:
    return {f.name: getattr(part, f.name) for f in fields(part)}


def _rebuild(part: Any, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Any:
    return type(part)(**{name: fn(name, t) for name, t in _tensors_of(part).items()})


def _is_cache(name: str) -> bool:
    return name in ("k_cache_BSHK", "v_cache_BSHV")


def _pad_slots(t: torch.Tensor, slots: int) -> torch.Tensor:
    if t.shape[1] >= slots:
        return t
    grown = t.new_zeros(t.shape[0], slots, *t.shape[2:])
    grown[:, : t.shape[1]] = t
    return grown


@register_part
@dataclass
class LayerState:
    """One layer's two states (KV cache and recurrent state) and its convolution tails."""

    k_cache_BSHK: torch.Tensor  # keys after RoPE, as attention reads them
    v_cache_BSHV: torch.Tensor
    rec_BHKV: torch.Tensor  # recurrent state: fp32, or the bf16/fp16 `state_dtype` it was allocated with
    conv_k_BWX: torch.Tensor
    conv_v_BWX: torch.Tensor
    conv_q_BWX: torch.Tensor

    @property
    def slots(self) -> int:
        return self.k_cache_BSHK.shape[1]

    def ensure_capacity(self, needed: int) -> None:
        """Grow the KV cache (doubling) so that it holds at least `needed` slots."""
        if needed <= self.slots:
            return
        new_cap = max(needed, 2 * self.slots)
        self.k_cache_BSHK = _pad_slots(self.k_cache_BSHK, new_cap)
        self.v_cache_BSHV = _pad_slots(self.v_cache_BSHV, new_cap)


@register_part
@dataclass
class Slots:
    """Bounded retention's slot bookkeeping, shared by all layers of a series."""

    pos_BS: torch.Tensor  # int64 token held by each slot, -1 = empty
    mode_BS: torch.Tensor  # bool, whether that token ran attention
    pins_B: torch.Tensor  # int64 tokens pinned so far


NEVER = torch.iinfo(torch.int64).max  # "until" of a key that is never evicted


def bounded_until(m_BT: torch.Tensor, window: int, pinned: int) -> torch.Tensor:
    """Bounded retention in parallel form: for each token, the first position that no longer sees it.

    A token stays in the recent window for `window` positions. An attention-mode token is then
    pinned until the `pinned`-th later attention-mode token leaves the window and takes its slot.
    """
    B, T = m_BT.shape
    pos_T = torch.arange(T, device=m_BT.device)
    return torch.stack([_visible_until(pos_T, m_BT[b] > 0.5, window, pinned) for b in range(B)]) if B else m_BT.long()


def _visible_until(pos_L: torch.Tensor, att_L: torch.Tensor, window: int, pinned: int) -> torch.Tensor:
    """`bounded_until` of tokens at ascending positions `pos_L` that leave the window in that order (`att_L`: ran attention)."""
    until_L = pos_L + window
    if pinned > 0:
        att = att_L.nonzero().squeeze(1)
        until_L[att] = NEVER
        # the k-th attention token to leave the window is pinned until the (k + pinned)-th leaves
        until_L[att[:-pinned] if len(att) > pinned else att[:0]] = pos_L[att[pinned:]] + window
    return until_L


@dataclass
class SlotPlan:
    """What one step does to every layer's cache, per series: optionally pin the leaving token, then write the new one."""

    write_slot_B: torch.Tensor  # int64 slot that takes the new token
    pin_B: torch.Tensor | None  # bool, series whose leaving token moves to a pinned slot (None: no pinned slots)
    pin_slot_B: torch.Tensor | None  # int64 its destination
    valid_BS: torch.Tensor  # bool, slots holding a token after the step (the new one included)


@dataclass
class ChunkPlan:
    """What T tokens of every series do to the caches, in parallel form (`State.plan_chunk`).

    Positions and "until"s are absolute token positions; a key is visible to the query at
    position q while `q < until` (bounded retention only; None under `all`).
    """

    pos_BT: torch.Tensor  # int64 position of each token of the chunk
    old_valid_BS: torch.Tensor  # bool, cache slots holding a token before the chunk (S: the slots attention reads)
    old_until_BS: torch.Tensor | None  # int64, when each of those slots' token stops being visible
    until_BT: torch.Tensor | None  # int64, when each chunk token stops being visible
    slot_BT: torch.Tensor  # int64 slot each chunk token holds after the chunk, -1 = not retained
    move_BS: torch.Tensor | None  # int64 per destination slot, the pre-chunk slot whose token moves there (a pin), -1 = none


@dataclass
class State:
    """Streaming state for a batch of series; see the module docstring. Build it with `State.allocate`."""

    layers: list[LayerState]
    norm_stats_B3C: torch.Tensor  # fp64 decayed (count, sum, sum of squares) per channel
    n_tokens_B: torch.Tensor  # int64 tokens consumed so far, per series
    slots: Slots | None = None  # bounded retention only
    parts: dict[str, Any] = field(default_factory=dict)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def allocate(
        cls,
        config: OryxConfig,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        capacity: int = 256,
        parts: Mapping[str, Callable[[int, torch.device | str | None], Any]] | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> "State":
        """An empty state for `batch_size` series of a model with `config`.

        Under retention `all` the KV cache holds `capacity` tokens before it grows; under `bounded`
        it has `window + pinned` slots and never grows. `parts` maps part names to factories
        `(batch_size, device) -> part` (the wrappers above the model bring their own).
        `state_dtype` stores the recurrent state and the KV cache in bf16 or fp16 (half the bytes a
        step moves; steps still compute in fp32 and round on store); None keeps the recurrent state
        in fp32 and the cache in the model's `dtype`. Raises `ValueError` for another dtype.
        """
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype}")
        b = config.block
        H, K, V, Wc = b.n_heads, b.head_dim_k, b.head_dim_v, b.conv_size
        bounded = b.retention == "bounded"
        S = b.window + b.pinned if bounded else max(capacity, 1)
        z = lambda *s, dt=dtype: torch.zeros(*s, device=device, dtype=dt)  # noqa: E731
        layers = [
            LayerState(
                k_cache_BSHK=z(batch_size, S, H, K, dt=state_dtype or dtype),
                v_cache_BSHV=z(batch_size, S, H, V, dt=state_dtype or dtype),
                rec_BHKV=z(batch_size, H, K, V, dt=state_dtype or torch.float32),
                conv_k_BWX=z(batch_size, Wc - 1, H * K),
                conv_v_BWX=z(batch_size, Wc - 1, H * V),
                conv_q_BWX=z(batch_size, Wc - 1, H * K),
            )
            for _ in range(b.n_layers)
        ]
        slots = None
        if bounded:
            slots = Slots(
                pos_BS=torch.full((batch_size, S), -1, dtype=torch.long, device=device),
                mode_BS=torch.zeros(batch_size, S, dtype=torch.bool, device=device),
                pins_B=torch.zeros(batch_size, dtype=torch.long, device=device),
            )
        return cls(
            layers=layers,
            norm_stats_B3C=torch.zeros(batch_size, 3, config.tokenizer.channels, dtype=torch.float64, device=device),
            n_tokens_B=torch.zeros(batch_size, dtype=torch.long, device=device),
            slots=slots,
            parts={name: make(batch_size, device) for name, make in (parts or {}).items()},
        )

    # --- properties ---------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.n_tokens_B.shape[0]

    @property
    def bounded(self) -> bool:
        return self.slots is not None

    @property
    def device(self) -> torch.device:
        return self.n_tokens_B.device

    # --- the generic walk over every tensor ---------------------------------------------------

    def _groups(self) -> list[tuple[str, Any]]:
        """`(prefix, dataclass)` pairs holding every per-series tensor except the top-level ones."""
        groups = [(f"layers.{i}", ls) for i, ls in enumerate(self.layers)]
        if self.slots is not None:
            groups.append(("slots", self.slots))
        groups += [(f"parts.{name}", part) for name, part in self.parts.items()]
        return groups

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "State":
        """A new state with `fn(name, tensor)` applied to every tensor (the same walk for every operation)."""
        return State(
            layers=[_rebuild(ls, fn) for ls in self.layers],
            norm_stats_B3C=fn("norm_stats_B3C", self.norm_stats_B3C),
            n_tokens_B=fn("n_tokens_B", self.n_tokens_B),
            slots=None if self.slots is None else _rebuild(self.slots, fn),
            parts={name: _rebuild(part, fn) for name, part in self.parts.items()},
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by its dotted name (the serializer's layout)."""
        out = {"norm_stats_B3C": self.norm_stats_B3C, "n_tokens_B": self.n_tokens_B}
        for prefix, group in self._groups():
            out.update({f"{prefix}.{name}": t for name, t in _tensors_of(group).items()})
        return out

    def clone(self) -> "State":
        return self._map(lambda _, t: t.clone())

    def to(self, device: torch.device | str) -> "State":
        return self._map(lambda _, t: t.to(device))

    def select(self, idx: torch.Tensor | Sequence[int]) -> "State":
        """A new state holding series `idx` (in that order), copied."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        return self._map(lambda _, t: t.index_select(0, idx))

    @staticmethod
    def concat(states: Sequence["State"]) -> "State":
        """One state holding the series of `states` one after another; KV caches are padded to the largest."""
        if not states:
            raise ValueError("concat needs at least one state")
        first = states[0]
        layouts = {(s.bounded, len(s.layers), tuple(s.parts)) for s in states}
        if len(layouts) != 1:
            raise ValueError(f"cannot concatenate states of different layouts: {sorted(map(str, layouts))}")
        slots = max(ls.slots for s in states for ls in s.layers)
        flat = [s.tensors() for s in states]

        def cat(name: str, _: torch.Tensor) -> torch.Tensor:
            parts = [f[name] for f in flat]
            if name.rsplit(".", 1)[-1] in ("k_cache_BSHK", "v_cache_BSHV"):
                parts = [_pad_slots(p, slots) for p in parts]
            return torch.cat(parts, 0)

        return first._named_map(cat)

    def _named_map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "State":
        """Like `_map`, with the full dotted name passed to `fn`."""
        def with_prefix(prefix: str, group: Any) -> Any:
            return _rebuild(group, lambda name, t: fn(f"{prefix}.{name}", t))

        return State(
            layers=[with_prefix(f"layers.{i}", ls) for i, ls in enumerate(self.layers)],
            norm_stats_B3C=fn("norm_stats_B3C", self.norm_stats_B3C),
            n_tokens_B=fn("n_tokens_B", self.n_tokens_B),
            slots=None if self.slots is None else with_prefix("slots", self.slots),
            parts={name: with_prefix(f"parts.{name}", p) for name, p in self.parts.items()},
        )

    def scatter(self, idx: torch.Tensor | Sequence[int], part: "State") -> None:
        """Write the series of `part` into rows `idx` of this state, in place (caches grow if needed)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        if part.batch_size != idx.numel():
            raise ValueError(f"scatter of {part.batch_size} series into {idx.numel()} rows")
        if (part.bounded, len(part.layers), tuple(part.parts)) != (self.bounded, len(self.layers), tuple(self.parts)):
            raise ValueError("cannot scatter a state of another layout")
        if not self.bounded:
            needed = max(ls.slots for ls in part.layers)
            for ls in self.layers:
                ls.ensure_capacity(needed)
        src = part.tensors()
        for prefix, group in [("", None), *self._groups()]:
            targets = {"norm_stats_B3C": self.norm_stats_B3C, "n_tokens_B": self.n_tokens_B} if group is None else _tensors_of(group)
            for name, dst in targets.items():
                s = src[f"{prefix}.{name}" if prefix else name]
                if _is_cache(name) and s.shape[1] < dst.shape[1]:
                    s = _pad_slots(s, dst.shape[1])
                dst.index_copy_(0, idx, s.to(dst.dtype))

    def resize(self, batch_size: int, fill: "State") -> "State":
        """A state of `batch_size` rows: these series first, then copies of the single-series `fill`."""
        if batch_size < self.batch_size:
            return self.select(torch.arange(batch_size))
        extra = fill.select(torch.zeros(batch_size - self.batch_size, dtype=torch.long))
        return State.concat([self, extra])

    # --- steps under bounded or growing retention ---------------------------------------------

    def plan_step(self, m_B: torch.Tensor, window: int, pinned: int) -> SlotPlan:
        """Advance the slot bookkeeping by one token of every series with modes `m_B`; the layers then apply the plan.

        Under retention `all` the slot is the token position and the caches grow to hold it.
        """
        n_B = self.n_tokens_B
        rows = torch.arange(self.batch_size, device=n_B.device)
        if self.slots is None:
            needed = int(n_B.max()) + 1 if self.batch_size else 1
            for ls in self.layers:
                ls.ensure_capacity(needed)
            S = self.layers[0].slots
            valid = torch.arange(S, device=n_B.device)[None, :] <= n_B[:, None]
            return SlotPlan(n_B, None, None, valid)
        sl = self.slots
        write = n_B % window
        pin = pin_slot = None
        if pinned > 0:
            leaving = sl.pos_BS[rows, write]
            pin = (leaving >= 0) & sl.mode_BS[rows, write]
            pin_slot = window + sl.pins_B % pinned
            sl.pos_BS[rows, pin_slot] = torch.where(pin, leaving, sl.pos_BS[rows, pin_slot])
            sl.mode_BS[rows, pin_slot] = torch.where(pin, True, sl.mode_BS[rows, pin_slot])
            sl.pins_B += pin.long()
        sl.pos_BS[rows, write] = n_B
        sl.mode_BS[rows, write] = m_B > 0.5
        return SlotPlan(write, pin, pin_slot, sl.pos_BS >= 0)

    def plan_chunk(self, m_BT: torch.Tensor, window: int, pinned: int) -> ChunkPlan:
        """Advance the slot bookkeeping by T tokens of every series with modes `m_BT`, as T `plan_step`s would.

        Returns the `ChunkPlan` the layers apply (`OryxMixer.prefill`): which cached keys each
        chunk query still sees, where each chunk token ends up and which cached tokens move to a
        pinned slot. Under retention `all` the caches grow (doubling, as stepping grows them) to
        hold every token. `n_tokens_B` is left to the caller, as with `plan_step`.
        """
        B, T = m_BT.shape
        n_B = self.n_tokens_B
        dev = n_B.device
        t_T = torch.arange(T, device=dev)
        pos_BT = n_B[:, None] + t_T
        if self.slots is None:
            end = int(n_B.max()) + T if B else T
            for ls in self.layers:
                while ls.slots < end:  # the capacity T steps leave: doubling past each full cache
                    ls.ensure_capacity(ls.slots + 1)
            S_old = int(n_B.max()) if B else 0
            old_valid = torch.arange(S_old, device=dev)[None, :] < n_B[:, None]
            return ChunkPlan(pos_BT, old_valid, None, None, pos_BT.clone(), None)
        sl = self.slots
        S = sl.pos_BS.shape[1]
        old_valid = sl.pos_BS >= 0
        old_until = torch.full((B, S), NEVER, dtype=torch.long, device=dev)
        until_BT = pos_BT + window
        slot_BT = torch.full((B, T), -1, dtype=torch.long, device=dev)
        move_BS = torch.full((B, S), -1, dtype=torch.long, device=dev)
        att_BT = m_BT > 0.5
        for b in range(B):
            end = int(n_B[b]) + T
            # the tokens of the recent window in position order, then the chunk's: they leave the window in that order
            w_slot = (sl.pos_BS[b, :window] >= 0).nonzero().squeeze(1)
            w_slot = w_slot[sl.pos_BS[b, w_slot].argsort()]
            nw = len(w_slot)
            seq_p = torch.cat([sl.pos_BS[b, w_slot], pos_BT[b]])
            seq_att = torch.cat([sl.mode_BS[b, w_slot], att_BT[b]])
            seq_until = _visible_until(seq_p, seq_att, window, pinned)
            stays = seq_p >= end - window
            if pinned > 0:
                att = seq_att.nonzero().squeeze(1)
                att_p = seq_p[att]
                K = int((att_p + window < end).sum())  # pins during the chunk
                pins = int(sl.pins_B[b])
                # a pinned slot that held a token before the chunk is taken by the k-th new pin, k its place in the ring
                k_old = (torch.arange(pinned, device=dev) - pins) % pinned
                if len(att):
                    old_until[b, window:] = torch.where(k_old < len(att), att_p[k_old.clamp(max=len(att) - 1)] + window, NEVER)
                survive = torch.arange(max(K - pinned, 0), K, device=dev)
                dest = window + (pins + survive) % pinned
                src = att[survive]
                from_old = src < nw
                move_BS[b, dest[from_old]] = w_slot[src[from_old]]
                slot_BT[b, src[~from_old] - nw] = dest[~from_old]
                sl.pos_BS[b, dest] = seq_p[src]
                sl.mode_BS[b, dest] = True
                sl.pins_B[b] += K
            old_until[b, w_slot] = seq_until[:nw]
            until_BT[b] = seq_until[nw:]
            recent = stays.nonzero().squeeze(1)
            sl.pos_BS[b, seq_p[recent] % window] = seq_p[recent]
            sl.mode_BS[b, seq_p[recent] % window] = seq_att[recent]
            chunk_recent = recent[recent >= nw]
            slot_BT[b, chunk_recent - nw] = seq_p[chunk_recent] % window
        if not bool(old_valid.any()):  # every series starts empty: attention reads no cached slot
            old_valid, old_until = old_valid[:, :0], old_until[:, :0]
        return ChunkPlan(pos_BT, old_valid, old_until, until_BT, slot_BT, move_BS)

    # --- size and serialization ---------------------------------------------------------------

    def nbytes_B(self) -> torch.Tensor:
        """Bytes held per series: under `bounded` everything allocated (it never grows); under `all` the KV
        cache up to the tokens it retains (not its spare capacity)."""
        per_series = 0
        cache_per_slot = 0
        for name, t in self.tensors().items():
            row = t[:1].numel() * t.element_size()
            if _is_cache(name.rsplit(".", 1)[-1]):
                cache_per_slot += row // max(t.shape[1], 1)
            else:
                per_series += row
        if self.bounded:
            return torch.full((self.batch_size,), per_series + cache_per_slot * self.layers[0].slots, dtype=torch.long)
        return per_series + cache_per_slot * self.n_tokens_B.cpu()

    def nbytes(self) -> int:
        """Bytes held by all series together; see `nbytes_B`."""
        return int(self.nbytes_B().sum())

    def layout(self) -> dict[str, Any]:
        """What the JSON side of the serializer records: layers, retention, parts and their types, cache slots."""
        return {
            "format": FORMAT,
            "n_layers": len(self.layers),
            "bounded": self.bounded,
            "slots": self.layers[0].slots if self.layers else 0,
            "parts": {name: type(part).__name__ for name, part in self.parts.items()},
        }

    def save(self, path: str | Path, *, metadata: Mapping[str, str] | None = None) -> None:
        """Write the state to one safetensors file with its layout as JSON metadata (bit-exact with `load`)."""
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        meta = {"layout": json.dumps(self.layout()), **(metadata or {})}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any], *, source: str = "state") -> "State":
        """Rebuild a state from `tensors()` and `layout()`; raises `ValueError` naming what is missing or unknown."""
        if layout.get("format") != FORMAT:
            raise ValueError(f"{source}: not an oryx_ts state of format {FORMAT} (got {layout.get('format')!r})")

        def build(part_type: type, prefix: str) -> Any:
            try:
                return part_type(**{f.name: tensors[f"{prefix}.{f.name}"] for f in fields(part_type)})
            except KeyError as e:
                raise ValueError(f"{source} lacks tensor {e}") from e

        try:
            top = {name: tensors[name] for name in ("norm_stats_B3C", "n_tokens_B")}
        except KeyError as e:
            raise ValueError(f"{source} lacks tensor {e}") from e
        parts = {}
        for name, type_name in layout.get("parts", {}).items():
            if type_name not in PART_TYPES:
                raise ValueError(f"{source}: unknown state part type {type_name!r} for part {name!r} (import the module that defines it)")
            parts[name] = build(PART_TYPES[type_name], f"parts.{name}")
        state = cls(
            layers=[build(LayerState, f"layers.{i}") for i in range(int(layout["n_layers"]))],
            slots=build(Slots, "slots") if layout.get("bounded") else None,
            parts=parts,
            **top,
        )
        B = state.batch_size
        bad = [k for k, t in state.tensors().items() if t.dim() == 0 or t.shape[0] != B]
        if bad:
            raise ValueError(f"{source}: tensors {bad[:3]} do not hold {B} series")
        for ls in state.layers:
            ls.ensure_capacity(int(layout.get("slots", 0)))
        return state

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "State":
        """Read a state written by `save`; raises `ValueError` for a corrupt, incomplete or unknown file."""
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            layout = json.loads(meta["layout"])
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read state file {path}: {e}") from e
        return cls.from_tensors(tensors, layout, source=f"state file {path}")
