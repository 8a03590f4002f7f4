"""Llama: config variants, bad configs, the copy-on-write KV cache (the contract runs in test_contract.py)."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import ConfigError
from rizzearch.models import build_model
from rizzearch.models.base import tiny_overrides
from rizzearch.testing import assert_close

from llama_fixtures import V, make



@pytest.mark.parametrize(
    "kw",
    [dict(n_kv_head=4), dict(n_kv_head=1), dict(qkv_bias=True), dict(tie_embeddings=False), dict(head_dim=8),
     dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8), dict(rope_scaling="linear", rope_factor=2.0)],
)
def test_variants_decode_like_forward(kw):
    m = make(**kw)
    x = torch.randint(0, V, (2, 21))
    with torch.no_grad():
        full, _ = m(x)
        logits, state = m(x[:, :9])
        parts = [logits]
        for t in range(9, 21):
            step, state = m.step(x[:, t], state)
            parts.append(step[:, None])
    assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4, name=f"prefill+step {kw}")


def test_variants_change_the_parameters():
    base = make()
    n = base.num_params()
    assert make(qkv_bias=True).num_params() == n + 2 * (4 + 2 * 2) * 16  # 2 layers x (q + k + v heads) x head_dim
    assert make(tie_embeddings=False).num_params() == n + V * 64
    assert make(n_kv_head=4).num_params() > n > make(n_kv_head=1).num_params()
    assert base.lm_head.weight is base.embed.weight


def test_rope_scaling_changes_long_positions_only():
    a = make()
    b = make(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8)
    x = torch.randint(0, V, (1, 40))
    with torch.no_grad():
        la, lb = a(x)[0], b(x)[0]
    assert torch.equal(la[:, 0], lb[:, 0])  # position 0 rotates by nothing
    assert not torch.allclose(la, lb, atol=1e-3)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
        (dict(d_model=60, n_head=8, n_kv_head=8), "divisible by n_head"),
        (dict(head_dim=7), "must be even"),
        (dict(rope_scaling="yarn"), "rope_scaling must be one of"),
        (dict(n_layer=0), "n_layer must be >= 1"),
    ],
)
def test_bad_config_is_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_model("llama", **{**tiny_overrides("llama"), **kw})


@torch.no_grad()
def test_reusing_a_state_copies_instead_of_overwriting():
    """Two continuations of one prefix state: the first one's cache survives the second (copy on write)."""
    m = make()
    x = torch.randint(0, V, (2, 8))
    _, prefix = m(x)
    a, b = torch.randint(0, V, (2,)), torch.randint(0, V, (2,))
    _, sa = m.step(a, prefix)
    _, sb = m.step(b, prefix)  # writes position 8 again: must not clobber sa
    nxt = torch.randint(0, V, (2,))
    got, _ = m.step(nxt, sa)
    want = m(torch.cat([x, a[:, None], nxt[:, None]], 1))[0][:, -1]
    assert_close(got, want, atol=1e-4, rtol=1e-4, name="step after the prefix was reused")
    got_b, _ = m.step(nxt, sb)
    want_b = m(torch.cat([x, b[:, None], nxt[:, None]], 1))[0][:, -1]
    assert_close(got_b, want_b, atol=1e-4, rtol=1e-4, name="second continuation")


@torch.no_grad()
def test_cache_grows_by_doubling():
    m = make()
    _, s = m(torch.randint(0, V, (1, 5)))
    caps = []
    for _ in range(20):
        _, s = m.step(torch.randint(0, V, (1,)), s)
        caps.append(s["valid"].shape[1])
    assert s["n"] == 25 and caps[-1] >= 25
    assert len(set(caps)) <= 3  # 10, 20, 40: a copy only when full


def test_gradients_flow_through_a_cached_prefix():
    m = make().train()
    x = torch.randint(0, V, (2, 10))
    _, state = m(x[:, :6])
    logits, _ = m(x[:, 6:], state)
    logits.sum().backward()
    assert m.embed.weight.grad is not None and torch.isfinite(m.embed.weight.grad).all()


@torch.no_grad()
def test_bf16_weights_close_to_fp32():
    m = make()
    x = torch.randint(0, V, (2, 16))
    ref, _ = m(x)
    got, _ = m.to(torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 5e-2


def test_right_padding_runs_causal_and_equals_each_row_alone():
    """A right-padded batch from a fresh start runs plain causal attention (no mask): every real
    position's logits and the gradients of a loss over real positions equal each row run alone."""
    m = make()
    x = torch.randint(0, V, (3, 9))
    lengths = [9, 5, 2]
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    logits, state = m(x, attention_mask=mask)
    loss = sum(logits[i, : lengths[i]].logsumexp(-1).sum() for i in range(3))
    grads = torch.autograd.grad(loss, list(m.parameters()))
    alone = [m(x[i : i + 1, : lengths[i]])[0][0] for i in range(3)]
    for i in range(3):
        assert_close(logits[i, : lengths[i]], alone[i], atol=1e-5, rtol=1e-5, name=f"row {i}")
    want = torch.autograd.grad(sum(a.logsumexp(-1).sum() for a in alone), list(m.parameters()))
    for g, w in zip(grads, want):
        assert_close(g, w, atol=1e-5, rtol=1e-4, name="gradients")
    assert torch.equal(state["valid"], mask)  # the padding stays out of later steps' attention
