"""RWKV-4: a linear-time RNN language model that trains in parallel (Peng et al. 2023).

Architecture (the paper's Sec. 3; names follow the official RWKV-LM v4 code and HF transformers):

    x = ln0(emb(tokens))
    per block:  x = x + TimeMix(ln1(x));  x = x + ChannelMix(ln2(x))
    logits = head(ln_out(x))

- Token shift (eqs. 11-13, 16-17): every mixing layer sees ``lerp(x_{t-1}, x_t, mu)`` with a
  learned per-channel ``mu`` (``time_mix_*``); ``x_{t-1}`` of the first token comes from the state.
- Time mixing (eqs. 11-15): ``r, k, v`` projections of the shifted inputs, ``wkv`` (eq. 14, see
  ``rizzearch.ops.wkv``), output ``W_o (sigmoid(r) * wkv)``.
- Channel mixing (eqs. 16-18): ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2``.

State (everything needed to continue; batch on dim 0, one entry per layer)::

    {"att_x": [L x (B, C)]  last input of each time-mix (token shift),
     "num", "den", "max": [L x (B, A)]  WKV numerator / denominator / max exponent (float32),
     "ffn_x": [L x (B, C)]  last input of each channel-mix}

Padding (``attention_mask == 0``) leaves the state unchanged: padded steps neither decay nor add
to the WKV state, and the token shift skips them, so left-padded rows decode like unpadded rows.

Initialisation follows RWKV-LM v4neo (``RWKV_TimeMix``/``RWKV_ChannelMix`` and
``generate_init_weight``): time_decay ``-5 + 8 (h/(A-1))^(0.7 + 1.3 l/(L-1))``, time_first
``log(0.3) + zigzag``, layer-dependent time_mix curves, zero ``att.key/receptance/output`` and
``ffn.value/receptance``, orthogonal others (gain sqrt(out/in) when out > in, head x0.5), and a
small uniform embedding. (HF's ``_init_weights`` sets time_first to all ones: a bug we do not copy.)

Decoding (one token, no grad) runs the recurrent form, in ``rizzearch.models.rwkv_decode``: on CPU
in float32 one fused C call for the whole model, multi-threaded, on the parameters themselves;
otherwise an eager step with the model's own modules. Neither keeps a copy of any weight, so weight
edits are seen by the next token (see ``clear_decode_cache`` for the one exception).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rizzearch.errors import ShapeError
from rizzearch.models import rwkv_decode
from rizzearch.models.base import CausalLM, register_model
from rizzearch.models.rwkv_decode import STATE_KEYS
from rizzearch.ops.wkv import EMPTY_MAX, wkv


@dataclass(frozen=True)
class RWKVConfig:
    """RWKV-4 language model configuration.

    Args:
        vocab_size: number of token ids.
        n_layer: number of blocks (time mix + channel mix).
        d_model: residual stream width (HF ``hidden_size``, official ``n_embd``).
        d_att: width of r/k/v and the WKV state (HF ``attention_hidden_size``); None = d_model.
        d_ffn: hidden width of the channel mix (HF ``intermediate_size``); None = 4 * d_model.
        norm_eps: LayerNorm epsilon (ln0, ln1, ln2, ln_out).
        tie_embeddings: share the embedding and the head weights (RWKV-4 does not).
        emb_init: embeddings start uniform in [-emb_init, emb_init] (RWKV's small-embedding init).
    """

    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 128
    d_att: int | None = None
    d_ffn: int | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    emb_init: float = 1e-4

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("d_att", "d_ffn"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")

    @property
    def att_dim(self) -> int:
        return self.d_att or self.d_model

    @property
    def ffn_dim(self) -> int:
        return self.d_ffn or 4 * self.d_model


# ----------------------------------------------------------------------------------------------
# Helpers


def token_shift(x: Tensor, prev: Tensor, mask: Tensor | None) -> Tensor:
    """x_{t-1} for every t. x: (B, T, C), prev: (B, C) the input before x[:, 0].

    With ``mask`` (B, T) bool, x_{t-1} is the last *unmasked* input before t (or ``prev``).
    """
    if mask is None:
        return torch.cat([prev[:, None], x[:, :-1]], 1)
    B, T, C = x.shape
    pos = torch.arange(T, device=x.device).expand(B, T)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).cummax(1).values  # (B, T) last live index <= t
    src = torch.cat([last.new_full((B, 1), -1), last[:, :-1]], 1)  # (B, T) last live index < t
    gathered = x.gather(1, src.clamp_min(0)[..., None].expand(B, T, C))  # (B, T, C)
    return torch.where((src >= 0)[..., None], gathered, prev[:, None])


def last_live(x: Tensor, prev: Tensor, mask: Tensor | None) -> Tensor:
    """The input at the last unmasked position of each row (or ``prev``). x: (B, T, C) -> (B, C)."""
    if mask is None:
        return x[:, -1]
    any_live = mask.any(1)  # (B,)
    T = x.shape[1]
    idx = torch.where(mask, torch.arange(T, device=x.device), -1).amax(1).clamp_min(0)  # (B,)
    picked = x[torch.arange(x.shape[0], device=x.device), idx]  # (B, C)
    return torch.where(any_live[:, None], picked, prev)


def _orthogonal_(weight: Tensor, gain: float) -> None:
    """nn.init.orthogonal_ computed in float32 on CPU (works for any dtype/device)."""
    w = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.orthogonal_(w, gain=gain)
    with torch.no_grad():
        weight.copy_(w)


# ----------------------------------------------------------------------------------------------
# Blocks


class TimeMix(nn.Module):
    """Token shift + r, k, v + WKV + sigmoid(r) gate + output projection (eqs. 11-15)."""

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, A = cfg.d_model, cfg.att_dim
        self.layer_id = layer_id
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_v = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def forward(self, x: Tensor, prev_x: Tensor, wkv_state, mask: Tensor | None):
        xx = token_shift(x, prev_x, mask)  # (B, T, C)
        k = self.key(torch.lerp(xx, x, self.time_mix_k))  # (B, T, A)
        v = self.value(torch.lerp(xx, x, self.time_mix_v))
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r))
        y, wkv_state = wkv(self.time_decay, self.time_first, k, v, wkv_state, mask)
        out = self.output(torch.sigmoid(r) * y)
        return out, last_live(x, prev_x, mask), wkv_state


class ChannelMix(nn.Module):
    """Token shift + squared-ReLU MLP gated by sigmoid(r) (eqs. 16-18)."""

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, Fd = cfg.d_model, cfg.ffn_dim
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x: Tensor, prev_x: Tensor, mask: Tensor | None):
        xx = token_shift(x, prev_x, mask)  # (B, T, C)
        k = torch.square(torch.relu(self.key(torch.lerp(xx, x, self.time_mix_k))))  # (B, T, F)
        r = torch.sigmoid(self.receptance(torch.lerp(xx, x, self.time_mix_r)))
        return r * self.value(k), last_live(x, prev_x, mask)


class Block(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x: Tensor, st: dict, mask: Tensor | None):
        a, att_x, wkv_state = self.att(self.ln1(x), st["att_x"], (st["num"], st["den"], st["max"]), mask)
        x = x + a
        f, ffn_x = self.ffn(self.ln2(x), st["ffn_x"], mask)
        x = x + f
        num, den, mx = wkv_state
        return x, {"att_x": att_x, "num": num, "den": den, "max": mx, "ffn_x": ffn_x}


# ----------------------------------------------------------------------------------------------
# The model


@register_model("rwkv", RWKVConfig, tiny=dict(n_layer=2, d_model=64))
class RWKV(CausalLM):
    """RWKV-4 language model (see the module docstring for the state and the init)."""

    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.config = config
        C = config.d_model
        self.emb = nn.Embedding(config.vocab_size, C)
        self.ln0 = nn.LayerNorm(C, eps=config.norm_eps)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(C, eps=config.norm_eps)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.emb.weight
        self.register_load_state_dict_post_hook(_forget_decode_cache)
        self.init_weights()

    # -- init ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-LM v4neo init (see module docstring)."""
        cfg = self.config
        L, C, A = cfg.n_layer, cfg.d_model, cfg.att_dim
        ramp = torch.arange(C, dtype=torch.float32) / C  # i / C
        h = torch.arange(A, dtype=torch.float32)
        zigzag = ((h + 1) % 3 - 1) * 0.5  # 0, 0.5, -0.5, ...
        for i, block in enumerate(self.blocks):
            r01 = i / (L - 1) if L > 1 else 0.0  # 0 -> 1 over depth
            r10 = 1.0 - i / L  # 1 -> ~0
            att, ffn = block.att, block.ffn
            att.time_decay.copy_(-5 + 8 * (h / max(A - 1, 1)) ** (0.7 + 1.3 * r01))
            att.time_first.copy_(math.log(0.3) + zigzag)
            att.time_mix_k.copy_(ramp**r10)
            att.time_mix_v.copy_(ramp**r10 + 0.3 * r01)
            att.time_mix_r.copy_(ramp ** (0.5 * r10))
            ffn.time_mix_k.copy_(ramp**r10)
            ffn.time_mix_r.copy_(ramp**r10)
            for lin in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
                lin.weight.zero_()
            _orthogonal_(att.value.weight, 1.0)
            _orthogonal_(ffn.key.weight, math.sqrt(cfg.ffn_dim / C) if cfg.ffn_dim > C else 1.0)
            for ln in (block.ln1, block.ln2):
                ln.reset_parameters()
        for ln in (self.ln0, self.ln_out):
            ln.reset_parameters()
        nn.init.uniform_(self.emb.weight, -cfg.emb_init, cfg.emb_init)
        if not cfg.tie_embeddings:
            V = cfg.vocab_size
            _orthogonal_(self.head.weight, 0.5 * (math.sqrt(V / C) if V > C else 1.0))

    # -- state --------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        cfg = self.config
        device = device if device is not None else self.emb.weight.device
        dtype = dtype if dtype is not None else self.emb.weight.dtype
        L, C, A = cfg.n_layer, cfg.d_model, cfg.att_dim

        def zeros(n, dt):
            return torch.zeros(batch_size, n, device=device, dtype=dt)

        return {
            "att_x": [zeros(C, dtype) for _ in range(L)],
            "num": [zeros(A, torch.float32) for _ in range(L)],
            "den": [zeros(A, torch.float32) for _ in range(L)],
            "max": [torch.full((batch_size, A), EMPTY_MAX, device=device, dtype=torch.float32) for _ in range(L)],
            "ffn_x": [zeros(C, dtype) for _ in range(L)],
        }

    def _check_state(self, state, B: int) -> None:
        cfg = self.config
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ShapeError(f"state: expected an RWKV state dict with keys {list(STATE_KEYS)} (from RWKV.init_state), found {found}")
        for key in STATE_KEYS:
            if len(state[key]) != cfg.n_layer:
                raise ShapeError(f"state[{key!r}]: expected {cfg.n_layer} layers, found {len(state[key])} (state from another config?)")
            width = cfg.d_model if key.endswith("_x") else cfg.att_dim
            s = state[key][0]  # every layer has the same widths; one check per key keeps decoding cheap
            if tuple(s.shape) != (B, width):
                raise ShapeError(
                    f"state[{key!r}][0]: expected shape {(B, width)}, found {tuple(s.shape)} (state from another config or batch size?)"
                )

    # -- forward ------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, state=None, attention_mask: Tensor | None = None):
        """tokens (B, T) -> logits (B, T, V) and the state after the last (unpadded) token."""
        self._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B, tokens.device)
        else:
            self._check_state(state, B)
        mask = self._padding_mask(attention_mask)
        if T == 1 and not torch.is_grad_enabled() and self._plain_projections():
            return self._decode(tokens[:, 0], state, mask)
        x = self.ln0(self.emb(tokens))  # (B, T, C)
        new = {k: [] for k in STATE_KEYS}
        for i, block in enumerate(self.blocks):
            x, st = block(x, {k: state[k][i] for k in STATE_KEYS}, mask)
            for k in STATE_KEYS:
                new[k].append(st[k])
        logits = self.head(self.ln_out(self._head_rows(x)))  # (B, T, V); (B, 1, V) in prefill
        return logits, new

    # -- decoding -----------------------------------------------------------------------------

    def _plain_projections(self) -> bool:
        """Whether every projection is a plain ``nn.Linear``: the decode engines read their weights
        directly, so layers wrapped by adapters (``training.lora``) decode through the block path."""
        return all(
            type(m) is nn.Linear
            for b in self.blocks
            for m in (b.att.key, b.att.value, b.att.receptance, b.att.output, b.ffn.key, b.ffn.receptance, b.ffn.value)
        )

    def clear_decode_cache(self) -> None:
        """Drop the fused decoding kernel's table of parameter addresses; the next token rebuilds it.

        Not needed after optimizer steps, ``load_state_dict``, ``.to()``, re-assigned parameters or
        in-place edits (under ``torch.no_grad()`` or through ``param.data``): decoding reads the
        parameters in place and keeps no copies. Call it after changing a parameter's layout in place
        without moving it (``param.data = param.data.t()``: same address, other strides).
        """
        rwkv_decode.forget(self)

    def _decode(self, token: Tensor, state: dict, mask: Tensor | None):
        """One token per row without autograd (``rizzearch.models.rwkv_decode``)."""
        logits, new = rwkv_decode.decode(self, token, state, mask)
        return logits[:, None], new

    # -- sizes --------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """6 N over matmul weights (+ the head) + ~20 element ops per WKV channel per layer (no T term)."""
        cfg = self.config
        return super().flops_per_token(seq_len) + 3 * 20.0 * cfg.n_layer * cfg.att_dim


def _forget_decode_cache(module: RWKV, incompatible_keys) -> None:
    """``load_state_dict`` post hook: the next decoded token rebuilds the kernel's address table."""
    module.clear_decode_cache()
