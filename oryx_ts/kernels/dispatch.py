"""The one place that decides which implementation of a mixer op runs.

`backend="auto"` picks the fast path for CUDA tensors when its packages are installed and the
shapes are ones it takes, and the torch reference otherwise; `backend="torch"` always takes the
reference; `backend="triton"` asks for the fast path and raises `ValueError` where it cannot run.
`last_backend` records the path taken by the most recent call of each op ("torch" or "triton"),
and `last_backend["<op>_impl"]` which library served a fast call, so tests can prove which ran.

Fast paths (all Triton; imported on first use, so the CPU install never imports triton):
    linear_chunk  gdn: fla `chunk_gated_delta_rule`; mamba2: mamba-ssm `mamba_chunk_scan_combined`
                  (differentiable) or fla `chunk_simple_gla` (`impl="fla"`; forward-only on Hopper
                  with triton < 3.7.1)
    linear_step   our fused single-token kernel (`kernels.step_triton`), any number of series
    layer_step    one layer's mixers for one token per series in one launch (`kernels.step_triton`:
                  recurrent update, slot plan on the KV cache, attention for the series whose mode
                  is nonzero, mode mix), no host sync; its twin is `kernels.step_naive`
    mixer_step    the model's streaming step of a mixer: `layer_step` with its prologue (short convs
                  over the tails, activations, L2 norms, gates, RoPE) and output gate, three launches
                  from one projection of the token; twin `step_naive.naive_mixer_step`
    routed_attention  our routed-query kernel (`kernels.attention.routed_triton`); per-key eviction
                  positions (`k_until_BS`) still take the torch path
    routed_inputs the parallel forward's routed queries (gather, L2 norm, RoPE) and rotated keys as one
                  `torch.compile`d graph (Inductor's Triton kernels), forward and backward; `auto` takes it
                  on CUDA up to ROUTED_INPUTS_COMPILE_MAX_TOKENS tokens, unless ORYX_COMPILE_ROUTED_INPUTS=0
    rms_norm      one launch per RMSNorm (`kernels.norm_triton`), twin `kernels.norm_naive`;
                  `add_rms_norm` the residual add with the norm after it, `swiglu` SwiGLU's activation
    rope          fla's fused rotary kernel (one pass forward, one backward) with our fp32 tables
                  rounded to the input dtype

Measured on an H100 (docs/BENCHMARKS.md): every fast path matches its reference in bf16; fla's
GDN backward with fp32 inputs fails to compile in TileLang there, so `auto` sends fp32 GDN training
on Hopper with triton < 3.7.1 to the torch path (train in bf16 for speed); fla's fp32
`chunk_simple_gla` is slow to compile.

Legend: B batch, T tokens, H heads, K key dim, V value dim, S retained keys.
"""

import importlib.util
import os
from functools import cache
from typing import Literal

import torch

from oryx_ts.kernels.attention.naive import routed_attention as _routed_attention_torch
from oryx_ts.kernels.attention.naive import routed_inputs as _routed_inputs_torch
from oryx_ts.kernels.attention.rope import rope as _rope_torch
from oryx_ts.kernels.attention.rope import rope_tables
from oryx_ts.kernels.gdn.naive import gdn_step, naive_chunk_gdn
from oryx_ts.kernels.mamba2.naive import naive_chunk_ssd, ssd_step
from oryx_ts.kernels.step_naive import naive_layer_step

Backend = Literal["auto", "torch", "triton"]
Mixer = Literal["gdn", "mamba2"]
Mamba2Impl = Literal["auto", "mamba_ssm", "fla"]

last_backend: dict[str, str] = {}


@cache
def _installed(package: str) -> bool:
    """Whether a top-level package is installed; `find_spec` locates it without importing it."""
    return importlib.util.find_spec(package) is not None


def fast_path_available(device: torch.device, op: str | None = None) -> tuple[bool, str]:
    """Whether the Triton path can run on `device` (for `op`, if given), and why not when it cannot.

    `op` is one of "gdn_chunk", "mamba2_chunk", "linear_step", "routed_attention"; None asks
    only about the device and triton.
    """
    if device.type != "cuda":
        return False, f"tensors are on {device.type}, the fast path needs CUDA"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if not _installed("triton"):
        return False, "triton is not installed"
    if op == "gdn_chunk" and not _installed("fla"):
        return False, "fla (flash-linear-attention) is not installed"
    if op == "mamba2_chunk" and not (_installed("mamba_ssm") or _installed("fla")):
        return False, "neither mamba-ssm nor fla is installed"
    return True, ""


@cache
def _fla_bwd_via_tilelang(device_index: int) -> bool:
    """fla 0.6 hands its gated-chunk backward to TileLang on Hopper with triton < 3.7.1 (fla issue 640)."""
    import triton

    major, minor, patch = (int("".join(c for c in part if c.isdigit()) or 0) for part in (triton.__version__.split(".") + ["0", "0"])[:3])
    return torch.cuda.get_device_capability(device_index)[0] == 9 and (major, minor, patch) < (3, 7, 1)


def _shape_ok(op: str, q: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    K, V = q.shape[-1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"dtype {q.dtype} is not supported"
    if (
        op == "gdn_chunk"
        and v.dtype == torch.float32
        and torch.is_grad_enabled()
        and (q.requires_grad or v.requires_grad)
        and _fla_bwd_via_tilelang(q.device.index or 0)
    ):
        # measured on an H100: TileLang fails to compile that backward for fp32 inputs
        return False, "fla's GDN backward on Hopper with triton < 3.7.1 (TileLang) does not compile for fp32; use bf16"
    if op == "routed_attention":
        return (True, "") if 16 <= K <= 128 and 16 <= V <= 128 else (False, f"head dims must lie in [16, 128], got K={K}, V={V}")
    if op in ("linear_step", "layer_step"):
        return (True, "") if K * V <= 128 * 128 else (False, f"state {K}x{V} is larger than 128x128")
    # fla and mamba-ssm chunk kernels: tensor-core tiles need dims of at least 16
    return (True, "") if 16 <= K <= 256 and 16 <= V <= 256 else (False, f"head dims must lie in [16, 256], got K={K}, V={V}")


def select_backend(x: torch.Tensor, backend: Backend, op: str | None = None, v: torch.Tensor | None = None) -> str:
    """Resolve `backend` for tensors like `x`; raises `ValueError` if the fast path is demanded but unavailable."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return "torch"
    ok, why = fast_path_available(x.device, op)
    if ok and op is not None:
        ok, why = _shape_ok(op, x, x if v is None else v)
    if backend == "triton" and not ok:
        raise ValueError(f"backend='triton' cannot run: {why}")
    return "triton" if ok else "torch"


def linear_chunk(
    mixer: Mixer,
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor | None,
    *,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: Backend = "auto",
    impl: Mamba2Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel (chunked) linear mixer over T tokens. Returns `(o_BTHV, final_state_BHKV)`.

    `chunk_size` applies to the torch path; the fast kernels use their own (fla 64, mamba-ssm
    256), which changes only rounding. `impl` picks the mamba2 fast kernel: "auto" takes
    mamba-ssm when installed, else fla.
    """
    if mixer not in ("gdn", "mamba2"):
        raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")
    if impl not in ("auto", "mamba_ssm", "fla"):
        raise ValueError(f"impl must be 'auto', 'mamba_ssm' or 'fla', got {impl!r}")
    path = select_backend(q_BTHK, backend, f"{mixer}_chunk", v_BTHV)
    if path == "triton" and mixer == "mamba2":
        if impl == "auto":
            impl = "mamba_ssm" if _installed("mamba_ssm") else "fla"
        if not _installed(impl):
            if backend == "triton":
                raise ValueError(f"backend='triton' cannot run: {impl} is not installed")
            path = "torch"
    last_backend["linear_chunk"] = path
    if path == "triton":
        if mixer == "gdn":
            from oryx_ts.kernels.gdn.fast import fla_chunk_gdn

            last_backend["linear_chunk_impl"] = "fla"
            return fla_chunk_gdn(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state=initial_state)
        from oryx_ts.kernels.mamba2.fast import fla_chunk_ssd, mamba_ssm_chunk_ssd

        last_backend["linear_chunk_impl"] = impl
        fn = mamba_ssm_chunk_ssd if impl == "mamba_ssm" else fla_chunk_ssd
        return fn(q_BTHK, k_BTHK, v_BTHV, g_BTH, initial_state=initial_state)
    last_backend["linear_chunk_impl"] = "torch"
    if mixer == "gdn":
        return naive_chunk_gdn(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state=initial_state, chunk_size=chunk_size)
    if mixer == "mamba2":
        return naive_chunk_ssd(q_BTHK, k_BTHK, v_BTHV, g_BTH, initial_state=initial_state, chunk_size=chunk_size)
    raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")


def linear_step(
    mixer: Mixer,
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor | None,
    state_BHKV: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the linear mixer. Returns `(o_BHV, new_state_BHKV)`; the input state is not modified."""
    if mixer not in ("gdn", "mamba2"):
        raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")
    path = select_backend(q_BHK, backend, "linear_step", v_BHV)
    last_backend["linear_step"] = path
    if path == "triton":
        from oryx_ts.kernels.step_triton import recurrent_step_triton

        return recurrent_step_triton(mixer, q_BHK, k_BHK, v_BHV, g_BH, beta_BH, state_BHKV)
    if mixer == "gdn":
        return gdn_step(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, state_BHKV)
    if mixer == "mamba2":
        return ssd_step(q_BHK, k_BHK, v_BHV, g_BH, state_BHKV)
    raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")


def use_layer_step(x: torch.Tensor, k_dim: int, v_dim: int) -> bool:
    """Whether the model's streaming step takes `layer_step`'s fused kernel for tensors like `x`.

    True on CUDA with triton and a state of at most 128x128 per head, outside `torch.compile`
    (which traces the block's general path). The block then computes the attention query for every
    series and hands the modes to the kernel as a device tensor: no host sync.
    """
    if torch.compiler.is_compiling() or not fast_path_available(x.device, "layer_step")[0]:
        return False
    # the kernel pairs RoPE partners by index, so K is a power of two
    pow2 = k_dim & (k_dim - 1) == 0
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and pow2 and k_dim <= 128 and v_dim <= 128


def layer_step(mixer: Mixer, *args, backend: Backend = "auto", **kwargs) -> torch.Tensor:
    """One streaming step of a layer's mixers; see `step_triton.fused_layer_step` for the arguments.

    The fast path is one Triton launch; the torch path is `step_naive.naive_layer_step`. Both
    update the recurrent state and the KV cache in place and return o_BHV.
    """
    if mixer not in ("gdn", "mamba2"):
        raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")
    q, v = args[0], args[2]
    path = select_backend(q, backend, "layer_step", v)
    last_backend["layer_step"] = path
    if path == "triton":
        from oryx_ts.kernels.step_triton import fused_layer_step

        return fused_layer_step(mixer, *args, **kwargs)
    return naive_layer_step(mixer, *args, **kwargs)


def mixer_step(mixer: Mixer, proj_BN: torch.Tensor, state_BHKV: torch.Tensor, *, backend: Backend = "auto", **kwargs) -> torch.Tensor:
    """One streaming step of a mixer from the token's projections; see `step_naive.naive_mixer_step`.

    The fast path is three Triton launches (`step_triton.fused_mixer_step`); the torch path is the twin.
    Both update the conv tails, the recurrent state and the KV cache in place and return the gated
    output `(B, H * V)`.
    """
    if mixer not in ("gdn", "mamba2"):
        raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")
    K, V = state_BHKV.shape[-2:]
    path = select_backend(proj_BN, backend)
    # the kernel pairs RoPE partners by index (K a power of two) and holds a head's state in registers
    why = "" if K & (K - 1) == 0 and K <= 128 and V <= 128 else f"needs a power-of-two K <= 128 and V <= 128, got K={K}, V={V}"
    if path == "triton" and why:
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run: the fused mixer step {why}")
        path = "torch"
    last_backend["mixer_step"] = path
    if path == "triton":
        from oryx_ts.kernels.step_triton import fused_mixer_step

        return fused_mixer_step(mixer, proj_BN, state_BHKV, **kwargs)
    from oryx_ts.kernels.step_naive import naive_mixer_step

    return naive_mixer_step(mixer, proj_BN, state_BHKV, **kwargs)


def _norm_path(op: str, x: torch.Tensor, weight: torch.Tensor, backend: Backend) -> str:
    path = "torch" if backend == "auto" and torch.compiler.is_compiling() else select_backend(x, backend)
    if path == "triton" and torch.promote_types(x.dtype, weight.dtype) != x.dtype:
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run: weight {weight.dtype} widens x {x.dtype}")
        path = "torch"
    last_backend[op] = path
    return path


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: Backend = "auto") -> torch.Tensor:
    """RMSNorm over the last axis (`norm_naive.rms_norm`); the fast path is one Triton launch.

    `auto` takes it on CUDA outside `torch.compile` when the weight does not widen x's dtype.
    """
    if _norm_path("rms_norm", x, weight, backend) == "triton":
        from oryx_ts.kernels.norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    from oryx_ts.kernels.norm_naive import rms_norm as _rms_norm_torch

    return _rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it, `(x + res, rms_norm(x + res))` (`norm_naive.add_rms_norm`);
    the fast path is one Triton launch, taken as `rms_norm`'s is."""
    if _norm_path("add_rms_norm", x, weight, backend) == "triton":
        from oryx_ts.kernels.norm_triton import add_rms_norm_triton

        return add_rms_norm_triton(x, res, weight, eps)
    from oryx_ts.kernels.norm_naive import add_rms_norm as _add_rms_norm_torch

    return _add_rms_norm_torch(x, res, weight, eps)


def swiglu(gate_up: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """SwiGLU's activation `silu(gate) * up` of `[gate | up]` (`norm_naive.swiglu`); the fast path is one
    Triton launch (no autograd: the streaming step), taken on CUDA outside `torch.compile`."""
    path = "torch" if backend == "auto" and torch.compiler.is_compiling() else select_backend(gate_up, backend)
    last_backend["swiglu"] = path
    if path == "triton":
        from oryx_ts.kernels.norm_triton import swiglu_triton

        return swiglu_triton(gate_up)
    from oryx_ts.kernels.norm_naive import swiglu as _swiglu_torch

    return _swiglu_torch(gate_up)


def routed_attention(
    q_BTqHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    *,
    q_pos_Tq: torch.Tensor,
    k_pos_S: torch.Tensor,
    scale_H: torch.Tensor,
    k_valid_BS: torch.Tensor | None = None,
    k_until_BS: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Causal softmax attention for routed queries only; see `kernels.attention.naive.routed_attention`.

    Per-key eviction positions (`k_until_BS`, the parallel form of bounded retention) run on the
    torch path; the streaming step expresses the same retention as a slot mask (`k_valid_BS`).

    The fast path needs `q_pos_Tq` and `k_pos_S` ascending to stay proportional to the routed
    queries (it stays correct otherwise), and returns zeros for a query that sees no key.
    """
    if k_until_BS is not None:
        if backend == "triton":
            raise ValueError("backend='triton' cannot run: per-key eviction positions (k_until_BS) need the torch path")
        backend = "torch"
    path = select_backend(q_BTqHK, backend, "routed_attention", v_BSHV)
    last_backend["routed_attention"] = path
    if path == "triton":
        from oryx_ts.kernels.attention.routed_triton import routed_attention_triton

        return routed_attention_triton(
            q_BTqHK, k_BSHK, v_BSHV, q_pos_Tq=q_pos_Tq, k_pos_S=k_pos_S, scale_H=scale_H, k_valid_BS=k_valid_BS
        )
    return _routed_attention_torch(
        q_BTqHK, k_BSHK, v_BSHV, q_pos_Tq=q_pos_Tq, k_pos_S=k_pos_S, scale_H=scale_H, k_valid_BS=k_valid_BS, k_until_BS=k_until_BS
    )


# the compiled graph pays where the layer is bound by host launches (short inputs); at T=32k the eager ops are
# faster (docs/BENCHMARKS.md, H200 2026-12-03: layer fwd+bwd at 10% / 25% routed, compiled 0.92x / 0.96x
# the eager ops at T=8k, 1.05x / 1.05x at T=32k, the 32k figures seen in three calls on two days)
ROUTED_INPUTS_COMPILE_MAX_TOKENS = 16384


@cache
def _routed_inputs_compiled():
    # dynamic shapes: one graph for every count of routed tokens and every length
    return torch.compile(_routed_inputs_torch, dynamic=True)


def routed_inputs(
    k_BTHK: torch.Tensor,
    q_BTX: torch.Tensor,
    idx_Tq: torch.Tensor,
    pos_T: torch.Tensor,
    *,
    rope_base: float | None,
    eps: float = 1e-6,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention's keys and queries in the parallel forward; see `kernels.attention.naive.routed_inputs`.

    Fast path (CUDA, outside another `torch.compile`): that function under `torch.compile`, one
    fused graph forward and one backward in place of about 30 eager ops, whose host launches bound
    the layer at short lengths. Torch path: the same ops eagerly, with `rope` (fla's fused rotation
    on CUDA). `auto` takes the fast path where it can run (CUDA) for inputs of at most
    `ROUTED_INPUTS_COMPILE_MAX_TOKENS` tokens (B * T), where it is faster, and the eager ops above;
    `ORYX_COMPILE_ROUTED_INPUTS=0` keeps the eager ops everywhere (the graph's first call compiles
    for tens of seconds). On the CPU `auto` is always the torch path.
    """
    if backend == "auto" and (os.environ.get("ORYX_COMPILE_ROUTED_INPUTS") == "0"
                              or k_BTHK.shape[0] * k_BTHK.shape[1] > ROUTED_INPUTS_COMPILE_MAX_TOKENS):
        backend = "torch"
    path = select_backend(k_BTHK, backend)
    if path == "triton" and torch.compiler.is_compiling():
        path = "torch"  # an enclosing compile traces the eager ops itself
    last_backend["routed_inputs"] = path
    if path == "triton":
        return _routed_inputs_compiled()(k_BTHK, q_BTX, idx_Tq, pos_T, rope_base, eps)
    B, T, H, K = k_BTHK.shape
    q = q_BTX[:, idx_Tq].view(B, idx_Tq.numel(), H, K)
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + eps)
    if rope_base is None:
        return k_BTHK, q
    return rope(k_BTHK, pos_T, base=rope_base), rope(q, pos_T[idx_Tq], base=rope_base)


def rope(x_BTHK: torch.Tensor, pos_T: torch.Tensor, *, base: float = 10000.0, backend: Backend = "auto") -> torch.Tensor:
    """Rotary embedding of `x_BTHK` at absolute positions `pos_T`; see `kernels.attention.rope.rope`."""
    path = select_backend(x_BTHK, backend)
    if path == "triton" and not (_installed("fla") and x_BTHK.shape[-1] % 2 == 0 and x_BTHK.shape[-1] <= 256):
        if backend == "triton":
            raise ValueError("backend='triton' cannot run: rope needs fla and an even head dim <= 256")
        path = "torch"
    last_backend["rope"] = path
    if path == "torch":
        return _rope_torch(x_BTHK, pos_T, base=base)
    from fla.modules.rotary import rotary_embedding

    cos, sin = (t.to(x_BTHK.dtype) for t in rope_tables(pos_T, x_BTHK.shape[-1], base=base))
    return rotary_embedding(x_BTHK, cos, sin)
