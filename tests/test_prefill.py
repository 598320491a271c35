"""A long history is replayed in one parallel pass only if the state it leaves continues exactly like stepping every patch from the start."""

import pytest
import torch

from tests.conftest import random_model

RETENTIONS = {"all": {}, "bounded": {"retention": "bounded", "window": 5, "pinned": 3}, "no-pins": {"retention": "bounded", "window": 4, "pinned": 0}}


@pytest.mark.parametrize("retention", list(RETENTIONS))
@pytest.mark.parametrize("T0", [1, 3, 17])
def test_prefill_then_step_equals_stepping_throughout(mixer, retention, T0):
    model = random_model(mixer, block=RETENTIONS[retention])
    g = torch.Generator().manual_seed(T0)
    T, B, P = 26, 3, 8
    x = torch.randn(B, T * P, 4, generator=g).cumsum(1) * 0.3
    modes = (torch.rand(B, T, generator=g) < 0.4).float()
    with torch.no_grad():
        ref = model(x, modes)
    head, state = model.prefill(x[:, : T0 * P], modes[:, :T0], capacity=4)
    torch.testing.assert_close(head, ref[:, :T0], rtol=1e-5, atol=1e-5)  # the same parallel forward
    stepped = model.init_state(B, capacity=4)
    for n in range(T0):
        model.step(x[:, n * P : (n + 1) * P], stepped, modes[:, n])
    if stepped.bounded:
        assert torch.equal(stepped.slots.pos_BS, state.slots.pos_BS) and torch.equal(stepped.slots.pins_B, state.slots.pins_B)
        assert torch.equal(stepped.slots.mode_BS, state.slots.mode_BS)
    assert torch.equal(stepped.n_tokens_B, state.n_tokens_B)
    for n in range(T0, T):
        f, state = model.step(x[:, n * P : (n + 1) * P], state, modes[:, n])
        # step against the chunked parallel pass: fp32 rounding only
        torch.testing.assert_close(f, ref[:, n], rtol=1e-4, atol=1e-4)
