"""Token log-probs from the final hidden states (training.losses.model_token_logprobs): the same values
and gradients as the plain logits path for every registered model, with a trained or a frozen head, a
LoRA-wrapped head, chunks of any size; no [N, L, V] tensor kept for backward; ORPO through it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rizzearch.errors import ShapeError
from rizzearch.models import build_model
from rizzearch.models.base import get_model_class, model_names, tiny_overrides
from rizzearch.objectives.lm import IGNORE_INDEX, token_logprobs_reference
from rizzearch.testing import assert_close
from rizzearch.training.lora import apply_lora, lora_parameters
from rizzearch.training.losses import head_logprobs, model_token_logprobs, output_head
from rizzearch.training.memory import checkpoint_blocks
from rizzearch.training.preference import preference_forward

V, N, L = 61, 3, 19


def tiny(name: str, **extra):
    _, cfg_cls = get_model_class(name)
    over = {"vocab_size": V, **extra}
    if "dropout" in {f.name for f in dataclasses.fields(cfg_cls)}:
        over["dropout"] = 0.0
    torch.manual_seed(0)
    model = build_model(name, **{**tiny_overrides(name), **over}).train()
    with torch.no_grad():  # exercise zero-initialised paths too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (N, L), generator=g)
    targets = torch.randint(0, V, (N, L), generator=g)
    targets[torch.rand(N, L, generator=g) < 0.4] = IGNORE_INDEX  # prompt / padding positions
    weights = torch.randn(N, L, generator=g)
    return ids, targets, weights


def value_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    lp = fn()
    weights = torch.randn(lp.shape, generator=torch.Generator().manual_seed(7)) if lp.shape[0] != N else data()[2]
    lp.backward(weights.to(lp.dtype))  # a different weight per position, like ORPO's per-row coefficients
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_same(model, chunk_size=None):
    """fp32: values within 1e-6, gradients within 1e-6 of their scale (sums over positions change order);
    fp64: both within 1e-10 (the two forms are the same math)."""
    ids, targets, _ = data()
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-10)):
        model.to(dtype)
        plain, g_plain = value_and_grads(model, lambda: token_logprobs_reference(model(ids)[0], targets))
        ours, g_ours = value_and_grads(model, lambda: model_token_logprobs(model, ids, targets, chunk_size=chunk_size))
        assert ours.dtype == plain.dtype
        assert_close(ours, plain, atol=tol, rtol=tol, name=f"{dtype} log-probs")
        assert (ours[targets == IGNORE_INDEX] == 0).all()
        assert g_ours.keys() == g_plain.keys() and g_plain
        for n in g_plain:
            scale = float(g_plain[n].abs().max()) + 1.0
            assert_close(g_ours[n], g_plain[n], atol=tol * scale, rtol=tol, name=f"{dtype} {n}")
    model.float()


@pytest.mark.parametrize("name", model_names())
def test_every_model_has_a_bypassable_head(name):
    assert output_head(tiny(name)) is not None


@pytest.mark.parametrize("name", model_names())
def test_same_values_and_gradients_as_the_logits_trained_head(name):
    check_same(tiny(name), chunk_size=4)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "llama" else pytest.mark.slow) for n in model_names()])
def test_same_values_and_gradients_with_lora(name):
    check_same(apply_lora(tiny(name), r=4, alpha=8), chunk_size=5)  # the head frozen: gradients from the stored slopes


def test_same_values_and_gradients_with_lora_and_checkpointing():
    model = apply_lora(tiny("llama"), r=4, alpha=8)
    checkpoint_blocks(model)
    check_same(model)


def test_a_lora_wrapped_head_takes_the_checkpointed_path():
    model = tiny("llama", tie_embeddings=False)
    apply_lora(model, r=4, alpha=8, targets=["lm_head"])
    head = output_head(model)[1]
    assert type(head) is not torch.nn.Linear
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    check_same(model, chunk_size=7)


def test_head_logprobs_bias_and_fp64_gradcheck():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 11, dtype=torch.float64)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    torch.autograd.gradcheck(lambda h, w, b: head_logprobs(_Fixed(w, b), h, y, chunk_size=3), (h, head.weight, head.bias))
    frozen = torch.nn.Linear(5, 11, dtype=torch.float64).requires_grad_(False)
    torch.autograd.gradcheck(lambda h: head_logprobs(frozen, h, y, chunk_size=2), (h,))


class _Fixed(torch.nn.Linear):
    """A plain Linear whose weight and bias are given tensors (for gradcheck)."""

    def __new__(cls, w, b):
        m = torch.nn.Linear.__new__(torch.nn.Linear)
        torch.nn.Module.__init__(m)
        m.in_features, m.out_features = w.shape[1], w.shape[0]
        m.weight, m.bias = w, b  # plain tensors, not Parameters
        return m


def test_no_full_logits_are_kept_for_backward():
    big_v = 4096  # the logits dominate every activation of the tiny model
    model = tiny("llama", vocab_size=big_v)
    ids, targets, _ = data()
    params = {p.data_ptr() for p in model.parameters()}
    big = [0]

    def pack(t):
        if t.data_ptr() not in params:
            big.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_token_logprobs(model, ids, targets, chunk_size=4)
    assert max(big) < N * L * big_v / 4  # at most a chunk of logits (none here: the slopes are (K, C))
    big.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs_reference(model(ids)[0], targets)
    assert max(big) >= N * L * big_v  # the plain forward keeps the logits (the test can fail)


def test_a_wrapper_without_a_head_uses_the_logits():
    model = tiny("gpt")

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, state=None, attention_mask=None):
            return self.inner(ids, state, attention_mask=attention_mask)

    ids, targets, _ = data()
    assert output_head(Wrapper()) is None
    assert_close(model_token_logprobs(Wrapper(), ids, targets), model_token_logprobs(model, ids, targets), atol=1e-6, rtol=1e-6)
    assert "forward" not in vars(output_head(model)[1])  # the bypass is undone


def test_targets_outside_the_vocabulary_are_a_clear_error():
    model = tiny("gpt")
    ids, targets, _ = data()
    targets[1, 3] = V
    with pytest.raises(ShapeError, match=r"target 61 at position \(1, 3\) is outside the vocabulary"):
        model_token_logprobs(model, ids, targets)


def test_bf16_autocast_is_close_to_the_logits_path():
    model = tiny("llama")
    ids, targets, _ = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = token_logprobs_reference(model(ids)[0], targets)
        ours = model_token_logprobs(model, ids, targets)
    assert ours.dtype == torch.float32
    assert_close(ours, plain, atol=0.1, rtol=0.05)


def _pref_batch():
    from rizzearch.data.preference import PreferencePair, encode_pairs
    from rizzearch.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    pairs = [PreferencePair((("user", "2+2?"),), "4", "5"), PreferencePair((("user", "Capital of France?"),), "Paris.", "Rome")]
    return tok, encode_pairs(pairs, tok, "chat", max_length=48).tensors


@pytest.mark.parametrize("nll_mode", ["response", "prompt+response"])
def test_orpo_loss_and_lora_gradients_equal_the_logits_path(nll_mode):
    tok, batch = _pref_batch()
    torch.manual_seed(0)
    model = apply_lora(build_model("llama", **{**tiny_overrides("llama"), "vocab_size": tok.vocab_size}), r=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    out = {}
    for from_hidden in (True, False):
        model.zero_grad(set_to_none=True)
        fw = preference_forward(model, batch, nll_mode=nll_mode, from_hidden=from_hidden)
        ref = fw.chosen.mean.sum() + 0.3 * fw.rejected.mean.sum() + fw.chosen_nll
        ref.backward()
        out[from_hidden] = (ref.detach(), [p.grad.clone() for p in lora_parameters(model)])
    assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(out[True][1], out[False][1]):
        assert_close(a, b, atol=1e-6, rtol=1e-5)


def _right_padded(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.randint(0, V, (n, L), generator=g)
    targets = torch.randint(0, V, (n, L), generator=g)
    for i, k in enumerate(lengths):
        targets[i, k:] = IGNORE_INDEX
        targets[i, :2] = IGNORE_INDEX  # a prompt
    return ids, targets


def _count_forwards(model, monkeypatch):
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: (calls.append(a[0].shape), forward(self, *a, **k))[1])
    return calls


@pytest.mark.parametrize("name", model_names())
def test_rows_of_different_lengths_run_in_trimmed_groups_with_the_same_results(name, monkeypatch):
    """Right-padded rows (the last scored target at 19, 4, 3, 17): grouped by length and trimmed, the
    log-probs and gradients equal one forward over the full batch (fp32: 1e-5 of their scale; the
    groups only change the order of sums)."""
    model = tiny(name)
    ids, targets = _right_padded([19, 4, 3, 17])
    full, g_full = value_and_grads(model, lambda: token_logprobs_reference(model(ids)[0], targets))
    calls = _count_forwards(model, monkeypatch)
    ours, g_ours = value_and_grads(model, lambda: model_token_logprobs(model, ids, targets))
    assert sorted(calls) == [torch.Size([2, 4]), torch.Size([2, 19])], calls
    assert_close(ours, full, atol=1e-5, rtol=1e-5, name="log-probs")
    assert g_ours.keys() == g_full.keys()
    for n in g_full:
        assert_close(g_ours[n], g_full[n], atol=1e-5 * (float(g_full[n].abs().max()) + 1.0), rtol=1e-4, name=n)


def test_length_buckets_cost_and_one_forward_under_distributed(monkeypatch):
    from rizzearch.training.losses import length_buckets

    assert [g.tolist() for g in length_buckets(torch.tensor([10, 2, 10, 2]))] == [[1, 3], [0, 2]]
    assert [g.tolist() for g in length_buckets(torch.tensor([10, 9, 10, 9]))] == [[0, 1, 2, 3]]  # not worth a second forward
    assert [g.tolist() for g in length_buckets(torch.tensor([1, 9, 30, 60]))] == [[0], [1], [2], [3]]
    model = tiny("llama")
    ids, targets = _right_padded([19, 4, 3, 17])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    calls = _count_forwards(model, monkeypatch)
    model_token_logprobs(model, ids, targets)
    assert calls == [torch.Size([4, 19])]
