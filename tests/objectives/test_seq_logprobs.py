"""Masked sequence log-probs: chunked form == full log-softmax reference (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from rizzearch.errors import ShapeError
from rizzearch.objectives.lm import (
    IGNORE_INDEX,
    sequence_logprobs,
    token_logprobs,
    token_logprobs_reference,
)
from rizzearch.testing import assert_close


def _case(B, T, V, dtype=torch.float32, p_ignore=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < p_ignore] = IGNORE_INDEX
    targets[:, 0] = 1  # every row keeps at least one counted target
    return logits, targets


def test_hand_computed_values():
    # two positions, vocab 3: log softmax([0, 0, 0])[2] = -log 3; log softmax([log 2, 0, 0])[0] = log(2/4)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [5.0, 1.0, 2.0]]])
    targets = torch.tensor([[2, 0, IGNORE_INDEX]])
    lp = token_logprobs(logits, targets, chunk_size=1)
    assert_close(lp, torch.tensor([[-math.log(3.0), math.log(0.5), 0.0]]), name="token log-probs")
    seq = sequence_logprobs(logits, targets, chunk_size=2)
    assert_close(seq.sum, torch.tensor([-math.log(3.0) + math.log(0.5)]), name="sum")
    assert_close(seq.mean, torch.tensor([(-math.log(3.0) + math.log(0.5)) / 2]), name="mean")
    assert seq.count.tolist() == [2]


@pytest.mark.parametrize("B,T,V,chunk", [(1, 1, 5, 1), (2, 37, 50, 7), (3, 13, 257, 64), (4, 9, 31, None), (2, 5, 11, 1000)])
def test_chunked_matches_reference_values_and_grads(B, T, V, chunk):
    logits, targets = _case(B, T, V)
    w = torch.randn(B, T)
    ours = token_logprobs(logits, targets, chunk_size=chunk)
    ref = token_logprobs_reference(logits, targets)
    assert_close(ours, ref, name="token log-probs")
    (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    assert_close(g_ours, g_ref, name="d logits")
    # ignored positions get exactly zero gradient
    ignored = targets == IGNORE_INDEX
    assert torch.all(g_ours[ignored] == 0)


def test_inplace_backward_gives_the_same_gradient():
    base, targets = _case(3, 11, 29)
    w = torch.randn(3, 11)
    ref = token_logprobs_reference(base, targets)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), base)
    x = base.detach().clone().requires_grad_(True)
    logits = x * 1.0  # a non-leaf buffer, as a model's output is
    out = token_logprobs(logits, targets, chunk_size=4, inplace_backward=True)
    assert_close(out, ref, name="values")
    (out * w).sum().backward()
    assert_close(x.grad, g_ref, name="in-place gradient")
    assert not torch.equal(logits.detach(), base.detach())  # the logits buffer now holds the gradient


def test_gradcheck_float64():
    logits, targets = _case(2, 5, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, targets, chunk_size=3), (logits,))


def test_bfloat16_logits_accumulate_in_fp32():
    logits, targets = _case(2, 11, 40, dtype=torch.bfloat16)
    ours = token_logprobs(logits, targets, chunk_size=4)
    assert ours.dtype == torch.float32
    assert_close(ours, token_logprobs_reference(logits, targets), atol=1e-5, rtol=1e-5, name="bf16 log-probs")
    (g,) = torch.autograd.grad(ours.sum(), logits)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_sequence_sum_mean_count_match_masked_reference():
    logits, targets = _case(3, 17, 23, p_ignore=0.5)
    seq = sequence_logprobs(logits, targets, chunk_size=5)
    ref = token_logprobs_reference(logits, targets)
    mask = targets != IGNORE_INDEX
    assert_close(seq.sum, ref.sum(-1), name="sum")
    assert_close(seq.count, mask.sum(-1), name="count")
    assert_close(seq.mean, ref.sum(-1) / mask.sum(-1), name="mean")
    seq_full = sequence_logprobs(logits, targets, chunked=False)
    assert_close(seq.mean, seq_full.mean, name="chunked vs unchunked mean")


def test_all_masked_row_is_an_error():
    logits, targets = _case(2, 6, 9)
    targets[1] = IGNORE_INDEX
    with pytest.raises(ShapeError, match="row 1 has no counted target"):
        sequence_logprobs(logits, targets)


def test_bad_shapes_and_targets():
    logits, targets = _case(2, 6, 9)
    with pytest.raises(ShapeError, match="logits"):
        token_logprobs(logits[0], targets)
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        token_logprobs(logits, torch.full_like(targets, 9))
    with pytest.raises(ShapeError, match="chunk_size"):
        token_logprobs(logits, targets, chunk_size=0)


def test_inplace_is_chosen_automatically_only_when_safe():
    """A linear head's logits take the in-place backward; logits that are a tanh's own output (tanh
    saves its output for backward) do not; both give the same gradients as out of place."""
    from rizzearch.objectives.lm import inplace_backward_is_safe, token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    x = torch.randn(2, 5, 8)
    targets = torch.randint(0, 11, (2, 5))
    for cap in (False, True):
        grads = []
        for mode in (False, None):
            head.zero_grad()
            logits = head(x)
            if cap:
                logits = torch.tanh(logits)
            if mode is None:
                assert inplace_backward_is_safe(logits) is (not cap)
            token_logprobs(logits, targets, inplace_backward=mode).sum().backward()
            grads.append(head.weight.grad.clone())
        assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert not inplace_backward_is_safe(torch.randn(3, 4, 5))  # no graph: nothing to do in place
