"""Llama family against transformers (random weights): logits, step-by-step decode, round trips."""

from __future__ import annotations

import pytest
import torch

from rizzearch.models.convert import from_hf_llama, to_hf_llama
from rizzearch.testing import assert_close

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.anchors

V = 101


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms away from 1, biases away from 0
    return model.eval()


def hf_llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, **kw,
    )
    return _randomise(transformers.LlamaForCausalLM(cfg))


def hf_qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rope_theta=20000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )
    return _randomise(transformers.Qwen2ForCausalLM(cfg))


LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)

CASES = {
    "llama-gqa-untied": lambda: hf_llama(),
    "llama3-rope-scaling": lambda: hf_llama(rope_scaling=LLAMA3_SCALING),
    "qwen2-bias-tied": hf_qwen2,
}


@pytest.fixture(params=sorted(CASES))
def pair(request):
    hf = CASES[request.param]()
    return hf, from_hf_llama(hf).eval()


def test_config_is_mapped(pair):
    hf, ours = pair
    c = ours.config
    assert (c.n_kv_head, c.d_model, c.d_ff) == (hf.config.num_key_value_heads, 64, 96)
    assert c.qkv_bias == isinstance(hf, transformers.Qwen2ForCausalLM)
    assert c.tie_embeddings == hf.config.tie_word_embeddings


@torch.no_grad()
def test_logits_equal_transformers(pair):
    hf, ours = pair
    x = torch.randint(0, V, (3, 40))  # past original_max_position_embeddings=16: the llama3 bands all matter
    want = hf(x).logits
    got, _ = ours(x)
    assert_close(got, want, atol=1e-4, rtol=1e-4, name="logits vs transformers")


@torch.no_grad()
def test_step_decode_equals_transformers_forward(pair):
    hf, ours = pair
    x = torch.randint(0, V, (2, 24))
    want = hf(x).logits
    logits, state = ours(x[:, :5])
    parts = [logits]
    for t in range(5, 24):
        step, state = ours.step(x[:, t], state)
        parts.append(step[:, None])
    assert_close(torch.cat(parts, 1), want, atol=1e-4, rtol=1e-4, name="step decode vs transformers forward")


@torch.no_grad()
def test_left_padding_matches_transformers(pair):
    hf, ours = pair
    x = torch.randint(0, V, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    got, _ = ours(x, attention_mask=mask)
    want = hf(x[:1, 4:]).logits
    assert_close(got[:1, 4:], want, atol=1e-4, rtol=1e-4, name="left-padded row vs unpadded transformers")


@torch.no_grad()
def test_to_hf_round_trips(pair):
    hf, ours = pair
    back = to_hf_llama(ours)
    assert type(back) is type(hf)
    x = torch.randint(0, V, (2, 17))
    assert_close(back(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5, name="to_hf_llama logits")
    again = from_hf_llama(back)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@torch.no_grad()
def test_greedy_generation_equals_transformers(pair):
    from rizzearch.models import generate

    hf, ours = pair
    prompt = torch.randint(0, V, (1, 6))
    want = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 6:]
    got = generate(ours, prompt, 10)
    assert torch.equal(got, want)
