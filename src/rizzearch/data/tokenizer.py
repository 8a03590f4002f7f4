"""Byte-level BPE tokenizers (HF ``tokenizers``), trained on our own corpora, saved as tokenizer.json.

- ``train_bpe(texts, vocab_size)``: GPT-2 style byte-level BPE. Every byte is in the base
  alphabet, so any text round-trips exactly (no unknown tokens).
- ``byte_tokenizer()``: the same byte-level model with no merges: one token per byte (the fallback
  for tiny experiments; vocab = 256 + special tokens).

Special tokens come first (``<|endoftext|>`` = id 0, ``<|pad|>`` = id 1), then bytes, then merges.
The file is a standard HF ``tokenizer.json`` so other tools can read it too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from rizzearch.errors import ConfigError, DataError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the few methods rizzearch uses."""

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        for s in SPECIAL_TOKENS:
            if hf_tokenizer.token_to_id(s) is None:
                raise DataError(f"tokenizer lacks the special token {s!r}")

    # -- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._tok.token_to_id(EOT)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(PAD)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(self._tok.token_to_id(s) for s in SPECIAL_TOKENS)

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        self._tok.save(str(tmp))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e

    def to_json(self) -> str:
        return self._tok.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _byte_level_bpe(vocab: dict[str, int] | None = None, merges: list | None = None):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges) if vocab is not None else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (ids 2..257), plus the special tokens (ids 0, 1)."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    # order the alphabet by the byte each symbol stands for, so ids are byte + 2
    byte_to_symbol = _bytes_to_unicode()
    for b in range(256):
        vocab[byte_to_symbol[b]] = len(vocab)
    assert set(alphabet) == set(byte_to_symbol.values())
    tok = _byte_level_bpe(vocab, [])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(tok)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (>= 258: specials + all bytes)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < 258:
        raise DataError(f"vocab_size must be >= 258 (2 special tokens + 256 bytes), got {vocab_size}")
    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def make_tokenizer(spec: str, vocab_size: int, texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The tokenizer a ``data.tokenizer`` setting names: "byte" (one token per byte), "bpe" (a
    byte-level BPE of ``vocab_size`` trained on ``texts()``, called only then), or a tokenizer.json path."""
    if spec == "byte":
        return byte_tokenizer()
    if spec == "bpe":
        return train_bpe(texts(), vocab_size)
    if spec.endswith(".json"):
        return Tokenizer.load(spec)
    raise ConfigError(f"data.tokenizer: expected 'bpe', 'byte' or a tokenizer.json path, got {spec!r}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary and merges (checkpoint/tokenizer mismatch checks)."""
    import hashlib

    model = json.loads(tok.to_json())["model"]
    blob = json.dumps([sorted(model.get("vocab", {}).items()), model.get("merges", [])], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
