"""Causal attention for the transformer baseline.

``causal_attention`` is the fast form (``F.scaled_dot_product_attention``, which picks flash /
memory-efficient kernels when available); ``causal_attention_ref`` is the reference form (explicit
softmax in fp32). Queries sit at absolute positions ``query_start .. query_start + T - 1`` among the
``S_k`` keys, so the same call serves training (``query_start = 0``), prefill after a cache, and
one-token decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_mask(T: int, S_k: int, query_start: int, key_valid: Tensor | None, device) -> Tensor:
    """Boolean mask (B or 1, 1, T, S_k), True = may attend."""
    q_pos = torch.arange(T, device=device)[:, None] + query_start  # (T, 1)
    k_pos = torch.arange(S_k, device=device)[None, :]  # (1, S_k)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S_k)
    if key_valid is not None:
        own = (k_pos == q_pos)[None, None]  # a query always sees itself (padded rows stay finite)
        allowed = allowed & key_valid[:, None, None, :] | own
    return allowed


def causal_attention_ref(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None, query_start: int = 0) -> Tensor:
    """Reference: softmax(q k^T / sqrt(d) + mask) v in fp32. q: (B, H, T, D); k, v: (B, H, S_k, D)."""
    T, S_k = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, S_k)
    allowed = attention_mask(T, S_k, query_start, key_valid, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None, query_start: int = 0) -> Tensor:
    """Fast form via SDPA. Same arguments and result as ``causal_attention_ref``."""
    T, S_k = q.shape[2], k.shape[2]
    if key_valid is None:
        if query_start == 0 and S_k == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if T == 1 and query_start == S_k - 1:
            return F.scaled_dot_product_attention(q, k, v)
    allowed = attention_mask(T, S_k, query_start, key_valid, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
