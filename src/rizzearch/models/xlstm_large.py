"""The xLSTM-7B architecture (Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for Fast and Efficient
Inference"; NX-AI's ``xlstm.xlstm_large`` / transformers' ``xLSTMForCausalLM``).

A residual stack of identical mLSTM blocks, each (paper section 3, fig. 2)::

    x = x + out_proj( sigmoid(o) * MultiHeadLayerNorm( mLSTM(q, k, v, capped i, capped f) ) )
        with q, k, v, o, i, f linear in RMSNorm(x)
    x = x + down( SiLU(gate(RMSNorm(x))) * up(RMSNorm(x)) )            (SwiGLU feed-forward)

then RMSNorm and the LM head, whose logits are soft-capped. Unlike the NeurIPS mLSTM block
(``models/xlstm.py``) there is no up-projection around the cell, no causal conv and no learnable
skip: the projections act on the normed residual stream directly, and the cell runs at
``qk_dim = d_model x qk_dim_factor`` (keys/queries) and ``v_dim = d_model x v_dim_factor`` (values).

- Soft cap (Gemma-2 style): ``cap(x, c) = c tanh(x / c)`` on the input- and forget-gate
  pre-activations (``gate_soft_cap``, 15) and on the output logits (``logit_soft_cap``, 30).
- Norms: RMSNorm before the mLSTM layer, before the feed-forward and after the stack; a per-head
  LayerNorm (mean and variance over each head's ``Dv`` features, one weight over ``v_dim``) on the
  cell output. Reductions run in fp32.
- Feed-forward width: ``round_up(d_model x ffn_proj_factor, ffn_round_to)`` computed exactly as the
  official code does (``((x + m - 1) // m) x m`` on the float product; for a product with a
  fractional part this can round *down* by one multiple, and checkpoints rely on it).
- The cell is ``rizzearch.ops.mlstm`` (exponential input gate, sigmoid forget gate in log space,
  stabiliser ``m``, normaliser ``max(|n.q|, exp(-m))``): ``mlstm_chunkwise`` for sequences (any
  T, state in and out). Without gradient (fp32 on the CPU) the model runs ``_fused`` instead: the
  same matmuls with one C call for each piece between them (``ops/mlstm/native.py``: the chunkwise
  mLSTM for T > 1, the step for one token), for prefill and decoding alike.
- ``prefill`` (the prompt of a generation: the state and the last position's logits) runs the last
  block past its cell, the final norm and the head on the last position only: the state needs every
  position's k, v and gates, nothing reads the other positions' outputs (llama.cpp skips the same
  rows): 39% of the matmul work of the small benchmark config at T = 256, ~5% of the 7B model's.

Weights are stored fused (the official ``weight_mode="fused"`` layout): ``qkvo`` is one
``d_model -> 2 qk_dim + 2 v_dim`` projection, ``if_gate`` one ``d_model -> 2 NH`` projection with
bias, ``ffn_up`` one ``d_model -> 2 ffn_dim`` projection (gate half first); decoding reads each
weight matrix once per token.

State: ``{"blocks": [{"C": (B, NH, Dqk, Dv), "n": (B, NH, Dqk), "m": (B, NH)}, ...]}`` in fp32.
Padded positions (``attention_mask == 0``) see a closed input gate and an open forget gate, so
the state passes through them unchanged.

Deviations from the official code (the parity tests in ``tests/models/test_xlstm_large_parity.py``
bound their effect on the logits at 1e-4): the official kernels divide by
``max(|n.q|, exp(-m)) + eps`` (eps = 1e-6), we add no eps (``rizzearch.ops.mlstm``'s docstring says
why); the eps changes each head's output by a per-(token, head) scale, which the per-head
LayerNorm that follows removes up to its own eps. The empty state has ``m = -inf`` (theirs starts
at ``m = 0``); ``C`` and ``n`` hold ``k / sqrt(Dqk)`` where theirs hold ``k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.models.base import CausalLM, register_model
from rizzearch.ops import backends, packed_gemm
from rizzearch.ops.mlstm import mlstm_chunkwise, mlstm_step
from rizzearch.ops.mlstm import native as nat


PACKED_MIN_ROWS = 16  # packed matrix copies serve products of at least this many rows (decoding is faster without)
PACKED_MIN_OUT = 64  # ... and matrices with at least this many outputs (the 2 NH gate projection is faster without)
HEAD_ROWS = 64  # packed: the head runs in blocks of rows, each soft-capped while its logits are in cache


@dataclass(frozen=True)
class XLSTMLargeConfig:
    """xLSTM-7B architecture configuration (defaults: the released 7B model).

    Args:
        vocab_size: Vocabulary size.
        d_model: Residual stream width (official ``embedding_dim``, HF ``hidden_size``).
        n_blocks: Number of mLSTM blocks (official ``num_blocks``).
        n_heads: mLSTM heads per block.
        qk_dim_factor: Query/key width as a fraction of ``d_model`` (``int(d_model x factor)``).
        v_dim_factor: Value width as a fraction of ``d_model``.
        ffn_proj_factor: Feed-forward width as a multiple of ``d_model`` before rounding.
        ffn_round_to: The feed-forward width is rounded to a multiple of this (official formula).
        gate_soft_cap: Soft cap of the input/forget gate pre-activations (None: no cap).
        logit_soft_cap: Soft cap of the output logits (None: no cap).
        norm_eps: Epsilon of the RMSNorms and the per-head LayerNorm.
        use_bias: Biases on the q/k/v/o, feed-forward and output projections and on the norms.
        add_out_norm: RMSNorm after the last block.
        chunk_size: Chunk length of the chunkwise mLSTM (sequences of any length run).
        tie_embeddings: Share the embedding matrix with the LM head.
    """

    vocab_size: int = 50304
    d_model: int = 4096
    n_blocks: int = 32
    n_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_to: int = 64
    gate_soft_cap: float | None = 15.0
    logit_soft_cap: float | None = 30.0
    norm_eps: float = 1e-6
    use_bias: bool = False
    add_out_norm: bool = True
    chunk_size: int = 64
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_blocks", "n_heads", "ffn_round_to", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gate_soft_cap", "logit_soft_cap"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(self, name)}")
        for name, dim in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim)):
            if dim < self.n_heads or dim % self.n_heads:
                raise ValueError(f"{name} = {dim} (d_model x {name}_factor) must be a positive multiple of n_heads = {self.n_heads}")

    @property
    def qk_dim(self) -> int:
        return int(self.d_model * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.d_model * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        """The official rounding: ``int(((x + m - 1) // m) * m)`` on the float product ``x``."""
        x, m = self.d_model * self.ffn_proj_factor, self.ffn_round_to
        return int(((x + m - 1) // m) * m)


# ----------------------------------------------------------------------------------------------
# Small pure helpers


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """``cap tanh(x / cap)``: smooth, odd, slope 1 at 0, bounded by ``cap`` (None: identity)."""
    return x if cap is None else cap * torch.tanh(x / cap)


def rms_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim, reduced in fp32, then ``* weight (+ bias)`` in x's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one kernel
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    else:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight  # x * rsqrt(mean(x^2) + eps)
    return y if bias is None else y + bias


def head_layer_norm(h: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over each head's features: h (B, T, NH, Dv) -> (B, T, NH * Dv), fp32 reductions."""
    B, T, NH, Dv = h.shape
    y = F.layer_norm(h.float(), (Dv,), eps=eps).to(h.dtype).reshape(B, T, NH * Dv) * weight  # (h - mean) / sqrt(var + eps)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------
# The block


class XLSTMLargeBlock(nn.Module):
    """Pre-norm mLSTM layer + pre-norm SwiGLU feed-forward, both residual (module docstring)."""

    def __init__(self, cfg: XLSTMLargeConfig):
        super().__init__()
        self.cfg = cfg
        d, qk, v, NH, bias = cfg.d_model, cfg.qk_dim, cfg.v_dim, cfg.n_heads, cfg.use_bias
        self.NH, self.Dqk, self.Dv = NH, qk // NH, v // NH
        self.norm_mlstm = nn.Parameter(torch.ones(d))
        self.norm_mlstm_bias = nn.Parameter(torch.zeros(d)) if bias else None
        self.qkvo = nn.Linear(d, 2 * qk + 2 * v, bias=bias)  # [q | k | v | o]
        self.if_gate = nn.Linear(d, 2 * NH, bias=True)  # [i | f]
        self.head_norm = nn.Parameter(torch.ones(v))
        self.head_norm_bias = nn.Parameter(torch.zeros(v)) if bias else None
        self.out_proj = nn.Linear(v, d, bias=bias)
        self.norm_ffn = nn.Parameter(torch.ones(d))
        self.norm_ffn_bias = nn.Parameter(torch.zeros(d)) if bias else None
        self.ffn_up = nn.Linear(d, 2 * cfg.ffn_dim, bias=bias)  # [gate | up]
        self.ffn_down = nn.Linear(cfg.ffn_dim, d, bias=bias)

    def init_state(self, B: int, device) -> dict:
        return {
            "C": torch.zeros(B, self.NH, self.Dqk, self.Dv, device=device),
            "n": torch.zeros(B, self.NH, self.Dqk, device=device),
            "m": torch.full((B, self.NH), float("-inf"), device=device),
        }

    def mlstm(self, xn: Tensor, state: dict | None, mask: Tensor | None, last_only: bool = False) -> tuple[Tensor, dict]:
        """The mLSTM layer on the normed input xn (B, T, d) -> (B, T, d) ((B, 1, d) with ``last_only``), new state."""
        B, T, _ = xn.shape
        cfg, NH, Dqk, Dv = self.cfg, self.NH, self.Dqk, self.Dv
        q, k, v, o = self.qkvo(xn).split([cfg.qk_dim, cfg.qk_dim, cfg.v_dim, cfg.v_dim], -1)
        ig, fg = soft_cap(self.if_gate(xn), cfg.gate_soft_cap).float().split([NH, NH], -1)  # (B, T, NH)
        if mask is not None:  # closed input gate, open forget gate: the state is carried unchanged
            ig = ig.masked_fill(~mask[..., None], nat.PAD_IGATE)
            fg = fg.masked_fill(~mask[..., None], nat.PAD_FGATE)
        init = None if state is None else (state["C"], state["n"], state["m"])
        if T == 1 and not torch.is_grad_enabled():
            h, (C, n, m) = mlstm_step(
                q.view(B, NH, Dqk), k.view(B, NH, Dqk), v.reshape(B, NH, Dv), ig.view(B, NH), fg.view(B, NH), init
            )
            h = h.view(B, 1, NH, Dv)
        else:
            heads = lambda t, D: t.reshape(B, T, NH, D).transpose(1, 2)  # noqa: E731  (B, NH, T, D)
            h, (C, n, m) = mlstm_chunkwise(
                heads(q, Dqk), heads(k, Dqk), heads(v, Dv), ig.transpose(1, 2), fg.transpose(1, 2),
                initial_state=init, return_state=True, chunk_size=cfg.chunk_size,
            )
            h = h.transpose(1, 2)  # (B, T, NH, Dv)
        h = head_layer_norm(h, self.head_norm, self.head_norm_bias, cfg.norm_eps)  # (B, T, v_dim)
        if last_only:
            o, h = o[:, -1:], h[:, -1:]
        return self.out_proj(torch.sigmoid(o) * h), {"C": C, "n": n, "m": m}

    def forward(self, x: Tensor, state: dict | None, mask: Tensor | None, last_only: bool = False) -> tuple[Tensor, dict]:
        """x (B, T, d) -> (B, T, d), new state; ``last_only``: (B, 1, d), the last position's output
        (the state still takes every position; the output projection and feed-forward run on one row)."""
        eps = self.cfg.norm_eps
        y, new_state = self.mlstm(rms_norm(x, self.norm_mlstm, self.norm_mlstm_bias, eps), state, mask, last_only)
        x = (x[:, -1:] if last_only else x) + y
        gate, up = self.ffn_up(rms_norm(x, self.norm_ffn, self.norm_ffn_bias, eps)).chunk(2, -1)  # (B, T, ffn)
        return x + self.ffn_down(F.silu(gate) * up), new_state

    def fused(self, x: Tensor, state: dict, T: int, mask: Tensor | None, packed: bool = False,
              last_only: bool = False) -> tuple[Tensor, dict]:
        """T tokens of B rows, no gradient, fp32 CPU, C kernels between the matmuls: x (B T, d) ->
        (B T, d), new state (the same function as ``forward``; tests/models/test_xlstm_large.py).
        x is updated in place (the residual stream of ``_fused``); ``packed``: plain ``nn.Linear``
        products against their MKL-packed copies (``ops/packed_gemm.py``); ``last_only``: (B, d),
        the last position's output (``forward``'s)."""
        cfg, eps = self.cfg, self.cfg.norm_eps
        xn, gates = self._norm_gates(x)  # (B T, d), (B T, 2 NH)
        proj = _linear(xn, self.qkvo, packed)  # (B T, 2 qk + 2 v)
        h, new_state = nat.mlstm_layer(
            proj, gates, state, self.head_norm, self.head_norm_bias, (self.NH, self.Dqk, self.Dv), cfg.gate_soft_cap, eps, T, mask
        )  # (B T, v)
        if last_only:  # (B, d), (B, v)
            B = x.shape[0] // T
            x, h = x.view(B, T, -1)[:, -1].contiguous(), h.view(B, T, -1)[:, -1].contiguous()
        x = _add_linear_(x, h, self.out_proj, packed)
        gu = _linear(nat.rms_norm(x, self.norm_ffn, self.norm_ffn_bias, eps), self.ffn_up, packed)  # (B T, 2 ffn)
        return _add_linear_(x, nat.swiglu(gu), self.ffn_down, packed), new_state

    def _norm_gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, d) -> the normed rows (N, d) and the gate pre-activations (N, 2 NH): a plain
        ``nn.Linear`` gate projection as C dot products in the norm's pass over the rows (MKL's GEMM
        is ~4x slower for 8 outputs), any other module (a LoRA-wrapped projection) as a module."""
        norm = (x, self.norm_mlstm, self.norm_mlstm_bias, self.cfg.norm_eps)
        if _plain_fp32(self.if_gate):
            return nat.rms_norm_gates(*norm, self.if_gate.weight, self.if_gate.bias)
        xn = nat.rms_norm(*norm)
        return xn, self.if_gate(xn)


def _linear(x: Tensor, lin: nn.Module, packed: bool) -> Tensor:
    """lin(x); a plain ``nn.Linear`` through its packed copy when ``packed``. Other modules (a
    LoRA-wrapped projection) always run as modules: adapters wrap them."""
    if packed and _packs(lin, x.shape[0]):
        return packed_gemm.linear(x, lin.weight, lin.bias)
    return lin(x)


def _packs(lin: nn.Module, rows: int) -> bool:
    """Whether ``lin`` multiplies ``rows`` rows through its packed copy when packed matrices are on."""
    return _plain_fp32(lin) and lin.out_features >= PACKED_MIN_OUT and rows >= PACKED_MIN_ROWS


def _plain_fp32(lin: nn.Module) -> bool:
    """A plain ``nn.Linear`` with fp32 weight and bias (what the C and packed products read)."""
    return type(lin) is nn.Linear and lin.weight.dtype == torch.float32 and (lin.bias is None or lin.bias.dtype == torch.float32)


def _add_linear_(x: Tensor, h: Tensor, lin: nn.Module, packed: bool = False) -> Tensor:
    """x += lin(h) in place (x is an activation the fused path made itself), the residual add fused
    into the matmul (an in-place addmm, or the packed product with beta 1) for a plain
    ``nn.Linear``; any other module (a LoRA-wrapped projection) through its own forward."""
    if not _plain_fp32(lin):
        return x.add_(lin(h))
    if packed and _packs(lin, h.shape[0]):
        return packed_gemm.linear(h, lin.weight, lin.bias, out=x)
    if lin.bias is not None:
        x.add_(lin.bias)
    return x.addmm_(h, lin.weight.t())


def _fp32_state(st: dict) -> dict:
    return {k: t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for k, t in st.items()}


# ----------------------------------------------------------------------------------------------
# The model


@register_model(
    "xlstm_large",
    XLSTMLargeConfig,
    tiny=dict(d_model=64, n_blocks=2, n_heads=4, chunk_size=16, vocab_size=256),
)
class XLSTMLarge(CausalLM):
    """The xLSTM-7B language model: embedding -> mLSTM blocks -> RMSNorm -> soft-capped LM head."""

    def __init__(self, config: XLSTMLargeConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(XLSTMLargeBlock(config) for _ in range(config.n_blocks))
        self.out_norm = nn.Parameter(torch.ones(config.d_model)) if config.add_out_norm else None
        self.out_norm_bias = nn.Parameter(torch.zeros(config.d_model)) if config.add_out_norm and config.use_bias else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.matmul_weights: str | None = None  # "packed": the fused path's products on MKL-packed copies
        self.init_weights()

    def init_weights(self) -> None:
        """transformers' ``xLSTMPreTrainedModel`` initialisation: small init N(0, sqrt(2 / (5 d))) for
        the embedding, input projections and head; wang init N(0, 2 / (L sqrt(fan_in))) for the
        output projections; forget gate bias linspace(3, 6), input gate bias -10, zero gate
        weights; norms at 1, biases 0."""
        cfg = self.config
        d, L = cfg.d_model, cfg.n_blocks
        small, wang = math.sqrt(2 / (5 * d)), 2 / (L * math.sqrt(d))
        nn.init.normal_(self.embed.weight, std=small)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=small)
        for b in self.blocks:
            nn.init.normal_(b.qkvo.weight, std=small)
            nn.init.normal_(b.ffn_up.weight, std=small)
            nn.init.normal_(b.out_proj.weight, std=wang)
            nn.init.normal_(b.ffn_down.weight, std=2 / (L * math.sqrt(cfg.ffn_dim)))
            nn.init.zeros_(b.if_gate.weight)
            with torch.no_grad():
                b.if_gate.bias[: b.NH] = -10.0
                b.if_gate.bias[b.NH :] = torch.linspace(3.0, 6.0, b.NH)
            for lin in (b.qkvo, b.out_proj, b.ffn_up, b.ffn_down):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    # -- state ----------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        """The empty state (fp32 whatever ``dtype``: recurrent states are kept in fp32)."""
        device = device if device is not None else self.embed.weight.device
        return {"blocks": [b.init_state(batch_size, device) for b in self.blocks]}

    def _check_state(self, state, B: int) -> None:
        if not isinstance(state, dict) or set(state) != {"blocks"} or not isinstance(state["blocks"], (list, tuple)):
            raise ShapeError("state: expected an xLSTM-large state {'blocks': [...]} (from init_state or a forward)")
        if len(state["blocks"]) != len(self.blocks):
            raise ShapeError(f"state['blocks']: expected {len(self.blocks)} blocks, got {len(state['blocks'])} (state from another config?)")
        b0 = self.blocks[0]
        want = {"C": (B, b0.NH, b0.Dqk, b0.Dv), "n": (B, b0.NH, b0.Dqk), "m": (B, b0.NH)}
        for i, got in enumerate(state["blocks"]):
            if not isinstance(got, dict) or set(got) != set(want):
                raise ShapeError(f"state['blocks'][{i}]: expected keys {sorted(want)}, got {sorted(got) if isinstance(got, dict) else type(got).__name__}")
            for key, w in want.items():
                g = got[key]
                if not isinstance(g, Tensor) or tuple(g.shape) != w:
                    shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                    raise ShapeError(
                        f"state['blocks'][{i}]['{key}']: expected shape {w}, got {shape} (state from another config or batch size?)"
                    )

    # -- forward --------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, state=None, attention_mask: Tensor | None = None):
        """tokens (B, T) -> soft-capped logits (B, T, V) and the state after the last token."""
        return self._recurrent_forward(tokens, state, attention_mask)

    def set_matmul_weights(self, fmt: str | None) -> None:
        """``"packed"``: the inference path (no gradient, fp32, CPU) multiplies ``B T >=
        PACKED_MIN_ROWS`` rows (prefill) by copies of every matrix packed once for MKL's GEMM
        (``ops/packed_gemm.py``): it skips the weight copy every ``F.linear`` makes (prefill of the
        small config ~10% faster, the same logits) for as much memory again as the matrices. None /
        ``"fp32"``: the parameters through ``F.linear``."""
        if fmt not in (None, "fp32", "packed"):
            raise ConfigError(f"matmul_weights: unknown format {fmt!r}; expected None, 'fp32' or 'packed'")
        if fmt == "packed" and not packed_gemm.available():
            raise ConfigError("matmul_weights='packed' needs MKL's packed GEMM (x86 torch with MKL); this torch has none")
        self.matmul_weights = "packed" if fmt == "packed" else None
        self.clear_decode_cache()

    def clear_decode_cache(self) -> None:
        """Drop the packed matrix copies (rebuilt on the next call). Needed only after an edit
        through ``param.data`` (every other change of a weight is seen)."""
        for p in self.parameters():
            packed_gemm.forget(p)

    def _fused_ok(self, T: int) -> bool:
        """No gradient, fp32 weights on the CPU, the C kernels built, op ``xlstm_fused`` on ``fast``."""
        w = self.embed.weight  # (the projections may be wrapped, e.g. by LoRA: they run as modules)
        return (
            T >= 1 and not torch.is_grad_enabled() and w.dtype == torch.float32 and w.device.type == "cpu"
            and self.blocks[0].head_norm.dtype == torch.float32  # the C kernels read the norm weights as fp32
            and backends.resolve("xlstm_fused") == "fast" and nat.decode_lib() is not None
        )

    def _fused(self, tokens: Tensor, state, mask: Tensor | None) -> tuple[Tensor, dict]:
        """tokens (B, T) -> logits (B, T, V) and the state: ``_run`` with C kernels between the
        matmuls on (B T, ...) rows (at small widths decoding and prefill are per-op overhead)."""
        B, T = tokens.shape
        state = state if state is not None else self.init_state(B, tokens.device)
        x = F.embedding(tokens.reshape(B * T), self.embed.weight)  # (B T, d)
        packed = self.matmul_weights == "packed"  # (for products of at least PACKED_MIN_ROWS rows: _packs)
        states, last = [], len(self.blocks) - 1 if self._prefilling() else -1  # prefill: the last block's output at one position
        for i, (block, st) in enumerate(zip(self.blocks, state["blocks"])):
            x, st = block.fused(x, _fp32_state(st), T, mask, packed, last_only=i == last)
            states.append(st)
        if self.out_norm is not None:  # x (B T, d); (B, d) in prefill
            x = nat.rms_norm(x, self.out_norm, self.out_norm_bias, self.config.norm_eps)
        logits = self._capped_head(x, packed)  # (B T, V); (B, V) in prefill
        return logits.view(B, -1, logits.shape[-1]), {"blocks": states}

    def _capped_head(self, x: Tensor, packed: bool) -> Tensor:
        """x (N, d) -> soft-capped logits (N, V). Packed (the head's rows cost no repacking): in
        blocks of ``HEAD_ROWS`` rows, each capped while its logits are still in cache."""
        cap, head = self.config.logit_soft_cap, self.lm_head
        if not (packed and _packs(head, x.shape[0]) and cap is not None):
            logits = _linear(x, head, packed)  # (N, V)
            return logits if cap is None else nat.soft_cap_(logits, cap)
        logits = torch.empty(x.shape[0], head.out_features)
        for r in range(0, x.shape[0], HEAD_ROWS):
            block = logits[r : r + HEAD_ROWS]
            nat.soft_cap_(packed_gemm.linear(x[r : r + HEAD_ROWS], head.weight, head.bias, out=block, accumulate=False), cap)
        return logits

    def _run(self, tokens: Tensor, state, mask: Tensor | None):
        if self._fused_ok(tokens.shape[1]):
            return self._fused(tokens, state, mask)
        x = self.embed(tokens)  # (B, T, d)
        states, last = [], len(self.blocks) - 1 if self._prefilling() else -1  # prefill: the last block's output at one position
        for i, block in enumerate(self.blocks):
            x, st = block(x, None if state is None else state["blocks"][i], mask, last_only=i == last)
            states.append(st)
        if self.out_norm is not None:  # x (B, T, d); (B, 1, d) in prefill
            x = rms_norm(x, self.out_norm, self.out_norm_bias, self.config.norm_eps)
        logits, cap = self.lm_head(x), self.config.logit_soft_cap  # (B, T, V)
        if cap is not None and not torch.is_grad_enabled():  # in place: no (B, T, V) temporaries
            return logits.div_(cap).tanh_().mul_(cap), {"blocks": states}
        return soft_cap(logits, cap), {"blocks": states}

    # -- sizes ----------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """6 N (matmul parameters incl. the LM head) + the chunkwise mLSTM's sequence terms:
        per token and block (forward) ``2 L NH (Dqk + Dv)`` within the chunk (``L = min(seq_len,
        chunk_size)``) and ``4 NH Dqk Dv`` for the state read/write; training counts 3x."""
        L = min(seq_len, self.config.chunk_size)
        extra = sum(2 * L * b.NH * (b.Dqk + b.Dv) + 4 * b.NH * b.Dqk * b.Dv for b in self.blocks)
        return super().flops_per_token(seq_len) + 3.0 * extra
