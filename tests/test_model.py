"""The model's central contract: streaming `step` reproduces the parallel `forward`, and bad input fails clearly.

Tolerance: fp32 throughout; relative error ||step - forward|| / ||forward|| < 1e-4.
"""

import numpy as np
import pytest
import torch

from oryx_ts.config import PRESETS
from oryx_ts.model import OryxForecaster
from tests.conftest import random_model

CHUNK = 16  # the debug preset's chunk size


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mode_patterns(T: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    switch_at_boundary = (torch.arange(T) >= CHUNK).float()
    switch_inside = ((torch.arange(T) // 5) % 2).float()
    return {
        "all-recurrent": torch.zeros(T),
        "all-attention": torch.ones(T),
        "random": (torch.rand(T, generator=gen) < 0.3).float(),
        "switch at chunk boundary": switch_at_boundary,
        "switch inside chunks": switch_inside,
    }


def stream(model: OryxForecaster, x_BLC: torch.Tensor, modes_BT: torch.Tensor) -> torch.Tensor:
    P = model.config.tokenizer.patch_len
    B, L, _ = x_BLC.shape
    state = model.init_state(B, capacity=4)  # small on purpose: the cache must grow
    out = []
    for n in range(L // P):
        f, state = model.step(x_BLC[:, n * P : (n + 1) * P], state, modes_BT[:, n])
        out.append(f)
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 7, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5])
def test_step_equals_forward_for_every_mode_pattern(mixer, T):
    gen = torch.Generator().manual_seed(1000 + T)
    model = random_model(mixer, seed=T)
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    B = 3
    x = torch.randn(B, T * P, C, generator=gen) * 5 + 2
    for name, pattern in mode_patterns(T, gen).items():
        modes = pattern.expand(B, T).clone()
        modes[1] = (torch.rand(T, generator=gen) < 0.5).float()  # series may differ in mode
        with torch.no_grad():
            parallel = model(x, modes)
        streamed = stream(model, x, modes)
        assert torch.isfinite(parallel).all()
        assert rel_err(streamed, parallel) < 1e-4, f"{mixer} T={T} {name}"


def test_a_scalar_step_mode_applies_to_every_series():
    model = random_model()
    x = torch.randn(2, 8, 4)
    a, _ = model.step(x, model.init_state(2), 1.0)
    b, _ = model.step(x, model.init_state(2), torch.ones(2))
    assert torch.equal(a, b)


def test_modes_change_the_forecast(mixer):
    # guards the test above: if modes were ignored, step == forward would prove little
    model = random_model(mixer)
    x = torch.randn(2, 20 * 8, 4)
    with torch.no_grad():
        a, b = model(x, torch.zeros(20)), model(x, torch.ones(20))
    assert rel_err(a, b) > 1e-3


def test_step_resumes_from_a_saved_state_bit_for_bit(mixer, tmp_path):
    from oryx_ts.state import State

    model = random_model(mixer)
    x = torch.randn(2, 30 * 8, 4)
    modes = (torch.rand(2, 30) < 0.5).float()
    state = model.init_state(2)
    for n in range(17):
        _, state = model.step(x[:, n * 8 : (n + 1) * 8], state, modes[:, n])
    state.save(tmp_path / "state.safetensors")
    restored = State.load(tmp_path / "state.safetensors")
    for n in range(17, 30):
        a, state = model.step(x[:, n * 8 : (n + 1) * 8], state, modes[:, n])
        b, restored = model.step(x[:, n * 8 : (n + 1) * 8], restored, modes[:, n])
        assert torch.equal(a, b)


def test_corrupt_state_file_raises(tmp_path):
    from oryx_ts.state import State

    model = random_model()
    state = model.init_state(1)
    model.step(torch.randn(1, 8, 4), state)
    path = tmp_path / "state.safetensors"
    state.save(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="state file"):
        State.load(path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shared_parameter_fraction_is_at_least_90_percent(name, mixer):
    config = PRESETS[name].replace(block={"mixer": mixer})
    fraction = OryxForecaster(config).shared_parameter_fraction()
    assert 0.90 <= fraction < 1.0, f"{name}/{mixer}: {fraction:.3f}"


def test_shared_fraction_counts_the_mixer_specific_parameters():
    model = random_model()
    counts = model.blocks[0].mode_specific_parameters()
    c = model.config.block
    assert counts["attention"] == c.d_model * c.n_heads * c.head_dim_k + c.n_heads
    assert counts["linear"] > c.d_model * c.n_heads * c.head_dim_k


def test_nan_inputs_are_treated_as_missing(mixer):
    model = random_model(mixer)
    x = torch.randn(2, 12 * 8, 4)
    x[0, 10:40, 2] = float("nan")  # a missing stretch
    x[1, :8] = float("nan")  # a first patch with nothing observed
    x[1, 50, :] = float("nan")
    with torch.no_grad():
        y = model(x, (torch.rand(2, 12) < 0.5).float())
    assert torch.isfinite(y).all()
    # missingness is an input feature: the same values with and without a NaN give different forecasts
    x2 = x.clone()
    x2[0, 10:40, 2] = 0.0
    with torch.no_grad():
        assert rel_err(model(x2)[0, 5:], model(x)[0, 5:]) > 1e-4
    loss = model.loss(x)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "shape, fragment",
    [((2, 64), "shape"), ((2, 64, 3), r"\(batch, length multiple of 8, 4\)"), ((2, 63, 4), "multiple of 8"), ((2, 0, 4), "length")],
)
def test_wrong_input_shapes_raise_value_error_naming_the_expected_shape(shape, fragment):
    model = random_model()
    with pytest.raises(ValueError, match=fragment):
        model(torch.randn(*shape))


def test_wrong_step_inputs_raise_value_error():
    model = random_model()
    state = model.init_state(2)
    with pytest.raises(ValueError, match=r"\(batch, 8, 4\)"):
        model.step(torch.randn(2, 16, 4), state)
    with pytest.raises(ValueError, match="state holds 2 series"):
        model.step(torch.randn(3, 8, 4), state)
    with pytest.raises(ValueError, match="modes must have shape"):
        model(torch.randn(2, 16, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="inf"):
        model(torch.full((1, 8, 4), float("inf")))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model.step(torch.randn(2, 8, 4), state, torch.ones(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.step(torch.randn(2, 8, 4), state, torch.tensor([0.0, float("nan")]))
    assert int(state.n_tokens_B.sum()) == 0 and not state.slots, "a rejected patch must leave the state untouched"


def test_forecasts_follow_an_affine_change_of_units(mixer):
    # causal normalization makes the forecaster equivariant to scale and offset (up to norm_eps)
    model = random_model(mixer)
    x = torch.randn(2, 10 * 8, 4, dtype=torch.float64).float()
    with torch.no_grad():
        y = model(x)
        y_scaled = model(x * 100.0 + 7.0)
    assert rel_err(y_scaled, y * 100.0 + 7.0) < 1e-3


def test_quantiles_never_cross(mixer):
    model = random_model(mixer)
    with torch.no_grad():
        y = model(torch.randn(3, 9 * 8, 4) * 10)
    assert (np.diff(y.numpy(), axis=-1) > 0).all()


def test_state_memory_grows_only_with_retained_tokens():
    model = random_model()
    state = model.init_state(1, capacity=64)
    sizes = []
    for _ in range(6):
        model.step(torch.randn(1, 8, 4), state)
        sizes.append(state.nbytes())
    growth = np.diff(sizes)
    assert (growth == growth[0]).all() and growth[0] > 0
    c = model.config.block
    assert growth[0] == c.n_layers * c.n_heads * (c.head_dim_k + c.head_dim_v) * 4


BOUNDED = {"retention": "bounded", "window": 5, "pinned": 3}


@pytest.mark.parametrize("pinned", [0, 3])
def test_bounded_retention_step_equals_forward(mixer, pinned):
    gen = torch.Generator().manual_seed(7 + pinned)
    model = random_model(mixer, block={**BOUNDED, "pinned": pinned})
    B, T = 3, 2 * CHUNK + 9
    x = torch.randn(B, T * 8, 4, generator=gen)
    modes = (torch.rand(B, T, generator=gen) < 0.35).float()
    with torch.no_grad():
        parallel = model(x, modes)
        unbounded = random_model(mixer)
        unbounded.load_state_dict(model.state_dict())
        everything = unbounded(x, modes)
    assert rel_err(stream(model, x, modes), parallel) < 1e-4
    assert rel_err(everything, parallel) > 1e-3  # eviction really changes what attention sees


def test_bounded_until_matches_a_slot_simulation():
    from oryx_ts.state import NEVER, bounded_until

    gen = torch.Generator().manual_seed(3)
    window, pinned, T = 4, 2, 60
    m = (torch.rand(2, T, generator=gen) < 0.3).float()
    until = bounded_until(m, window, pinned)
    for b in range(2):
        recent, pins = [], []
        for t in range(T):
            recent.append(t)
            if len(recent) > window:
                leaving = recent.pop(0)
                if m[b, leaving] > 0.5:
                    pins = (pins + [leaving])[-pinned:]
            visible = set(recent) | set(pins)
            expected = {j for j in range(t + 1) if until[b, j] > t}
            assert visible == expected, (b, t)
        assert pins and any(until[b, j] == NEVER for j in pins), "the stream must exercise pinning"


def test_bounded_state_size_stays_constant():
    model = random_model(block=BOUNDED)
    state = model.init_state(2)
    sizes = []
    for n in range(40):
        model.step(torch.randn(2, 8, 4), state, (torch.rand(2) < 0.5).float())
        sizes.append(state.nbytes())
    assert len(set(sizes[BOUNDED["window"] + BOUNDED["pinned"] :])) == 1
    assert state.layers[0].k_cache_BSHK.shape[1] == BOUNDED["window"] + BOUNDED["pinned"]


def test_bounded_state_round_trips_through_a_file(tmp_path):
    from oryx_ts.state import State

    model = random_model("mamba2", block=BOUNDED)
    x = torch.randn(1, 30 * 8, 4)
    modes = (torch.rand(1, 30) < 0.5).float()
    state = model.init_state(1)
    for n in range(12):
        model.step(x[:, n * 8 : (n + 1) * 8], state, modes[:, n])
    state.save(tmp_path / "s.safetensors")
    restored = State.load(tmp_path / "s.safetensors")
    for n in range(12, 30):
        a, _ = model.step(x[:, n * 8 : (n + 1) * 8], state, modes[:, n])
        b, _ = model.step(x[:, n * 8 : (n + 1) * 8], restored, modes[:, n])
        assert torch.equal(a, b)


def test_state_of_another_model_is_refused():
    small = random_model(block={"n_layers": 1})
    with pytest.raises(ValueError, match="does not fit this model"):
        random_model().step(torch.randn(1, 8, 4), small.init_state(1))


def test_state_of_another_retention_policy_is_refused():
    bounded = random_model(block=BOUNDED)
    with pytest.raises(ValueError, match="retention"):
        bounded.step(torch.randn(1, 8, 4), random_model().init_state(1))


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_hard_shared_modes_take_the_same_output_as_the_general_mix(mixer):
    """Modes that are 0/1 and equal across series take a shortcut (attention rows copied into the
    recurrent output); a batch with one more, different series takes the general mix. The shared
    series must get the same outputs and the same gradients (inputs 1e-6, parameters 1e-5 relative: sums over series)."""
    from oryx_ts.block import OryxBlock

    model = random_model(mixer)
    block: OryxBlock = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, model.config.block.d_model, generator=g)
    m = (torch.rand(40, generator=g) < 0.3).float()[None].expand(2, -1)
    extra = torch.cat([x, torch.randn(1, 40, x.shape[-1], generator=g)])
    m_extra = torch.cat([m, 1 - m[:1]])

    def run(inp, modes):
        inp = inp.clone().requires_grad_()
        y = block(inp, modes)
        y[:2].pow(2).sum().backward()
        return y[:2].detach(), inp.grad[:2], [p.grad.clone() for p in block.parameters() if p.grad is not None]

    y_hard, dx_hard, dp_hard = run(x, m)
    block.zero_grad()
    y_mix, dx_mix, dp_mix = run(extra, m_extra)
    torch.testing.assert_close(y_hard, y_mix, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_hard, dx_mix, rtol=1e-6, atol=1e-6)
    assert len(dp_hard) == len(dp_mix) > 0
    for a, b in zip(dp_hard, dp_mix):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
