"""The Oryx block: one set of shared K/V projections feeding two mixers, attention and a linear recurrence.

Legend: B batch, T tokens, D model dim, H heads, K key dim, V value dim, W conv width, S cache slots.

Both states are advanced at every token whatever its mode: its (k, v) enters the KV cache and the
recurrent state takes the update. The per-token mode m only selects the output,
`o = m * o_att + (1 - m) * o_lin`. Parameters whose names start with `att_` or `lin_` belong to
one mixer; everything else is shared.

`OryxMixer.forward` runs T tokens of a stream from its start; `OryxMixer.step` runs one token of
each series against its state, every series at its own position; `OryxMixer.prefill` runs T
tokens of each series against its state, as T steps would. They share the projections,
convolutions and linear mixer (`_qkv`, `_projections`, `_linear`, `_output`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from oryx_ts.config import BlockConfig
from oryx_ts.kernels import dispatch
from oryx_ts.state import ChunkPlan, LayerState, SlotPlan


ATTENTION_LOGITS = 1 << 24  # `OryxMixer.prefill`: most attention logits computed at once (64 MB in fp32)



def _routing_flags(m_BT: torch.Tensor):
    """On the host: which tokens any series routes to attention, and (last entry) whether the modes are
    hard (0/1) and equal across series, where the output can take attention's rows as they are.

    Returns `(flags, done)`. On CUDA the copy is only queued (pinned memory) and `done` is its event:
    call `done.synchronize()` before reading the flags, as late as possible, so the host keeps
    launching the layer's first kernels meanwhile instead of draining the device (None: ready)."""
    routed_T = (m_BT != 0).any(0)
    hard = ((m_BT == 0) | (m_BT == 1)).all() & (m_BT == m_BT[:1]).all()
    flags = torch.cat([routed_T, hard[None]])
    if not flags.is_cuda or torch.compiler.is_compiling():
        return flags.cpu(), None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _routed_index(flags: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The positions of the routed tokens (`flags[:-1]` set) on `device`, copied without a host sync."""
    idx = flags[:-1].nonzero().squeeze(1)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def _step_cat(owner: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)` of weights for the streaming step, kept on `owner` until a weight changes (its
    storage or in-place version): the step would otherwise copy the weights on every call. Not kept with
    autograd on, nor while a CUDA graph captures (the graph then re-reads the live weights on each replay)."""
    if torch.is_grad_enabled() or (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.cat(tensors)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    cached = owner.__dict__.get("_step_cat_cache")
    if cached is None or cached[0] != key:
        cached = owner.__dict__["_step_cat_cache"] = (key, torch.cat(tensors))
    return cached[1]


def _merge_routed(o_lin: torch.Tensor, idx: torch.Tensor, o_sel: torch.Tensor, m_BT: torch.Tensor, *, every_row: bool) -> torch.Tensor:
    """The mixer output: attention's rows `o_sel` at token positions `idx`, recurrence elsewhere. When not
    every row routes the token at a position (`every_row` False), the per-row modes `m_BT` blend the two."""
    if every_row:
        return o_lin.index_copy(1, idx, o_sel)
    m = m_BT.to(o_lin.dtype)[..., None, None]
    return m * torch.zeros_like(o_lin).index_copy(1, idx, o_sel) + (1 - m) * o_lin

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
        return causal_conv(x_BTX, self.weight, self.bias, tail_BWX)


def causal_conv(x_BTX: torch.Tensor, weight_X1W: torch.Tensor, bias_X: torch.Tensor, tail_BWX: torch.Tensor | None):
    """Depthwise causal convolution of `x_BTX` after the W-1 inputs `tail_BWX` (None: zeros).

    Returns `(y_BTX, new_tail_BWX)`. The parallel forward runs several `ShortConv`s as one call
    on their concatenated channels and weights.
    """
    B, T, X = x_BTX.shape
    width = weight_X1W.shape[-1]
    if tail_BWX is None:
        full = F.pad(x_BTX, (0, 0, width - 1, 0))
    else:
        full = torch.cat([tail_BWX.to(x_BTX.dtype), x_BTX], dim=1)
    if T == 1:
        # a streaming step: a weighted sum over the window is far cheaper than conv1d's setup on CPU
        y = ((full * weight_X1W[:, 0].t()).sum(1) + bias_X)[:, None]
    else:
        y = F.conv1d(full.transpose(1, 2), weight_X1W, bias_X, groups=X).transpose(1, 2)
    return y, full[:, full.shape[1] - (width - 1) :]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one matmul for both input projections: on CPU the call overhead of a small matmul counts
        gate, up = F.linear(x, torch.cat([self.gate.weight, self.up.weight])).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for the streaming step (no autograd): the activation is one launch on CUDA (`dispatch.swiglu`)."""
        return self.down(dispatch.swiglu(F.linear(x, _step_cat(self, [self.gate.weight, self.up.weight]))))


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

    def _projections(self, u_BTD: torch.Tensor, st: LayerState | None = None):
        """`_qkv` for T tokens (from the stream's start, or after `st`'s conv tails), plus z and the raw gates,
        as one matmul and one convolution.

        The same arithmetic as the separate projections and convolutions (`_qkv`, `_gates`,
        `_output`), in a few large ops: at training sizes on CPU, the count of small ops is what
        costs. Returns `(q_lin, k, v, tails, att_q_BTX, z_BTX, gates_raw_BTG)`; `att_q` before its norm.
        """
        c = self.config
        B, T, _ = u_BTD.shape
        H, K, V = c.n_heads, c.head_dim_k, c.head_dim_v
        x = F.linear(u_BTD, self._step_weight())
        kvq, att_q, z, gates = x.split([2 * H * K + H * V, H * K, H * V, x.shape[-1] - 3 * H * K - 2 * H * V], dim=-1)
        convs = (self.k_conv, self.v_conv, self.lin_q_conv)
        tail = None if st is None else torch.cat([st.conv_k_BWX, st.conv_v_BWX, st.conv_q_BWX], dim=-1)
        y, tail = causal_conv(kvq, torch.cat([cv.weight for cv in convs]), torch.cat([cv.bias for cv in convs]), tail)
        if c.mixer == "gdn":
            y = F.silu(y)
        k, v, q = y.split([H * K, H * V, H * K], dim=-1)
        tails = tail.split([H * K, H * V, H * K], dim=-1)
        return _l2norm(q.reshape(B, T, H, K)), _l2norm(k.reshape(B, T, H, K)), v.reshape(B, T, H, V), tails, att_q, z, gates

    def _gates(self, u_BTD, raw_BTG: torch.Tensor | None = None):
        """fp32 log decay `g_BTH` and the second gate: beta (gdn) or dt (mamba2, which steps on dt * v).

        `raw_BTG`: the gate projections of `u_BTD` when the caller has them (`_projections`).
        """
        A = -torch.exp(self.lin_A_log.float())
        if self.config.mixer == "gdn":
            a, b = (self.lin_a(u_BTD), self.lin_beta(u_BTD)) if raw_BTG is None else raw_BTG.chunk(2, dim=-1)
            return A * F.softplus(a.float() + self.lin_dt_bias), torch.sigmoid(b.float())
        dt = F.softplus((self.lin_dt(u_BTD) if raw_BTG is None else raw_BTG).float() + self.lin_dt_bias)
        return A * dt, dt

    def _linear(self, u_BTD, q_BTHK, k_BTHK, v_BTHV, st: LayerState | None, gates_raw: torch.Tensor | None = None):
        c = self.config
        g, gate = self._gates(u_BTD, gates_raw)
        if c.mixer == "gdn":
            beta, v_in = gate, v_BTHV
        else:
            beta, v_in = None, v_BTHV * gate[..., None].to(v_BTHV.dtype)
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

    def forward(
        self,
        u_BTD: torch.Tensor,
        m_BT: torch.Tensor,
        *,
        k_until_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix T tokens of a stream from its start; bounded retention comes as `k_until_BT`."""
        c = self.config
        T = u_BTD.shape[1]
        # the routing flags go to the host while the projections and the linear mixer are launched
        flags, done = _routing_flags(m_BT)
        q_lin, k, v, tails, att_q_all, z, gates_raw = self._projections(u_BTD)
        o_lin, rec = self._linear(u_BTD, q_lin, k, v, None, gates_raw)

        pos_T = torch.arange(T, device=u_BTD.device)
        if done is not None:
            done.synchronize()
        idx = _routed_index(flags, u_BTD.device)
        if idx.numel():
            keys, q_att = dispatch.routed_inputs(k, att_q_all, idx, pos_T, rope_base=c.rope_base if c.rope else None)
            o_sel = dispatch.routed_attention(
                q_att, keys, v, q_pos_Tq=pos_T[idx], k_pos_S=pos_T, scale_H=self.att_log_temp.exp(), k_until_BS=k_until_BT,
            ).to(o_lin.dtype)
            o = _merge_routed(o_lin, idx, o_sel, m_BT, every_row=bool(flags[-1]))
        else:
            o = o_lin
        return self._output(u_BTD, o, z)

    def prefill(self, u_BTD: torch.Tensor, m_BT: torch.Tensor, st: LayerState, plan: ChunkPlan) -> torch.Tensor:
        """Mix T tokens of every series continuing from the layer state, as T `step`s would; `st` is updated in place.

        The linear mixer runs in its chunked form from `st`'s recurrent state and conv tails;
        routed queries attend over the cached slots still visible to them plus the chunk's own
        keys up to their position (`plan`, from `State.plan_chunk`). Positions inside the chunk
        are relative to each series' first token, so series may start at different positions.
        """
        c = self.config
        B, T, _ = u_BTD.shape
        H, K = c.n_heads, c.head_dim_k
        flags, done = _routing_flags(m_BT)
        q_lin, k, v, tails, att_q_all, z, gates_raw = self._projections(u_BTD, st)
        o_lin, rec = self._linear(u_BTD, q_lin, k, v, st, gates_raw)
        # RoPE at each series' own positions: the (series, token) pairs stand in for the token axis of `rope`
        at = lambda x, pos: dispatch.rope(x.reshape(1, -1, *x.shape[2:]), pos.reshape(-1), base=c.rope_base).view(x.shape)  # noqa: E731
        keys = at(k, plan.pos_BT) if c.rope else k

        if done is not None:
            done.synchronize()
        idx = _routed_index(flags, u_BTD.device)
        if idx.numel():
            S = plan.old_valid_BS.shape[1]
            t_T = torch.arange(T, device=u_BTD.device)
            q_att = _l2norm(att_q_all[:, idx].view(B, idx.numel(), H, K))
            if c.rope:
                q_att = at(q_att, plan.pos_BT[:, idx])
            k_all = torch.cat([st.k_cache_BSHK[:, :S].to(keys.dtype), keys], 1)
            v_all = torch.cat([st.v_cache_BSHV[:, :S].to(v.dtype), v], 1)
            # every cached slot precedes every chunk query (relative position -1)
            k_pos = torch.cat([t_T.new_full((S,), -1), t_T])
            valid = torch.cat([plan.old_valid_BS, plan.old_valid_BS.new_ones(B, T)], 1)
            until = None
            if plan.until_BT is not None:
                until = torch.cat([plan.old_until_BS, plan.until_BT], 1) - plan.pos_BT[:, :1]
            # queries in groups whose logits stay under ATTENTION_LOGITS elements, however long the cache
            per = max(1, ATTENTION_LOGITS // (B * H * k_all.shape[1]))
            o_sel = torch.cat([
                dispatch.routed_attention(
                    q_att[:, i : i + per], k_all, v_all, q_pos_Tq=t_T[idx[i : i + per]], k_pos_S=k_pos,
                    scale_H=self.att_log_temp.exp(), k_valid_BS=valid, k_until_BS=until,
                ) for i in range(0, idx.numel(), per)
            ], dim=1).to(o_lin.dtype)
            o = _merge_routed(o_lin, idx, o_sel, m_BT, every_row=bool(flags[-1]))
        else:
            o = o_lin

        for cache, new in ((st.k_cache_BSHK, keys), (st.v_cache_BSHV, v)):
            if plan.move_BS is not None:
                b_idx, s_idx = (plan.move_BS >= 0).nonzero(as_tuple=True)
                cache[b_idx, s_idx] = cache[b_idx, plan.move_BS[b_idx, s_idx]]  # gathered before the writes below
            b_idx, t_idx = (plan.slot_BT >= 0).nonzero(as_tuple=True)
            cache[b_idx, plan.slot_BT[b_idx, t_idx]] = new[b_idx, t_idx].detach().to(cache.dtype)
        st.rec_BHKV = rec.detach().to(st.rec_BHKV.dtype)
        st.conv_k_BWX, st.conv_v_BWX, st.conv_q_BWX = (t.detach().contiguous() for t in tails)
        return self._output(u_BTD, o, z)

    def _output(self, u_BTD: torch.Tensor, o_BTHV: torch.Tensor, z_BTX: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        B, T, _ = u_BTD.shape
        z = (self.z_proj(u_BTD) if z_BTX is None else z_BTX).view(B, T, c.n_heads, c.head_dim_v)
        o = self.o_norm(o_BTHV.to(u_BTD.dtype)) * F.silu(z)
        return self.o_proj(o.reshape(B, T, c.n_heads * c.head_dim_v))

    def step(
        self, u_B1D: torch.Tensor, m_B: torch.Tensor, st: LayerState, pos_B: torch.Tensor, plan: SlotPlan, att_rows: torch.Tensor
    ) -> torch.Tensor:
        """One token per series at its own position `pos_B`, against the layer state (updated in place).

        `plan` says where each series' key and value go (and which leaving token is pinned);
        `att_rows` are the series whose mode is not 0 (only they compute the attention query); None
        computes it for every series (no host sync, for compiled steps).
        """
        c = self.config
        B = u_B1D.shape[0]
        H, K = c.n_heads, c.head_dim_k
        if dispatch.use_layer_step(u_B1D, K, c.head_dim_v):
            return self._step_fused(u_B1D, m_B, st, pos_B, plan)
        q_lin, k, v, tails = self._qkv(u_B1D, st)
        o_lin, rec = self._linear(u_B1D, q_lin, k, v, st)
        # RoPE at per-series positions: the series axis stands in for the token axis of `rope`
        k_att = dispatch.rope(k.transpose(0, 1), pos_B, base=c.rope_base).transpose(0, 1) if c.rope else k
        rows = torch.arange(B, device=u_B1D.device)
        for cache, new in ((st.k_cache_BSHK, k_att), (st.v_cache_BSHV, v)):
            if plan.pin_B is not None:
                moved = torch.where(plan.pin_B[:, None, None], cache[rows, plan.write_slot_B], cache[rows, plan.pin_slot_B])
                cache[rows, plan.pin_slot_B] = moved
            cache[rows, plan.write_slot_B] = new[:, 0].detach().to(cache.dtype)
        st.rec_BHKV = rec.detach().to(st.rec_BHKV.dtype)  # fp32 unless the state was allocated in bf16/fp16
        st.conv_k_BWX, st.conv_v_BWX, st.conv_q_BWX = (t.detach() for t in tails)

        o = o_lin
        if att_rows is None or att_rows.numel():
            pick = (lambda t: t) if att_rows is None else (lambda t: t[att_rows])  # noqa: E731
            R = B if att_rows is None else att_rows.numel()
            q_att = _l2norm(self.att_q(pick(u_B1D)).view(R, 1, H, K))
            if c.rope:
                q_att = dispatch.rope(q_att.transpose(0, 1), pick(pos_B), base=c.rope_base).transpose(0, 1)
            zero = torch.zeros(1, dtype=torch.long, device=u_B1D.device)
            S = st.k_cache_BSHK.shape[1]
            # every valid slot holds a past token of that series (or the new one): visibility is the slot mask alone
            o_att = dispatch.routed_attention(
                q_att, pick(st.k_cache_BSHK), pick(st.v_cache_BSHV), q_pos_Tq=zero,
                k_pos_S=zero.expand(S), scale_H=self.att_log_temp.exp(), k_valid_BS=pick(plan.valid_BS),
            ).to(o_lin.dtype)
            m = pick(m_B).to(o_lin.dtype)[:, None, None, None]
            blended = torch.where(m == 1, o_att, m * o_att + (1 - m) * pick(o_lin))
            o = blended if att_rows is None else o_lin.index_copy(0, att_rows, blended)
        return self._output(u_B1D, o)

    def _step_weight(self, *, cached: bool = False) -> torch.Tensor:
        """The token's projections as one matrix, in the order `dispatch.mixer_step` reads them (and `_projections`);
        `cached`: kept between steps until a weight changes (`_step_cat`)."""
        gates = [self.lin_a.weight, self.lin_beta.weight] if self.config.mixer == "gdn" else [self.lin_dt.weight]
        weights = [self.k_proj.weight, self.v_proj.weight, self.lin_q.weight, self.att_q.weight, self.z_proj.weight, *gates]
        return _step_cat(self, weights) if cached else torch.cat(weights)

    def _step_fused(self, u_B1D, m_B, st: LayerState, pos_B, plan: SlotPlan) -> torch.Tensor:
        """`step` through `dispatch.mixer_step`: one projection, then one launch for the rest of the mixer
        (convs, gates, RoPE, both mixers, output gate) of every series; modes on the device, tails,
        state and cache updated in place."""
        c = self.config
        if st.rec_BHKV.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not st.rec_BHKV.is_contiguous():
            st.rec_BHKV = st.rec_BHKV.to(torch.float32, memory_format=torch.contiguous_format)
        for name in ("conv_k_BWX", "conv_v_BWX", "conv_q_BWX"):  # the kernel moves the tails on in place
            if getattr(st, name).stride(-1) != 1:
                setattr(st, name, getattr(st, name).contiguous())
        o = dispatch.mixer_step(
            c.mixer, F.linear(u_B1D[:, 0], self._step_weight(cached=True)), st.rec_BHKV,
            tails=(st.conv_k_BWX, st.conv_v_BWX, st.conv_q_BWX),
            conv_weights=(self.k_conv.weight, self.v_conv.weight, self.lin_q_conv.weight),
            conv_biases=(self.k_conv.bias, self.v_conv.bias, self.lin_q_conv.bias),
            a_log_H=self.lin_A_log, dt_bias_H=self.lin_dt_bias, o_norm_weight_V=self.o_norm.weight, o_norm_eps=self.o_norm.eps,
            pos_B=pos_B if c.rope else None, rope_base=c.rope_base,
            k_cache_BSHK=st.k_cache_BSHK, v_cache_BSHV=st.v_cache_BSHV,
            write_slot_B=plan.write_slot_B, valid_BS=plan.valid_BS, route_B=m_B, scale_H=self.att_log_temp.exp(),
            pin_B=plan.pin_B, pin_slot_B=plan.pin_slot_B,
            # retention `all`: slot = position, so the slots past the new token are empty and need no scan
            len_B=plan.write_slot_B + 1 if c.retention == "all" else None,
            d_H=self.lin_D if c.mixer == "mamba2" else None,
        )
        return self.o_proj(o[:, None])


class OryxBlock(nn.Module):
    """Pre-norm residual block: `x + mixer(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = OryxMixer(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x_BTD: torch.Tensor, m_BT: torch.Tensor, *, k_until_BT: torch.Tensor | None = None) -> torch.Tensor:
        x_BTD = x_BTD + self.mixer(self.mixer_norm(x_BTD), m_BT, k_until_BT=k_until_BT)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))

    def prefill(self, x_BTD, m_BT, st: LayerState, plan: ChunkPlan) -> torch.Tensor:
        """T tokens per series continuing from the layer state; see `OryxMixer.prefill`."""
        x_BTD = x_BTD + self.mixer.prefill(self.mixer_norm(x_BTD), m_BT, st, plan)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))

    def step(
        self, x_B1D, m_B, st: LayerState, pos_B, plan: SlotPlan, att_rows, *,
        normed_B1D: torch.Tensor | None = None, next_norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per series; see `OryxMixer.step`. Returns `(x_B1D, next_norm(x_B1D))`, the second None
        without `next_norm` (the next block's `mixer_norm` or the model's final norm).

        `normed_B1D` is `self.mixer_norm(x_B1D)` when the caller has it (the previous block's second
        output). Each residual add and the norm after it are one op (`dispatch.add_rms_norm`: one
        launch on CUDA), with `forward`'s arithmetic.
        """
        n = self.mixer_norm
        h = dispatch.rms_norm(x_B1D, n.weight, n.eps) if normed_B1D is None else normed_B1D
        x_B1D, h = dispatch.add_rms_norm(x_B1D, self.mixer.step(h, m_B, st, pos_B, plan, att_rows), self.mlp_norm.weight, self.mlp_norm.eps)
        y = self.mlp.step(h)
        if next_norm is None:
            return x_B1D + y, None
        return dispatch.add_rms_norm(x_B1D, y, next_norm.weight, next_norm.eps)

    def mode_specific_parameters(self) -> dict[str, int]:
        """Parameter counts of the attention-only, linear-only and shared parts."""
        counts = {"attention": 0, "linear": 0, "shared": 0}
        for name, p in self.named_parameters():
            leaf = name.split(".")[-2] if name.endswith(("weight", "bias")) else name.split(".")[-1]
            part = "attention" if leaf.startswith("att_") else "linear" if leaf.startswith("lin_") else "shared"
            counts[part] += p.numel()
        return counts
