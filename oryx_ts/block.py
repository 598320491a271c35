"""The Oryx block: one set of shared K/V projections feeding two mixers, attention and a linear recurrence.

Legend: B batch, T tokens, D model dim, H heads, K key dim, V value dim, W conv width, S cache slots.

Both states are advanced at every token whatever its mode: its (k, v) enters the KV cache and the
recurrent state takes the update. The per-token mode m only selects the output,
`o = m * o_att + (1 - m) * o_lin`. Parameters whose names start with `att_` or `lin_` belong to
one mixer; everything else is shared.

`OryxMixer.extend` is the single code path for both uses: the parallel forward (T tokens from an
empty or given state) and the streaming step (T = 1 against the state).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from oryx_ts.config import BlockConfig
from oryx_ts.kernels import dispatch
from oryx_ts.state import LayerState, SlotPlan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class ShortConv(nn.Module):
    """Depthwise causal convolution over tokens; the last W-1 inputs are the streaming tail."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.randn(dim, 1, width) / math.sqrt(width))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x_BTX: torch.Tensor, tail_BWX: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(y_BTX, new_tail_BWX)`; a missing tail means zeros (start of stream)."""
        B, T, X = x_BTX.shape
        if tail_BWX is None:
            tail_BWX = x_BTX.new_zeros(B, self.width - 1, X)
        full = torch.cat([tail_BWX.to(x_BTX.dtype), x_BTX], dim=1)
        y = F.conv1d(full.transpose(1, 2), self.weight, self.bias, groups=X).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.width - 1) :]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _inv_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class OryxMixer(nn.Module):
    """Shared K/V/z/o around a softmax-attention mixer and a linear mixer (`gdn` or `mamba2`)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.config = c = config
        D, H, K, V, W = c.d_model, c.n_heads, c.head_dim_k, c.head_dim_v, c.conv_size
        # shared
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.k_conv = ShortConv(H * K, W)
        self.v_conv = ShortConv(H * V, W)
        self.z_proj = nn.Linear(D, H * V, bias=False)
        self.o_norm = RMSNorm(V, c.norm_eps)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        # attention-specific: query and per-head temperature on L2-normalized q, k
        self.att_q = nn.Linear(D, H * K, bias=False)
        self.att_log_temp = nn.Parameter(torch.full((H,), math.log(10.0)))
        # linear-specific: query (with its conv) and the small gate parameters
        self.lin_q = nn.Linear(D, H * K, bias=False)
        self.lin_q_conv = ShortConv(H * K, W)
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        self.lin_dt_bias = nn.Parameter(_inv_softplus(dt))
        self.lin_A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        if c.mixer == "gdn":
            self.lin_a = nn.Linear(D, H, bias=False)
            self.lin_beta = nn.Linear(D, H, bias=False)
        else:
            self.lin_dt = nn.Linear(D, H, bias=False)
            self.lin_D = nn.Parameter(torch.ones(H))

    def _qkv(self, u_BTD: torch.Tensor, st: LayerState | None):
        c = self.config
        B, T, _ = u_BTD.shape
        H, K, V = c.n_heads, c.head_dim_k, c.head_dim_v
        act = F.silu if c.mixer == "gdn" else (lambda t: t)
        k, tail_k = self.k_conv(self.k_proj(u_BTD), st.conv_k_BWX if st else None)
        v, tail_v = self.v_conv(self.v_proj(u_BTD), st.conv_v_BWX if st else None)
        q, tail_q = self.lin_q_conv(self.lin_q(u_BTD), st.conv_q_BWX if st else None)
        k_BTHK = _l2norm(act(k).view(B, T, H, K))
        v_BTHV = act(v).view(B, T, H, V)
        q_lin_BTHK = _l2norm(act(q).view(B, T, H, K))
        return q_lin_BTHK, k_BTHK, v_BTHV, (tail_k, tail_v, tail_q)

    def _linear(self, u_BTD, q_BTHK, k_BTHK, v_BTHV, st: LayerState | None):
        c = self.config
        A = -torch.exp(self.lin_A_log.float())
        if c.mixer == "gdn":
            g = A * F.softplus(self.lin_a(u_BTD).float() + self.lin_dt_bias)
            beta = torch.sigmoid(self.lin_beta(u_BTD).float())
            v_in = v_BTHV
        else:
            dt = F.softplus(self.lin_dt(u_BTD).float() + self.lin_dt_bias)
            g, beta = A * dt, None
            v_in = v_BTHV * dt[..., None].to(v_BTHV.dtype)
        init = st.rec_BHKV if st is not None else None
        if st is not None and u_BTD.shape[1] == 1:
            o, rec = dispatch.linear_step(
                c.mixer, q_BTHK[:, 0], k_BTHK[:, 0], v_in[:, 0], g[:, 0], None if beta is None else beta[:, 0], init
            )
            o = o[:, None]
        else:
            o, rec = dispatch.linear_chunk(c.mixer, q_BTHK, k_BTHK, v_in, g, beta, initial_state=init, chunk_size=c.chunk_size)
        if c.mixer == "mamba2":
            o = o + self.lin_D[:, None].to(o.dtype) * v_BTHV
        return o, rec

    def extend(
        self,
        u_BTD: torch.Tensor,
        m_BT: torch.Tensor,
        st: LayerState | None,
        pos0: int,
        *,
        k_until_BT: torch.Tensor | None = None,
        plan: SlotPlan | None = None,
    ) -> torch.Tensor:
        """Mix T new tokens at positions pos0.. given a layer state (None: empty stream, nothing kept).

        With a state, its KV cache, recurrent state and conv tails are updated in place. Bounded
        retention comes as `k_until_BT` (parallel form, no state) or as a `plan` (one step).
        """
        c = self.config
        B, T, _ = u_BTD.shape
        H, V = c.n_heads, c.head_dim_v
        q_lin, k, v, tails = self._qkv(u_BTD, st)
        o_lin, rec = self._linear(u_BTD, q_lin, k, v, st)

        pos_T = torch.arange(pos0, pos0 + T, device=u_BTD.device)
        # one host sync per layer: which tokens any series routes to attention, and whether the modes
        # are hard (0/1) and equal across series, where the output can take o_att rows as they are
        routed_T = (m_BT != 0).any(0)
        hard = ((m_BT == 0) | (m_BT == 1)).all() & (m_BT == m_BT[:1]).all()
        flags = torch.cat([routed_T, hard[None]]).cpu()
        idx = flags[:-1].nonzero().squeeze(1).to(u_BTD.device)
        k_att = dispatch.rope(k, pos_T, base=c.rope_base) if c.rope and (st is not None or idx.numel()) else k
        if st is not None:
            keys, values, k_pos, k_valid = self._write_cache(st, k_att, v, pos0, plan)
        else:
            keys, values, k_pos, k_valid = k_att, v, pos_T, None

        if idx.numel():
            q_att = _l2norm(self.att_q(u_BTD[:, idx]).view(B, idx.numel(), H, c.head_dim_k))
            if c.rope:
                q_att = dispatch.rope(q_att, pos_T[idx], base=c.rope_base)
            o_sel = dispatch.routed_attention(
                q_att, keys, values, q_pos_Tq=pos_T[idx], k_pos_S=k_pos, scale_H=self.att_log_temp.exp(),
                k_valid_BS=k_valid, k_until_BS=k_until_BT,
            ).to(o_lin.dtype)
            if flags[-1]:
                o = o_lin.index_copy(1, idx, o_sel)
            else:
                m = m_BT.to(o_lin.dtype)[..., None, None]
                o = m * o_lin.new_zeros(B, T, H, V).index_copy(1, idx, o_sel) + (1 - m) * o_lin
        else:
            o = o_lin

        if st is not None:
            st.rec_BHKV = rec.detach()
            st.conv_k_BWX, st.conv_v_BWX, st.conv_q_BWX = (t.detach() for t in tails)

        z = self.z_proj(u_BTD).view(B, T, H, V)
        o = self.o_norm(o.to(u_BTD.dtype)) * F.silu(z)
        return self.o_proj(o.reshape(B, T, H * V))

    @staticmethod
    def _write_cache(st: LayerState, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, pos0: int, plan: SlotPlan | None):
        """Put the new keys and values into the cache; returns what attention reads: keys, values, positions, validity."""
        T = k_BTHK.shape[1]
        if plan is None:  # retention `all`: slot = position
            st.ensure_capacity(pos0 + T)
            st.k_cache_BSHK[:, pos0 : pos0 + T] = k_BTHK.detach()
            st.v_cache_BSHV[:, pos0 : pos0 + T] = v_BTHV.detach()
            k_pos = torch.arange(pos0 + T, device=k_BTHK.device)
            return st.k_cache_BSHK[:, : pos0 + T], st.v_cache_BSHV[:, : pos0 + T], k_pos, None
        assert T == 1, "bounded retention advances a state one token at a time"
        rows = plan.pin_rows_B.nonzero().squeeze(1)
        for cache, new in ((st.k_cache_BSHK, k_BTHK), (st.v_cache_BSHV, v_BTHV)):
            cache[rows, plan.pin_slot_B[rows]] = cache[rows, plan.write_slot]
            cache[:, plan.write_slot] = new[:, 0].detach()
        # every retained slot holds a past token: visibility is the slot mask alone
        k_pos = torch.zeros(st.k_cache_BSHK.shape[1], dtype=torch.long, device=k_BTHK.device)
        return st.k_cache_BSHK, st.v_cache_BSHV, k_pos, plan.valid_BS

    def init_layer_state(self, batch_size: int, capacity: int, device=None, dtype=torch.float32) -> LayerState:
        c = self.config
        H, K, V, W = c.n_heads, c.head_dim_k, c.head_dim_v, c.conv_size
        z = lambda *s, dt=dtype: torch.zeros(*s, device=device, dtype=dt)  # noqa: E731
        return LayerState(
            k_cache_BSHK=z(batch_size, capacity, H, K),
            v_cache_BSHV=z(batch_size, capacity, H, V),
            rec_BHKV=z(batch_size, H, K, V, dt=torch.float32),
            conv_k_BWX=z(batch_size, W - 1, H * K),
            conv_v_BWX=z(batch_size, W - 1, H * V),
            conv_q_BWX=z(batch_size, W - 1, H * K),
        )


class OryxBlock(nn.Module):
    """Pre-norm residual block: `x + mixer(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = OryxMixer(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(
        self,
        x_BTD: torch.Tensor,
        m_BT: torch.Tensor,
        st: LayerState | None = None,
        pos0: int = 0,
        *,
        k_until_BT: torch.Tensor | None = None,
        plan: SlotPlan | None = None,
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.mixer.extend(self.mixer_norm(x_BTD), m_BT, st, pos0, k_until_BT=k_until_BT, plan=plan)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))

    def mode_specific_parameters(self) -> dict[str, int]:
        """Parameter counts of the attention-only, linear-only and shared parts."""
        counts = {"attention": 0, "linear": 0, "shared": 0}
        for name, p in self.named_parameters():
            leaf = name.split(".")[-2] if name.endswith(("weight", "bias")) else name.split(".")[-1]
            part = "attention" if leaf.startswith("att_") else "linear" if leaf.startswith("lin_") else "shared"
            counts[part] += p.numel()
        return counts
