"""The fused mixer step's torch twin (`naive_mixer_step`, around `naive_layer_step`) is the model's general step in another form:
forcing the block onto it on the CPU must give the CPU step's forecasts (fp32, 1e-5 relative),
for both mixers, both retentions, mixed modes and series at different positions."""

import pytest
import torch

from oryx_ts.kernels import dispatch
from tests.conftest import random_model

RETENTIONS = {"all": {}, "bounded": {"retention": "bounded", "window": 5, "pinned": 3}}


def _run(model, x, modes, stagger):
    """Step every series through its tokens, series starting `stagger[b]` rounds late; returns (B, T, ...)."""
    P = model.config.tokenizer.patch_len
    B, T = modes.shape
    state = model.init_state(B, capacity=4)
    done = [0] * B
    out = [[None] * T for _ in range(B)]
    for rnd in range(T + max(stagger)):
        rows = [b for b in range(B) if rnd >= stagger[b] and done[b] < T]
        part = state.select(rows)
        n = torch.tensor([done[b] for b in rows])
        patch = torch.stack([x[b, done[b] * P : (done[b] + 1) * P] for b in rows])
        f, part = model.step(patch, part, modes[rows, n])
        state.scatter(rows, part)
        for i, b in enumerate(rows):
            out[b][done[b]] = f[i]
            done[b] += 1
    return torch.stack([torch.stack(o) for o in out])


@pytest.mark.parametrize("retention", list(RETENTIONS))
def test_block_step_through_the_naive_layer_step_matches_the_cpu_step(mixer, retention, monkeypatch):
    model = random_model(mixer, seed=2, block=RETENTIONS[retention])
    gen = torch.Generator().manual_seed(3)
    B, T = 4, 23
    x = torch.randn(B, T * 8, 4, generator=gen) * 3 + 1
    u = torch.rand(B, T, generator=gen)
    modes = torch.where(u < 0.3, 1.0, torch.where(u < 0.4, 0.5, 0.0))
    stagger = [0, 3, 7, 1]
    with torch.no_grad():
        general = _run(model, x, modes, stagger)
        monkeypatch.setattr(dispatch, "use_layer_step", lambda *a: True)
        twin = _run(model, x, modes, stagger)
        assert dispatch.last_backend["mixer_step"] == "torch"
        parallel = model(x, modes)
    err = float((twin - general).norm() / general.norm())
    assert err < 1e-5, err
    assert float((general - parallel).norm() / parallel.norm()) < 1e-4
