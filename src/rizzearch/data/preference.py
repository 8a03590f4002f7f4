"""Preference data: (prompt, chosen, rejected) triples -> padded token tensors for SFT, DPO and ORPO.

Two input formats, one output:

- **pairs** JSONL, one object per line: ``{"prompt": str | [{"role", "content"}, ...], "chosen": str,
  "rejected": str}`` (the format of TRL and most preference datasets).
- **hh**: Anthropic HH-RLHF lines ``{"chosen": dialogue, "rejected": dialogue}`` where each dialogue is
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the prompt is everything up to the last
  ``"\\n\\nAssistant:"`` (it must be the same in both), the responses are the final assistant turns.
  The bundled harmless-base test split is ``rizzearch.corpora.path("hh-rlhf-harmless-test")``.

A bad row (invalid JSON, a missing or non-string field, an empty prompt or response, chosen equal
to rejected, prompts that differ between the two HH dialogues) is reported as
``file:line: field 'name': problem``. ``on_error="raise"`` stops at the first one (DataError);
``"skip"`` drops them and keeps the messages in ``PreferenceSet.problems``.

Encoding. The prompt is rendered with a ``ChatTemplate`` (or the tokenizer's own Jinja chat template
plus its generation prompt) and tokenized on its own; each response
is tokenized on its own, followed by the end-of-text token. Tokenizing the parts separately keeps
the prompt tokens identical in the chosen and rejected sequences (no merge across the boundary).

Truncation never silently empties a response. Each response keeps at most
``max_response_length`` tokens (cut at the end); the prompt then gets what is left of
``max_length`` after the longer of the two responses and is cut from the *left* (the most recent
turns stay). ``max_response_length < max_length`` is checked at config time, so both the prompt and
every response keep at least one token. Counts of truncated prompts/responses are in ``stats``.

Tensors (N pairs, right-padded to the longest sequence, padding id = the tokenizer's pad id)::

    chosen_input_ids       (N, L) long   prompt tokens then chosen response tokens
    chosen_attention_mask  (N, L) bool   real tokens
    chosen_response_mask   (N, L) bool   response tokens (what the losses score)
    rejected_input_ids / rejected_attention_mask / rejected_response_mask   likewise
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

from rizzearch.data.text import resolve_source
from rizzearch.errors import ConfigError, DataError

SIDES = ("chosen", "rejected")
TENSOR_KEYS = tuple(f"{s}_{k}" for s in SIDES for k in ("input_ids", "attention_mask", "response_mask"))
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------
# Records and templates


@dataclass(frozen=True)
class PreferencePair:
    """One preference record.

    Args:
        messages: the prompt as (role, content) turns, role in system/user/assistant; it ends with
            the turn the responses answer.
        chosen: the preferred response text.
        rejected: the dispreferred response text.
        where: ``file:line`` of the record (for messages).
    """

    messages: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    where: str = "<memory>"


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text.

    A prompt renders as ``role_prefix + content + turn_end`` per turn, followed by ``assistant``;
    a response renders as ``response_prefix + content`` followed by the end-of-text token.

    Args:
        system: text before a system message.
        user: text before a user turn.
        assistant: text before an assistant turn (the prompt ends with it).
        turn_end: text after each turn's content.
        response_prefix: text before the response (a space keeps BPE word tokens intact).
    """

    system: str = "System: "
    user: str = "User: "
    assistant: str = "Assistant:"
    turn_end: str = "\n"
    response_prefix: str = " "

    def prefix(self, role: str) -> str:
        return {"system": self.system, "user": self.user, "assistant": self.assistant + self.response_prefix}[role]

    def render_prompt(self, messages: Sequence[tuple[str, str]]) -> str:
        return "".join(self.prefix(r) + c + self.turn_end for r, c in messages) + self.assistant

    def render_response(self, text: str) -> str:
        return self.response_prefix + text


TEMPLATES: dict[str, ChatTemplate] = {
    "chat": ChatTemplate(),
    # the prompt text and the response are used as they are (single-turn tasks, synthetic data)
    "plain": ChatTemplate(system="", user="", assistant="", turn_end="", response_prefix=""),
}


# besides TEMPLATES: "model" is the tokenizer's own Jinja chat template; "auto" is "model" when it has one, else "chat"
MODEL_TEMPLATES = ("auto", "model")


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"data.template: unknown chat template {name!r}; choose one of {sorted(TEMPLATES) + list(MODEL_TEMPLATES)}")
    return TEMPLATES[name]


def check_template_name(name: str) -> None:
    """Config-time check of a template name (the model's own template is checked once the tokenizer is known)."""
    if name not in MODEL_TEMPLATES:
        get_template(name)


def template_name(name: str, tokenizer) -> str:
    """``"auto"`` resolved for ``tokenizer``: ``"model"`` when it has a chat template, else ``"chat"``."""
    return ("model" if getattr(tokenizer, "chat_template", None) is not None else "chat") if name == "auto" else name


def resolve_template(template, tokenizer):
    """A template name ("auto", "model", "chat", "plain") or object -> the object ``encode_pairs`` uses."""
    if not isinstance(template, str):
        return template
    from rizzearch.data.model_template import ModelChatTemplate

    name = template_name(template, tokenizer)
    return ModelChatTemplate(tokenizer) if name == "model" else get_template(name)


# ----------------------------------------------------------------------------------------------
# Reading


class _Problems:
    """Collects ``file:line: field: problem`` messages; raises on the first under on_error=raise."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error: expected 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.messages = on_error, []

    def add(self, where: str, field_name: str | None, problem: str) -> None:
        msg = f"{where}: field {field_name!r}: {problem}" if field_name else f"{where}: {problem}"
        if self.on_error == "raise":
            raise DataError(msg)
        self.messages.append(msg)


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"{path}: preference file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield i, line
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 (gzipped) JSONL: {e}") from e


def _parse_line(line: str, where: str, problems: _Problems) -> dict | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problems.add(where, None, f"not valid JSON (column {e.colno}: {e.msg})")
        return None
    if not isinstance(obj, dict):
        problems.add(where, None, f"expected a JSON object, got {type(obj).__name__}")
        return None
    return obj


def _text_field(obj: dict, key: str, where: str, problems: _Problems) -> str | None:
    if key not in obj:
        problems.add(where, key, "missing")
        return None
    v = obj[key]
    if not isinstance(v, str):
        problems.add(where, key, f"expected a string, got {type(v).__name__}")
        return None
    if not v.strip():
        problems.add(where, key, "empty")
        return None
    return v.strip()


def _messages_field(obj: dict, where: str, problems: _Problems) -> tuple[tuple[str, str], ...] | None:
    if "prompt" not in obj:
        problems.add(where, "prompt", "missing")
        return None
    p = obj["prompt"]
    if isinstance(p, str):
        if not p.strip():
            problems.add(where, "prompt", "empty")
            return None
        return (("user", p.strip()),)
    if isinstance(p, list):
        turns = []
        for j, m in enumerate(p):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                problems.add(where, f"prompt[{j}]", f"expected {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r:.80}")
                return None
            turns.append((m["role"], m["content"].strip()))
        if not turns or not any(c for _, c in turns):
            problems.add(where, "prompt", "empty")
            return None
        return tuple(turns)
    problems.add(where, "prompt", f"expected a string or a list of messages, got {type(p).__name__}")
    return None


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_dialogue(text: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF dialogue into (role, content) turns (Human -> user, Assistant -> assistant)."""
    parts = _HH_TURN.split(text)
    turns = []
    for role, content in zip(parts[1::2], parts[2::2]):
        turns.append(("user" if role == "Human" else "assistant", content.strip()))
    return turns


def _hh_record(obj: dict, where: str, problems: _Problems) -> PreferencePair | None:
    texts = {}
    for key in SIDES:
        if key not in obj:
            problems.add(where, key, "missing")
            return None
        if not isinstance(obj[key], str):
            problems.add(where, key, f"expected a string, got {type(obj[key]).__name__}")
            return None
        texts[key] = obj[key]
    split = {}
    for key, text in texts.items():
        i = text.rfind("\n\nAssistant:")
        if i < 0:
            problems.add(where, key, "no '\\n\\nAssistant:' turn in the dialogue")
            return None
        split[key] = (text[:i], text[i + len("\n\nAssistant:") :].strip())
    if split["chosen"][0] != split["rejected"][0]:
        problems.add(where, "rejected", "the dialogue before the last Assistant turn differs from chosen's")
        return None
    messages = parse_hh_dialogue(split["chosen"][0])
    if not messages or not any(c for _, c in messages):
        problems.add(where, "chosen", "empty prompt (no Human turn before the last Assistant turn)")
        return None
    for key in SIDES:
        if not split[key][1]:
            problems.add(where, key, "empty final Assistant response")
            return None
    if split["chosen"][1] == split["rejected"][1]:
        problems.add(where, "rejected", "identical to chosen")
        return None
    return PreferencePair(tuple(messages), split["chosen"][1], split["rejected"][1], where)


def _pairs_record(obj: dict, where: str, problems: _Problems) -> PreferencePair | None:
    messages = _messages_field(obj, where, problems)
    if messages is None:
        return None
    chosen = _text_field(obj, "chosen", where, problems)
    if chosen is None:
        return None
    rejected = _text_field(obj, "rejected", where, problems)
    if rejected is None:
        return None
    if chosen == rejected:
        problems.add(where, "rejected", "identical to chosen")
        return None
    return PreferencePair(messages, chosen, rejected, where)


def read_preferences(
    source: str | Path,
    format: Literal["auto", "pairs", "hh"] = "auto",
    on_error: Literal["raise", "skip"] = "raise",
    limit: int | None = None,
) -> tuple[list[PreferencePair], list[str]]:
    """Read preference records -> (pairs, problems); see the module docstring for the formats.

    ``format="auto"`` picks ``pairs`` when the first record has a ``prompt`` field, else ``hh``.
    """
    path = resolve_source(source)
    problems = _Problems(on_error)
    if format not in ("auto", "pairs", "hh"):
        raise ConfigError(f"data.format: expected auto, pairs or hh, got {format!r}")
    pairs: list[PreferencePair] = []
    fmt = format
    for lineno, line in _open_lines(path):
        where = f"{path}:{lineno}"
        obj = _parse_line(line, where, problems)
        if obj is None:
            continue
        if fmt == "auto":
            fmt = "pairs" if "prompt" in obj else "hh"
        rec = (_pairs_record if fmt == "pairs" else _hh_record)(obj, where, problems)
        if rec is not None:
            pairs.append(rec)
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        detail = f"; first problem: {problems.messages[0]}" if problems.messages else ""
        raise DataError(f"{path}: no usable preference pairs{detail}")
    return pairs, problems.messages


# ----------------------------------------------------------------------------------------------
# Encoding


@dataclass
class PreferenceSet:
    """Encoded preference pairs.

    Args:
        tensors: the six (N, L) tensors named in the module docstring.
        pairs: the records, in row order.
        stats: counts (pairs, truncated prompts/responses, dropped pairs) and lengths.
        problems: messages for every dropped record (``file:line: field: problem``).
    """

    tensors: dict[str, Tensor]
    pairs: list[PreferencePair]
    stats: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tensors["chosen_input_ids"].shape[0]

    def subset(self, index: Sequence[int]) -> "PreferenceSet":
        idx = torch.as_tensor(list(index), dtype=torch.long)
        t = {k: v.index_select(0, idx) for k, v in self.tensors.items()}
        return PreferenceSet(trim_padding(t), [self.pairs[i] for i in idx.tolist()], dict(self.stats), list(self.problems))

    def split(self, val_fraction: float, seed: int = 0) -> tuple["PreferenceSet", "PreferenceSet | None"]:
        """Random train/validation split (validation gets round(N * val_fraction) pairs)."""
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        n = len(self)
        n_val = int(round(n * val_fraction))
        if n_val == 0:
            return self, None
        if n_val >= n:
            raise DataError(f"val_fraction {val_fraction} leaves no training pairs out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return self.subset(sorted(perm[n_val:])), self.subset(sorted(perm[:n_val]))


def check_budget(max_length: int, max_response_length: int | None) -> int:
    """Validate the truncation budget at config time; returns the per-response budget."""
    if max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2 (one prompt and one response token), got {max_length}")
    r = max_length // 2 if max_response_length is None else max_response_length
    if not 1 <= r < max_length:
        raise ConfigError(
            f"data.max_response_length must be in [1, max_length - 1] = [1, {max_length - 1}] so neither the prompt "
            f"nor a response can be emptied by truncation, got {r}"
        )
    return r


def encode_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    template: ChatTemplate | str = "auto",
    max_length: int = 512,
    max_response_length: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> PreferenceSet:
    """Tokenize, truncate (per-response budget) and pad (pad id, else eos) preference pairs -> PreferenceSet.
    ``template``: "auto" (the tokenizer's own when it has one, else "chat"), "model", "chat", "plain" or an object."""
    template = resolve_template(template, tokenizer)
    r_budget = check_budget(max_length, max_response_length)
    problems = _Problems(on_error)
    eot = tokenizer.eot_id
    rows: list[tuple[list[int], list[int], list[int]]] = []
    kept: list[PreferencePair] = []
    trunc_prompt = trunc_resp = 0
    for pr in pairs:
        prompt = tokenizer.encode(template.render_prompt(pr.messages))
        resp = {s: tokenizer.encode(template.render_response(getattr(pr, s))) + [eot] for s in SIDES}
        if not prompt:
            problems.add(pr.where, "prompt", "encodes to no tokens")
            continue
        for s in SIDES:
            if len(resp[s]) > r_budget:
                resp[s] = resp[s][:r_budget]
                trunc_resp += 1
        p_budget = max_length - max(len(resp["chosen"]), len(resp["rejected"]))  # >= 1 by check_budget
        if len(prompt) > p_budget:
            prompt = prompt[len(prompt) - p_budget :]
            trunc_prompt += 1
        if resp["chosen"] == resp["rejected"]:
            problems.add(pr.where, "rejected", f"identical to chosen after truncation to {r_budget} tokens")
            continue
        rows.append((prompt, resp["chosen"], resp["rejected"]))
        kept.append(pr)
    if not rows:
        detail = f"; first problem: {problems.messages[0]}" if problems.messages else ""
        raise DataError(f"no usable preference pairs after encoding{detail}")
    L = max(len(p) + max(len(c), len(r)) for p, c, r in rows)
    N = len(rows)
    pad = getattr(tokenizer, "pad_id", eot)
    t = {k: torch.zeros(N, L, dtype=torch.bool) for k in TENSOR_KEYS}
    for s in SIDES:
        t[f"{s}_input_ids"] = torch.full((N, L), pad, dtype=torch.long)
    for i, (p, c, r) in enumerate(rows):
        for s, resp in (("chosen", c), ("rejected", r)):
            seq = p + resp
            t[f"{s}_input_ids"][i, : len(seq)] = torch.tensor(seq)
            t[f"{s}_attention_mask"][i, : len(seq)] = True
            t[f"{s}_response_mask"][i, len(p) : len(seq)] = True
    stats = {
        "pairs": N,
        "dropped": len(pairs) - N,
        "truncated_prompts": trunc_prompt,
        "truncated_responses": trunc_resp,
        "max_tokens": L,
        "mean_tokens": sum(len(p) + (len(c) + len(r)) / 2 for p, c, r in rows) / N,
        "max_length": max_length,
        "max_response_length": r_budget,
    }
    return PreferenceSet(t, kept, stats, problems.messages)


def trim_padding(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop trailing columns that are padding in every row of both sides (other tensors pass through)."""
    L = max(int(tensors[f"{s}_attention_mask"].sum(1).max()) for s in SIDES)
    return {k: (v[:, :L] if k in TENSOR_KEYS else v) for k, v in tensors.items()}


def validate_batch(batch: dict[str, Tensor], where: str = "preference batch") -> None:
    """Check a preference batch (keys, shapes, masks); ShapeError naming the tensor and row.

    Every row needs a non-empty prompt (the first token cannot be scored) and at least one
    response token, and response tokens must be real tokens.
    """
    from rizzearch.errors import ShapeError

    for k in TENSOR_KEYS:
        if k not in batch:
            raise ShapeError(f"{where}: missing tensor {k!r} (has {sorted(batch)})")
    for s in SIDES:
        ids, att, resp = (batch[f"{s}_{k}"] for k in ("input_ids", "attention_mask", "response_mask"))
        if ids.dim() != 2 or att.shape != ids.shape or resp.shape != ids.shape:
            raise ShapeError(f"{where}: {s}_input_ids/attention_mask/response_mask must share one (N, L) shape, got "
                             f"{tuple(ids.shape)}, {tuple(att.shape)}, {tuple(resp.shape)}")
        resp_b, att_b = resp.bool(), att.bool()
        empty = ~resp_b.any(1)
        if bool(empty.any()):
            raise ShapeError(f"{where}: {s}_response_mask row {int(empty.nonzero()[0])} is all False (all-masked response)")
        if bool(resp_b[:, 0].any()):
            raise ShapeError(f"{where}: {s}_response_mask row {int(resp_b[:, 0].nonzero()[0])} starts at position 0 (empty prompt)")
        if bool((resp_b & ~att_b).any()):
            raise ShapeError(f"{where}: {s}_response_mask row {int((resp_b & ~att_b).any(1).nonzero()[0])} marks padding as response")
    n = {batch[f"{s}_input_ids"].shape[0] for s in SIDES}
    if len(n) != 1:
        raise ShapeError(f"{where}: chosen and rejected have different numbers of rows: {sorted(n)}")


class PairEvalBatches:
    """Fixed, in-order batches over a PreferenceSet's tensors (evaluation, reference log-probs)."""

    def __init__(self, tensors: dict[str, Tensor], batch_size: int):
        self.tensors, self.batch_size = tensors, batch_size
        self.n = next(iter(tensors.values())).shape[0]

    def batches(self) -> Iterator[dict[str, Tensor]]:
        for s in range(0, self.n, self.batch_size):
            yield trim_padding({k: v[s : s + self.batch_size] for k, v in self.tensors.items()})
