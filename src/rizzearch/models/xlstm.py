"""xLSTM language models (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

A residual stack of two block types (paper section 2.4, figures 9-11):

- **mLSTM block** (pre up-projection, fig. 10): LayerNorm -> up-projection to ``2 x inner`` (one half
  for the mLSTM branch, one half for the output gate ``z``) -> causal depthwise conv (k=4) + SiLU
  feeding q and k -> headwise (block-diagonal) q/k/v projections (v from the un-convolved branch)
  -> input/forget gates computed from ``[q, k, v]`` -> mLSTM cell (``rizzearch.ops.mlstm``) ->
  per-head group norm -> ``+ learnable_skip * conv_out`` -> ``* SiLU(z)`` -> down-projection.
- **sLSTM block** (post up-projection, fig. 9): LayerNorm -> causal conv + SiLU feeding the i/f
  gates -> headwise gate projections (z, o from the normed input) -> sLSTM cell with block-diagonal
  recurrent matrices (``rizzearch.ops.slstm``) -> per-head group norm -> residual; then
  LayerNorm -> gated GELU feed-forward (up-projection factor 4/3) -> residual.

``xLSTM[a:b]`` (the paper's ratio of mLSTM to sLSTM blocks) is set by ``slstm_at``, the positions
of the sLSTM blocks. Embedding -> blocks -> final LayerNorm -> LM head.

Initialisation (paper appendix / official code): "small init" N(0, sqrt(2 / (5 d))) for the
embedding, input projections and LM head; "wang init" N(0, 2 / (L sqrt(d))) for output projections;
mLSTM forget-gate bias linspace(3, 6) and input-gate bias N(0, 0.1) with zero gate weights; sLSTM
zero recurrent matrices and the block-dependent power-law forget-gate bias; norms at 1.

State (the CausalLM contract): ``{"blocks": [...]}`` with, per block,
``{"C": (B, NH, Dh, Dh), "n": (B, NH, Dh), "m": (B, NH), "conv": (B, K-1, inner)}`` for mLSTM and
``{"h", "c", "n", "m": (B, NH, Dh), "conv": (B, K-1, d_model)}`` for sLSTM; recurrent states and
stabilisers are fp32 whatever the activation dtype. Padded positions (``attention_mask == 0``)
leave the state unchanged: the conv reads the last K real inputs, the mLSTM sees a closed input
gate and an open forget gate there, the sLSTM keeps its previous state.

Deviations from the official NeurIPS code (``xlstm`` package), none of which changes the outputs
beyond fp32 rounding (the parity test checks 1e-4): LayerNorm weights are stored as the weight
itself (the official stores ``weight - 1``); the mLSTM normaliser has no ``+ 1e-6`` (see
``rizzearch.ops.mlstm``); the official sLSTM layer names its gate projections crosswise (its
``fgate`` module produces the input gate); ours are named by what they compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rizzearch.errors import ShapeError
from rizzearch.models.base import CausalLM, register_model
from rizzearch.ops.mlstm import mlstm_chunkwise, mlstm_step
from rizzearch.ops.slstm import slstm_forward, slstm_step

# A closed input gate / open forget gate for padded positions: exp(-1e4 - m) is exactly 0 in fp32.
_PAD_IGATE = -1e4
_PAD_FGATE = 1e4


@dataclass(frozen=True)
class XLSTMConfig:
    """xLSTM language model configuration.

    Args:
        vocab_size: number of token ids.
        d_model: residual stream width (embedding dimension).
        n_blocks: number of residual blocks.
        slstm_at: 0-based positions of the sLSTM blocks; every other block is an mLSTM block
            (``()`` = xLSTM[1:0], all positions = xLSTM[0:1]).
        mlstm_heads: heads of each mLSTM cell (inner width must be divisible by it).
        mlstm_proj_factor: up-projection factor of the mLSTM block (inner = factor x d_model,
            rounded up to a multiple of round_to).
        qkv_blocksize: block size of the block-diagonal q/k/v projections of the mLSTM block.
        slstm_heads: heads of each sLSTM cell (d_model must be divisible by it).
        ffn_proj_factor: up-projection factor of the gated feed-forward after each sLSTM cell.
        round_to: up-projection widths are rounded up to a multiple of this.
        conv_kernel: kernel size of the causal depthwise conv in mLSTM blocks.
        slstm_conv_kernel: kernel size of the causal depthwise conv in sLSTM blocks.
        chunk_size: chunk length of the chunkwise mLSTM used for sequences.
        bias: biases in the linear projections (up/down, q/k/v, feed-forward).
        tie_embeddings: share the input embedding and the LM head weights.
        norm_eps: epsilon of the LayerNorms and per-head group norms.
        dropout: dropout after each block's output projection (0 disables).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_blocks: int = 4
    slstm_at: tuple[int, ...] = (1,)
    mlstm_heads: int = 4
    mlstm_proj_factor: float = 2.0
    qkv_blocksize: int = 4
    slstm_heads: int = 4
    ffn_proj_factor: float = 4.0 / 3.0
    round_to: int = 64
    conv_kernel: int = 4
    slstm_conv_kernel: int = 4
    chunk_size: int = 64
    bias: bool = False
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "slstm_at", tuple(int(i) for i in self.slstm_at))
        for name in ("vocab_size", "d_model", "n_blocks", "mlstm_heads", "slstm_heads", "qkv_blocksize", "round_to",
                     "conv_kernel", "slstm_conv_kernel", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [i for i in self.slstm_at if not 0 <= i < self.n_blocks]
        if bad:
            raise ValueError(f"slstm_at: positions {bad} are outside 0..{self.n_blocks - 1} (n_blocks={self.n_blocks})")
        if len(set(self.slstm_at)) != len(self.slstm_at):
            raise ValueError(f"slstm_at: repeated positions in {list(self.slstm_at)}")
        if self.slstm_at and self.d_model % self.slstm_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by slstm_heads ({self.slstm_heads})")
        if len(self.slstm_at) < self.n_blocks:
            if self.inner_dim % self.mlstm_heads:
                raise ValueError(f"mLSTM inner width {self.inner_dim} must be divisible by mlstm_heads ({self.mlstm_heads})")
            if self.inner_dim % self.qkv_blocksize:
                raise ValueError(f"mLSTM inner width {self.inner_dim} must be divisible by qkv_blocksize ({self.qkv_blocksize})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def inner_dim(self) -> int:
        """Width of the mLSTM branch (up-projection of d_model)."""
        return _round_up(self.mlstm_proj_factor * self.d_model, self.round_to)

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the gated feed-forward of sLSTM blocks."""
        return _round_up(self.ffn_proj_factor * self.d_model, self.round_to)

    @property
    def block_types(self) -> list[str]:
        """``"m"`` or ``"s"`` per block position."""
        return ["s" if i in self.slstm_at else "m" for i in range(self.n_blocks)]

    @property
    def ratio(self) -> str:
        """The paper's name of the stack, e.g. ``xLSTM[7:1]``."""
        s = len(self.slstm_at)
        return f"xLSTM[{self.n_blocks - s}:{s}]"


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple - 1e-9)) * multiple


# ----------------------------------------------------------------------------------------------
# Small pure helpers


def small_init_(t: Tensor, dim: int) -> Tensor:
    """Nguyen & Salazar 2019 "small init": N(0, sqrt(2 / (5 dim)))."""
    return nn.init.normal_(t, 0.0, math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(t: Tensor, dim: int, n_blocks: int) -> Tensor:
    """GPT-NeoX "wang init" for output projections: N(0, 2 / (n_blocks sqrt(dim)))."""
    return nn.init.normal_(t, 0.0, 2.0 / n_blocks / math.sqrt(dim))


def conv_init_(weight: Tensor, bias: Tensor) -> None:
    """PyTorch's Conv1d default for a depthwise conv: U(-1/sqrt(K), 1/sqrt(K)). weight: (D, K), bias: (D,)."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


def layer_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LayerNorm with a weight and no bias."""
    return F.layer_norm(x, (x.shape[-1],), weight, None, eps)


def head_norm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Per-head group norm: normalise each head's features, then scale. h: (B, T, NH, Dh) -> (B, T, NH*Dh)."""
    B, T, NH, Dh = h.shape
    return F.layer_norm(h, (Dh,), None, None, eps).reshape(B, T, NH * Dh) * weight


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor, buf: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv with a carried buffer of the last K-1 inputs.

    x: (B, T, D); weight: (D, K) (``weight[:, K-1]`` multiplies the current input); bias: (D,);
    buf: (B, K-1, D) or None (zeros); mask: (B, T) bool or None. With a mask, each output reads the
    last K *real* inputs (padded positions are skipped, not zeroed), and the returned buffer holds
    the last K-1 real inputs, so padding leaves the conv state unchanged.
    """
    B, T, D = x.shape
    K = weight.shape[1]
    if buf is None:
        buf = x.new_zeros(B, K - 1, D)
    xx = torch.cat([buf.to(x.dtype), x], 1)  # (B, K-1+T, D)
    if mask is not None:
        valid = torch.cat([mask.new_ones(B, K - 1), mask], 1)  # (B, K-1+T)
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # real inputs first
        xx = xx.gather(1, order[..., None].expand(-1, -1, D))
    y = bias + weight[:, K - 1] * xx[:, K - 1 :]
    for j in range(K - 1):
        y = y + weight[:, j] * xx[:, j : j + T]  # (B, T, D)
    if mask is None:
        new_buf = xx[:, T:]
    else:
        cnt = valid.long().cumsum(1)  # (B, K-1+T)
        pos = (cnt[:, K - 1 :] - K).clamp_min(0)  # compacted output index of each position
        y = y.gather(1, pos[..., None].expand(-1, -1, D))
        last = cnt[:, -1:] - (K - 1) + torch.arange(K - 1, device=x.device)  # (B, K-1)
        new_buf = xx.gather(1, last[..., None].expand(-1, -1, D))
    return y, new_buf


class BlockLinear(nn.Module):
    """Block-diagonal linear map ("headwise" projection): ``in_features / block`` independent blocks.

    weight: (n_blocks, block, block), applied as y[..., h, o] = sum_i x[..., h, i] weight[h, o, i].
    """

    def __init__(self, features: int, block: int, bias: bool = False):
        super().__init__()
        self.n, self.block = features // block, block
        self.weight = nn.Parameter(torch.empty(self.n, block, block))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.einsum("...hi,hoi->...ho", x.reshape(*shape[:-1], self.n, self.block), self.weight)
        y = y.reshape(shape)
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------------------------
# Blocks


class MLSTMBlock(nn.Module):
    """The mLSTM block (pre up-projection); see the module docstring."""

    kind = "m"

    def __init__(self, cfg: XLSTMConfig):
        super().__init__()
        self.cfg = cfg
        E, inner, NH = cfg.d_model, cfg.inner_dim, cfg.mlstm_heads
        self.inner, self.NH, self.Dh = inner, NH, inner // NH
        self.norm = nn.Parameter(torch.ones(E))
        self.proj_up = nn.Linear(E, 2 * inner, bias=cfg.bias)
        self.conv_weight = nn.Parameter(torch.empty(inner, cfg.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(inner))
        self.q_proj = BlockLinear(inner, cfg.qkv_blocksize, bias=cfg.bias)
        self.k_proj = BlockLinear(inner, cfg.qkv_blocksize, bias=cfg.bias)
        self.v_proj = BlockLinear(inner, cfg.qkv_blocksize, bias=cfg.bias)
        self.igate = nn.Linear(3 * inner, NH)
        self.fgate = nn.Linear(3 * inner, NH)
        self.outnorm = nn.Parameter(torch.ones(inner))
        self.skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, E, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        cfg = self.cfg
        E = cfg.d_model
        nn.init.ones_(self.norm)
        small_init_(self.proj_up.weight, E)
        wang_init_(self.proj_down.weight, E, cfg.n_blocks)
        for lin in (self.proj_up, self.proj_down, self.q_proj, self.k_proj, self.v_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for p in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(p.weight, E)  # the official code uses d_model here, not the inner width
        conv_init_(self.conv_weight, self.conv_bias)
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, 0.0, 0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.NH))
        nn.init.ones_(self.outnorm)
        nn.init.ones_(self.skip)

    def init_state(self, B: int, device, dtype) -> dict:
        sd = torch.promote_types(dtype, torch.float32)
        return {
            "C": torch.zeros(B, self.NH, self.Dh, self.Dh, device=device, dtype=sd),
            "n": torch.zeros(B, self.NH, self.Dh, device=device, dtype=sd),
            "m": torch.full((B, self.NH), float("-inf"), device=device, dtype=sd),
            "conv": torch.zeros(B, self.cfg.conv_kernel - 1, self.inner, device=device, dtype=dtype),
        }

    def forward(self, x: Tensor, state: dict | None, mask: Tensor | None) -> tuple[Tensor, dict]:
        B, T, _ = x.shape
        NH, Dh, eps = self.NH, self.Dh, self.cfg.norm_eps
        xm, z = self.proj_up(layer_norm(x, self.norm, eps)).chunk(2, dim=-1)  # 2 x (B, T, inner)
        xc, conv = causal_conv(xm, self.conv_weight, self.conv_bias, None if state is None else state["conv"], mask)
        xc = F.silu(xc)
        q, k, v = self.q_proj(xc), self.k_proj(xc), self.v_proj(xm)  # (B, T, inner)
        gates_in = torch.cat([q, k, v], -1)  # (B, T, 3 inner)
        ig, fg = self.igate(gates_in), self.fgate(gates_in)  # (B, T, NH)
        if mask is not None:  # closed input gate, open forget gate: the state is carried unchanged
            ig = ig.masked_fill(~mask[..., None], _PAD_IGATE)
            fg = fg.masked_fill(~mask[..., None], _PAD_FGATE)
        init = None if state is None else (state["C"], state["n"], state["m"])
        if T == 1 and not torch.is_grad_enabled():
            heads = lambda t: t[:, 0].view(B, NH, Dh)  # noqa: E731  (B, NH, Dh)
            h, (C, n, m) = mlstm_step(heads(q), heads(k), heads(v), ig[:, 0], fg[:, 0], init)
            h = h[:, None]  # (B, 1, NH, Dh)
        else:
            heads = lambda t: t.view(B, T, NH, Dh).transpose(1, 2)  # noqa: E731  (B, NH, T, Dh)
            h, (C, n, m) = mlstm_chunkwise(
                heads(q), heads(k), heads(v), ig.transpose(1, 2), fg.transpose(1, 2),
                initial_state=init, return_state=True, chunk_size=self.cfg.chunk_size,
            )
            h = h.transpose(1, 2)  # (B, T, NH, Dh)
        h = head_norm(h, self.outnorm, eps) + self.skip * xc  # (B, T, inner)
        y = self.drop(self.proj_down(h * F.silu(z)))
        return x + y, {"C": C, "n": n, "m": m, "conv": conv}


class SLSTMBlock(nn.Module):
    """The sLSTM block (post up-projection) followed by its gated feed-forward; see the module docstring."""

    kind = "s"

    def __init__(self, cfg: XLSTMConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        E, NH = cfg.d_model, cfg.slstm_heads
        self.NH, self.Dh = NH, E // NH
        self.norm = nn.Parameter(torch.ones(E))
        self.conv_weight = nn.Parameter(torch.empty(E, cfg.slstm_conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(E))
        self.igate = BlockLinear(E, self.Dh)
        self.fgate = BlockLinear(E, self.Dh)
        self.zgate = BlockLinear(E, self.Dh)
        self.ogate = BlockLinear(E, self.Dh)
        self.R = nn.Parameter(torch.empty(NH, self.Dh, 4, self.Dh))  # (NH, Dh_in, gate, Dh_out)
        self.b = nn.Parameter(torch.empty(4, NH, self.Dh))  # (gate, NH, Dh)
        self.outnorm = nn.Parameter(torch.ones(E))
        self.ffn_norm = nn.Parameter(torch.ones(E))
        self.ffn_up = nn.Linear(E, 2 * cfg.ffn_dim, bias=cfg.bias)
        self.ffn_down = nn.Linear(cfg.ffn_dim, E, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self) -> None:
        cfg = self.cfg
        E = cfg.d_model
        nn.init.ones_(self.norm)
        conv_init_(self.conv_weight, self.conv_bias)
        for g in (self.igate, self.fgate, self.zgate, self.ogate):
            small_init_(g.weight, E)
        nn.init.zeros_(self.R)
        with torch.no_grad():
            # official "powerlaw_blockdependent" forget-gate bias; other gate biases 0
            self.b.zero_()
            ratio = self.index / (cfg.n_blocks - 1) if cfg.n_blocks > 1 else 0.0
            ramp = torch.arange(self.Dh) / max(self.Dh - 1, 1)
            self.b[1] = -(-5.0 + 12.0 * ramp ** (0.3 + 1.3 * ratio))
        nn.init.ones_(self.outnorm)
        nn.init.ones_(self.ffn_norm)
        small_init_(self.ffn_up.weight, E)
        wang_init_(self.ffn_down.weight, E, cfg.n_blocks)
        for lin in (self.ffn_up, self.ffn_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def init_state(self, B: int, device, dtype) -> dict:
        sd = torch.promote_types(dtype, torch.float32)
        z = lambda: torch.zeros(B, self.NH, self.Dh, device=device, dtype=sd)  # noqa: E731
        return {
            "h": z(), "c": z(), "n": z(),
            "m": torch.full((B, self.NH, self.Dh), float("-inf"), device=device, dtype=sd),
            "conv": torch.zeros(B, self.cfg.slstm_conv_kernel - 1, self.cfg.d_model, device=device, dtype=dtype),
        }

    def forward(self, x: Tensor, state: dict | None, mask: Tensor | None) -> tuple[Tensor, dict]:
        eps = self.cfg.norm_eps
        y, new_state = self.mixer(layer_norm(x, self.norm, eps), state, mask)
        x = x + self.drop(y)
        gate, up = self.ffn_up(layer_norm(x, self.ffn_norm, eps)).chunk(2, dim=-1)
        x = x + self.drop(self.ffn_down(F.gelu(gate) * up))
        return x, new_state

    def mixer(self, xn: Tensor, state: dict | None, mask: Tensor | None) -> tuple[Tensor, dict]:
        """The sLSTM layer proper (the official ``sLSTMLayer``): conv, gates, cell, group norm.

        xn: (B, T, E), already normalised -> (y (B, T, E), new state).
        """
        B, T, E = xn.shape
        NH, Dh, eps = self.NH, self.Dh, self.cfg.norm_eps
        xc, conv = causal_conv(xn, self.conv_weight, self.conv_bias, None if state is None else state["conv"], mask)
        xc = F.silu(xc)
        wx = torch.stack([self.igate(xc), self.fgate(xc), self.zgate(xn), self.ogate(xn)], 2)  # (B, T, 4, E)
        wx = wx.view(B, T, 4, NH, Dh)
        init = None if state is None else (state["h"], state["c"], state["n"], state["m"])
        if T == 1 and mask is None and not torch.is_grad_enabled():
            y, new = slstm_step(wx[:, 0], self.R, self.b, init)
            y = y[:, None]  # (B, 1, NH, Dh)
        else:
            y, new = slstm_forward(wx, self.R, self.b, initial_state=init, return_state=True, mask=mask)
        h, c, n, m = new
        return head_norm(y, self.outnorm, eps), {"h": h, "c": c, "n": n, "m": m, "conv": conv}


# ----------------------------------------------------------------------------------------------
# The model


@register_model("xlstm", XLSTMConfig, tiny=dict(n_blocks=2, d_model=64, slstm_at=(1,), mlstm_heads=4, slstm_heads=4, chunk_size=16))
class XLSTM(CausalLM):
    """xLSTM[a:b] language model; its state holds every block's recurrent state and conv buffer."""

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            SLSTMBlock(config, i) if kind == "s" else MLSTMBlock(config) for i, kind in enumerate(config.block_types)
        )
        self.norm = nn.Parameter(torch.ones(config.d_model))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """The paper's initialisation (module docstring)."""
        small_init_(self.embed.weight, self.config.d_model)
        if not self.config.tie_embeddings:
            small_init_(self.lm_head.weight, self.config.d_model)
        nn.init.ones_(self.norm)
        for block in self.blocks:
            block.init_weights()

    # -- state ----------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        return {"blocks": [b.init_state(batch_size, device, dtype) for b in self.blocks]}

    def _check_state(self, state, B: int) -> None:
        if not isinstance(state, dict) or set(state) != {"blocks"} or not isinstance(state["blocks"], (list, tuple)):
            raise ShapeError("state: expected an xLSTM state {'blocks': [...]} (from XLSTM.init_state or a forward)")
        if len(state["blocks"]) != len(self.blocks):
            raise ShapeError(
                f"state['blocks']: expected {len(self.blocks)} blocks, got {len(state['blocks'])} (state from another config?)"
            )
        want = self.init_state(B, device="meta")
        for i, (got_b, want_b) in enumerate(zip(state["blocks"], want["blocks"])):
            if not isinstance(got_b, dict) or set(got_b) != set(want_b):
                keys = sorted(got_b) if isinstance(got_b, dict) else type(got_b).__name__
                raise ShapeError(
                    f"state['blocks'][{i}]: expected keys {sorted(want_b)} ({self.config.block_types[i]}LSTM block), got {keys} "
                    "(state from another config?)"
                )
            for key, w in want_b.items():
                g = got_b[key]
                if not isinstance(g, Tensor) or tuple(g.shape) != tuple(w.shape):
                    shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                    raise ShapeError(
                        f"state['blocks'][{i}]['{key}']: expected shape {tuple(w.shape)}, got {shape} "
                        "(state from another config or batch size?)"
                    )

    # -- forward --------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, state=None, attention_mask: Tensor | None = None):
        """tokens (B, T) -> logits (B, T, V) and the state after the last token."""
        return self._recurrent_forward(tokens, state, attention_mask)

    def _run(self, tokens: Tensor, state, mask: Tensor | None):
        x = self.embed(tokens)  # (B, T, E)
        states = []
        for i, block in enumerate(self.blocks):
            x, st = block(x, None if state is None else state["blocks"][i], mask)
            states.append(st)
        logits = self.lm_head(layer_norm(self._head_rows(x), self.norm, self.config.norm_eps))  # (B, T, V); (B, 1, V) in prefill
        return logits, {"blocks": states}

    # -- sizes ----------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """6 N (matmul parameters incl. the LM head) + the chunkwise mLSTM's sequence terms.

        Per token and mLSTM block (forward): scores and values over the chunk,
        ``2 L NH (Dqk + Dv)`` with ``L = min(seq_len, chunk_size)``, plus the state read/write
        ``4 NH Dqk Dv``; training counts 3x the forward.
        """
        L = min(seq_len, self.config.chunk_size)
        extra = 0.0
        for b in self.blocks:
            if b.kind == "m":
                extra += 2 * L * b.NH * 2 * b.Dh + 4 * b.NH * b.Dh * b.Dh
        return super().flops_per_token(seq_len) + 3.0 * extra
