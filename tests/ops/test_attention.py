"""Causal attention: the SDPA form equals the fp32 reference for training, prefill after a cache,
one-token decoding and padded keys, values and gradients."""

from __future__ import annotations

import pytest
import torch

from rizzearch.ops.attention import causal_attention, causal_attention_ref
from rizzearch.testing import assert_close

CASES = [  # (B, H, T, S_k, D, query_start, padded keys)
    (2, 3, 7, 7, 5, 0, False),  # training: is_causal
    (2, 2, 1, 9, 4, 8, False),  # one-token decoding: every key visible
    (1, 2, 4, 10, 3, 6, False),  # prefill after a cache of 6
    (3, 1, 5, 5, 8, 0, True),  # padded keys (left padding), batch > 1
    (2, 2, 3, 8, 4, 5, True),  # padded keys with a cache
]


@pytest.mark.parametrize("B,H,T,S_k,D,query_start,padded", CASES)
def test_sdpa_equals_reference_values_and_gradients(B, H, T, S_k, D, query_start, padded):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float32, requires_grad=True)
    k, v = (torch.randn(B, H, S_k, D, generator=g, dtype=torch.float32, requires_grad=True) for _ in range(2))
    key_valid = None
    if padded:  # row b has its first b keys padded (a query always sees itself)
        key_valid = torch.arange(S_k)[None, :] >= torch.arange(B)[:, None]  # (B, S_k)
    gy = torch.randn(B, H, T, D, generator=g, dtype=torch.float32)
    outs = []
    for fn in (causal_attention_ref, causal_attention):
        y = fn(q, k, v, key_valid=key_valid, query_start=query_start)
        outs.append((y, torch.autograd.grad(y, (q, k, v), gy)))
    (y_ref, g_ref), (y, gr) = outs
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, name="attention out")
    for name, a, b in zip("qkv", gr, g_ref):
        assert_close(a, b, name=f"attention d{name}")
