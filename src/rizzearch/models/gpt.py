"""GPT: the transformer baseline every study compares against.

Pre-norm decoder-only transformer (Radford et al. 2019) with rotary position embeddings
(Su et al. 2021, RoFormer, eq. 34: consecutive pairs rotated as complex numbers), RMSNorm, a GELU MLP, and causal attention through
``torch.nn.functional.scaled_dot_product_attention`` (``rizzearch.ops.attention``).

Deviations from GPT-2: RoPE instead of learned positions (so any T works with no maximum
length), RMSNorm instead of LayerNorm, no biases. The KV cache is the model's ``state``:

    state = {"k": [L x (B, H, S, Dh)], "v": [L x (B, H, S, Dh)],
             "valid": (B, S) bool   which cached positions hold real tokens,
             "pos":   (B,)  long    how many real tokens each row has seen}

Padded positions (``attention_mask == 0``) are cached but never attended to and do not advance
``pos``, so a left-padded row decodes exactly like the same row without padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rizzearch.errors import ShapeError
from rizzearch.models.base import CausalLM, register_model
from rizzearch.ops.attention import causal_attention


@dataclass(frozen=True)
class GPTConfig:
    """Transformer baseline configuration.

    Args:
        vocab_size: number of token ids.
        n_layer: number of transformer blocks.
        n_head: attention heads per block (d_model must be divisible by n_head).
        d_model: residual stream width.
        mlp_ratio: hidden width of the MLP as a multiple of d_model.
        rope_base: RoPE frequency base.
        dropout: dropout on attention output and MLP output (0 disables).
        tie_embeddings: share the input embedding and the LM head weights.
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: float = 4.0
    rope_base: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dim d_model/n_head = {self.d_model // self.n_head} must be even for RoPE")


def rope_angles(positions: Tensor, head_dim: int, base: float) -> Tensor:
    """Unit complex rotations e^{i p theta_j} for integer ``positions[B, T]`` -> (B, 1, T, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    return torch.polar(torch.ones_like(angles), angles)[:, None]


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2j], x[2j+1]) of x (B, H, T, Dh) by the complex ``rot``."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, Dh/2) complex
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, rot, cache_k, cache_v, key_valid, query_start):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k = apply_rope(qkv[:2], rot).unbind(0)  # q and k rotated in one op
        v = qkv[2]
        if cache_k is not None and cache_k.shape[2] > 0:
            k = torch.cat([cache_k, k], dim=2)  # (B, H, S+T, Dh)
            v = torch.cat([cache_v, v], dim=2)
        y = causal_attention(q, k, v, key_valid=key_valid, query_start=query_start)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), k, v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rot, cache_k, cache_v, key_valid, query_start):
        a, k, v = self.attn(self.norm1(x), rot, cache_k, cache_v, key_valid, query_start)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, k, v


@register_model("gpt", GPTConfig, tiny=dict(n_layer=2, d_model=64, n_head=4))
class GPT(CausalLM):
    """Pre-norm RoPE transformer; its state is the KV cache (see module docstring)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 L)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1.0 / math.sqrt(2 * self.config.n_layer) if name.endswith("proj.weight") else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            else:
                nn.init.ones_(p)  # norm weights

    def init_state(self, batch_size: int, device=None, dtype=None):
        cfg = self.config
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        hd = cfg.d_model // cfg.n_head
        empty = lambda: torch.zeros(batch_size, cfg.n_head, 0, hd, device=device, dtype=dtype)  # noqa: E731
        return {
            "k": [empty() for _ in range(cfg.n_layer)],
            "v": [empty() for _ in range(cfg.n_layer)],
            "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def _check_state(self, state, B: int) -> None:
        cfg = self.config
        if not isinstance(state, dict) or set(state) != {"k", "v", "valid", "pos"}:
            raise ShapeError("state: expected a GPT KV-cache dict with keys k, v, valid, pos (from GPT.init_state)")
        if len(state["k"]) != cfg.n_layer:
            raise ShapeError(f"state['k']: expected {cfg.n_layer} layers, got {len(state['k'])} (state from another config?)")
        k0 = state["k"][0]
        want = (B, cfg.n_head, k0.shape[2], cfg.d_model // cfg.n_head)
        if tuple(k0.shape) != want:
            raise ShapeError(f"state['k'][0]: expected shape {want}, got {tuple(k0.shape)} (state from another config or batch?)")

    def forward(self, tokens: Tensor, state=None, attention_mask: Tensor | None = None):
        """tokens (B, T) -> logits (B, T, V) and the updated KV cache."""
        self._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        cfg = self.config
        if state is not None:
            self._check_state(state, B)
        mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos0 = state["pos"] if state is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)
        positions = (pos0[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)  # (B, T)
        prev_valid = state["valid"] if state is not None else mask.new_zeros(B, 0)
        S = prev_valid.shape[1]
        key_valid = torch.cat([prev_valid, mask], dim=1)  # (B, S+T)
        simple = attention_mask is None and (state is None or bool(prev_valid.all()))
        rot = rope_angles(positions, cfg.d_model // cfg.n_head, cfg.rope_base)  # (B, 1, T, Dh/2)
        x = self.embed(tokens)  # (B, T, C)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            ck = state["k"][i] if state is not None else None
            cv = state["v"][i] if state is not None else None
            x, k, v = block(x, rot, ck, cv, None if simple else key_valid, S)
            new_k.append(k)
            new_v.append(v)
        logits = self.lm_head(self.norm(self._head_rows(x)))  # (B, T, V); (B, 1, V) in prefill
        new_state = {"k": new_k, "v": new_v, "valid": key_valid, "pos": pos0 + mask.long().sum(1)}
        return logits, new_state

    def flops_per_token(self, seq_len: int) -> float:
        """6 N (matmul parameters incl. the LM head) + 6 L T d for causal attention scores and values."""
        cfg = self.config
        return super().flops_per_token(seq_len) + 6.0 * cfg.n_layer * seq_len * cfg.d_model
