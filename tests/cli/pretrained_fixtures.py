"""Helpers of the pretrained-model CLI tests: a tiny random Llama saved as an HF folder with its own
byte-level BPE (no token of ours) and a ChatML chat template, and the bundled SmolLM2 loaded once."""

from __future__ import annotations

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(template: str | None = CHATML, pad: bool = False):
    """A byte-level BPE with its own specials: bos <s>, eos <|im_end|>, no pad (eos pads)."""
    from rizzearch.data.gguf import tokenizer_from_gguf_fields
    from rizzearch.data.tokenizer import _bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = SPECIALS + [_bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [3] * 4 + [1] * (len(tokens) - 4), "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 3}
    if template is not None:
        fields["tokenizer.chat_template"] = template
    if pad:
        fields["tokenizer.ggml.padding_token_id"] = 1
    return tokenizer_from_gguf_fields(fields)


def tiny_llama(vocab: int, seed: int = 0, **kw):
    from rizzearch.models import build_model

    torch.manual_seed(seed)
    m = build_model("llama", vocab_size=vocab, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64, max_seq_len=256, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def save_tiny(folder, template: str | None = CHATML, **kw):
    from rizzearch.models import save_pretrained

    tok = tiny_tokenizer(template)
    model = tiny_llama(tok.vocab_size, **kw)
    save_pretrained(model, tok, folder)
    return model, tok
