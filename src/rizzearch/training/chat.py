"""``rizz chat``: talk to a model with its own chat template, tokens printed as they are generated.

The loop keeps the whole conversation; each turn renders it with the model's template
(``data/chat.py``, ``add_generation_prompt=True``), prefills it, and decodes one token at a time
until the model's eos (or ``max_new_tokens``). Text is streamed by decoding the growing answer and
printing only the new suffix, so a character split over several byte tokens is printed once it is
complete (``StreamDecoder``).
"""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

import torch

from rizzearch.errors import ConfigError, DataError
from rizzearch.models.base import _filter_logits, eval_mode

REPLACEMENT = "\ufffd"  # what a byte-level decoder shows for an incomplete UTF-8 sequence


def chat_prompt_ids(tok, messages: list[dict], source: str) -> list[int]:
    """``messages`` rendered with the tokenizer's chat template (generation prompt added) -> ids."""
    from rizzearch.data.chat import apply_chat_template

    if getattr(tok, "chat_template", None) is None:
        raise ConfigError(f"{source}: the model has no chat template (tokenizer_config.json chat_template / GGUF tokenizer.chat_template); use rizz generate without --chat")
    if getattr(tok, "chat_template_source", None) is None:
        tok.chat_template_source = f"{source}: chat template"
    ids = tok.encode(apply_chat_template(tok, messages, add_generation_prompt=True))
    if not ids:
        raise DataError(f"{source}: the chat template rendered an empty prompt")
    return ids


@torch.no_grad()
def stream_tokens(model, ids: list[int], max_new_tokens: int, *, eos_ids=(), temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, generator=None) -> Iterator[int]:
    """Yield new token ids one by one (batch 1, KV cache / recurrent state); stops after an eos id
    (not yielded) or ``max_new_tokens``. Greedy at temperature 0, else sampled like ``models.base.generate``."""
    device = next(model.parameters()).device
    with eval_mode(model):
        last, state = model.prefill(torch.tensor([ids], device=device), None)
        last = last.float()  # (1, V)
        for i in range(max_new_tokens):
            if temperature > 0:
                nxt = torch.multinomial(_filter_logits(last / temperature, top_k, top_p).softmax(-1), 1, generator=generator)[:, 0]
            else:
                nxt = last.argmax(-1)
            t = int(nxt)
            if t in eos_ids:
                return
            yield t
            if i + 1 < max_new_tokens:
                last, state = model.step(nxt, state)
                last = last.float()


class StreamDecoder:
    """Incremental detokenization: ``push(id)`` returns the text that is new and complete."""

    def __init__(self, tok):
        self.tok, self.ids, self.printed = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):  # an unfinished multi-byte character: wait for its next byte
            return ""
        new = text[len(self.printed):] if text.startswith(self.printed) else text
        self.printed = text
        return new

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


def reply(model, tok, messages: list[dict], source: str, out: TextIO, max_new_tokens: int, **sampling) -> str:
    """Generate the assistant's answer to ``messages``, streaming it to ``out``; returns the answer."""
    ids = chat_prompt_ids(tok, messages, source)
    dec = StreamDecoder(tok)
    for t in stream_tokens(model, ids, max_new_tokens, eos_ids={tok.eos_id}, **sampling):
        piece = dec.push(t)
        if piece:
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    return dec.text()


def chat(
    init: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    checkpoint: str | None = None,
) -> list[dict]:
    """Chat with a model in the terminal, using its own chat template; answers stream as they are generated.

    Reads one user message per line from stdin; `/exit` or end of input ends the chat. The
    conversation so far is part of every prompt.

    Args:
        init: the model: a run or checkpoint folder, an HF model folder, a .gguf file or a short
            name (smollm2).
        system: an optional system message opening the conversation.
        max_new_tokens: at most this many tokens per answer.
        temperature: 0 for greedy decoding (default), > 0 to sample.
        top_k: sample only among the k most likely tokens (None: all).
        top_p: nucleus sampling mass (None: off).
        seed: sampling seed.
        device: cpu or cuda.
        checkpoint: the same as --init.
    """
    from rizzearch.training.distributed import check_device
    from rizzearch.training.recipes import load_source, model_source

    check_device(device)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    source = model_source(checkpoint, init)
    model, tok, _ = load_source(source, device=device)
    messages = [{"role": "system", "content": system}] if system else []
    chat_prompt_ids(tok, messages + [{"role": "user", "content": "hi"}], source)  # a template that fails, fails now
    g = torch.Generator(device=device).manual_seed(seed)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        answer = reply(model, tok, messages, source, sys.stdout, max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        messages.append({"role": "assistant", "content": answer})
    return messages
