"""The tokenizer's own Jinja chat template as a preference-data template (``data/preference.py``)."""

from __future__ import annotations

from typing import Sequence

from rizzearch.errors import ConfigError


class ModelChatTemplate:
    """The tokenizer's own chat template: the prompt is the conversation rendered with the generation
    prompt (``data/chat.py``), a response its text (``encode_pairs`` appends the eos, ending the turn)."""

    def __init__(self, tokenizer):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("data.template 'model': this tokenizer has no chat template; use 'chat' or 'plain'")
        self.tokenizer = tokenizer

    def render_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        from rizzearch.data.chat import apply_chat_template

        return apply_chat_template(self.tokenizer, [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)

    def render_response(self, text: str) -> str:
        return text
