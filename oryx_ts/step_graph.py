"""`OryxForecaster.step` captured as a CUDA graph for one state of a fixed batch size, then replayed.

Legend: B series, P patch length, C channels, Hz horizon steps, Q quantile levels.

A streaming step is a few hundred small launches; replaying a captured graph issues them at once,
which is what small batches need (the host, not the device, bounds their eager step). The captured
step is `model.step` itself on CUDA, which never waits for the device (no value checks there, modes
on the device, the fused mixer step), on one `State` whose tensors are the graph's memory: each
replay advances that state in place. Where the eager step would give a state field a new tensor
(the token counts, the normalization statistics), the graph copies the new values into the old
one, so the state's tensors never move. Bounded retention only: under `all` the cache grows.
"""

from dataclasses import fields

import torch

from oryx_ts.model import OryxForecaster
from oryx_ts.state import State


def _state_fields(state: State) -> list[tuple[object, str, torch.Tensor]]:
    """`(holder, field name, tensor)` for every tensor of `state`."""
    out = [(state, "norm_stats_B3C", state.norm_stats_B3C), (state, "n_tokens_B", state.n_tokens_B)]
    groups = [*state.layers, *([state.slots] if state.slots is not None else []), *state.parts.values()]
    for group in groups:
        out += [(group, f.name, getattr(group, f.name)) for f in fields(group)]
    return out


class GraphedStep:
    """`model.step(patch_BPC, state, modes_B)` for one bounded-retention state on CUDA, replayed from a graph.

    Build it once per state (capturing takes a few warm-up steps on a copy; `state` itself does not
    move), then call it with each patch: `forecast = graphed(patch_BPC, modes_B)`. The forecast is
    the graph's output buffer, overwritten by the next call (clone it to keep it). Step `state` only
    through this object while it is in use. Raises `ValueError` for a state off CUDA, under
    retention `all`, or that does not fit the model.
    """

    def __init__(self, model: OryxForecaster, state: State, *, warmup: int = 2):
        if state.device.type != "cuda":
            raise ValueError(f"a graphed step needs a state on CUDA, got {state.device}")
        if not state.bounded:
            raise ValueError("a graphed step needs bounded retention: under 'all' the KV cache grows")
        B = state.batch_size
        model.check_state(state, B)
        t = model.config.tokenizer
        self.model, self.state = model, state
        self.patch_BPC = torch.zeros(B, t.patch_len, t.channels, device=state.device)  # raw values stay fp32
        self.modes_B = torch.zeros(B, device=state.device)
        # warm-up on a copy of a few series (kernel compiles, cuBLAS workspaces) on a side stream, as
        # capture requires; a few, since a whole state can be most of the device's memory
        n = min(B, 64)
        scratch = state.select(torch.arange(n, device=state.device))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                model.step(self.patch_BPC[:n], scratch, self.modes_B[:n])
        torch.cuda.current_stream().wait_stream(side)
        del scratch
        before = _state_fields(state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.forecast_BHzCQ, _ = model.step(self.patch_BPC, state, self.modes_B)
            for holder, name, old in before:
                new = getattr(holder, name)
                if new is not old:
                    old.copy_(new)
        for holder, name, old in before:
            setattr(holder, name, old)
        self._counts = state.n_tokens_B

    def __call__(self, patch_BPC: torch.Tensor, modes_B: torch.Tensor | float | None = None) -> torch.Tensor:
        """Advance the state by one patch per series; returns `(B, Hz, C, Q)` forecasts in data units."""
        if self.state.n_tokens_B is not self._counts:
            raise ValueError("the state was stepped outside this graphed step; capture a new one")
        if tuple(patch_BPC.shape) != tuple(self.patch_BPC.shape):
            raise ValueError(f"expected a patch of shape {tuple(self.patch_BPC.shape)}, got {tuple(patch_BPC.shape)}")
        self.patch_BPC.copy_(patch_BPC)
        if modes_B is None or not isinstance(modes_B, torch.Tensor):
            self.modes_B.fill_(0.0 if modes_B is None else float(modes_B))
        else:
            self.modes_B.copy_(modes_B)
        self.graph.replay()
        return self.forecast_BHzCQ
