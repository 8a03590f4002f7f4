"""Chat templates: a pretrained model's own Jinja template, rendered the way HF transformers renders it.

A chat model was fine-tuned on conversations laid out by one template (ChatML's ``<|im_start|>``
blocks for SmolLM2 and Qwen2, Llama 3's header tokens, ...), stored with its tokenizer
(tokenizer_config.json or the GGUF ``tokenizer.chat_template`` field). Prompting it any other way
costs quality, so we render that template, with the environment and globals that
``transformers``' ``apply_chat_template`` uses: a sandboxed immutable Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that
keeps non-ASCII characters, ``raise_exception``, ``strftime_now``, the tokenizer's special token
strings (``bos_token``, ``eos_token``, ``pad_token``) and ``add_generation_prompt``.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Sequence

from rizzearch.errors import DataError

Message = dict  # {"role": "system" | "user" | "assistant" | ..., "content": str}


class TemplateRaised(Exception):
    """What ``raise_exception(message)`` inside a template raises."""


def _raise_exception(message):
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str, source: str = "chat template"):
    """The compiled Jinja template (cached); a syntax error raises DataError naming ``source`` and the line."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{source}: chat template syntax error on line {e.lineno}: {e.message}") from e


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    special_tokens: dict[str, str] | None = None,
    source: str = "chat template",
    **extra: Any,
) -> str:
    """Render ``messages`` with ``template``; ``special_tokens`` maps ``bos_token`` etc. to their strings.

    A template that calls ``raise_exception`` (e.g. on a role it does not support) or fails while
    rendering raises DataError naming ``source`` and the template's message.
    """
    import jinja2

    _check_messages(messages, source)
    compiled = compile_template(template, source)
    values = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **values, **extra)
    except TemplateRaised as e:
        raise DataError(f"{source}: the chat template refused these messages: {e}") from e
    except (jinja2.TemplateError, TypeError, KeyError, ValueError) as e:
        raise DataError(f"{source}: rendering the chat template failed: {type(e).__name__}: {e}") from e


def _check_messages(messages, source: str) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"{source}: messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{source}: message {i} must be a dict with 'role' and 'content', got {m!r}")


def apply_chat_template(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True, template: str | None = None) -> str:
    """Render ``messages`` with the tokenizer's own chat template (or ``template``) and special tokens."""
    template = template if template is not None else getattr(tokenizer, "chat_template", None)
    if template is None:
        raise DataError("this tokenizer has no chat template (tokenizer_config.json chat_template / GGUF tokenizer.chat_template)")
    return render_chat(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        special_tokens=tokenizer.special_tokens_config(),
        source=getattr(tokenizer, "chat_template_source", None) or "chat template",
    )
