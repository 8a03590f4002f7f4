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
    """Thin wrapper over ``tokenizers.Tokenizer`` with the few methods rizzearch uses.

    Our own tokenizers carry ``<|endoftext|>`` and ``<|pad|>``. A pretrained model's tokenizer
    (tokenizer.json of an HF folder, or the vocabulary of a GGUF file) has its own special tokens
    instead: pass ``eos_id`` (the end-of-text / end-of-turn id) and optionally ``pad_id`` (the eos
    id when the model has none) and ``bos_id``; nothing of ours is then required. ``chat_template``
    is the model's Jinja chat template (rendered by ``rizzearch.data.chat``), saved with the tokenizer.
    """

    def __init__(
        self,
        hf_tokenizer,
        *,
        eos_id: int | None = None,
        pad_id: int | None = None,
        bos_id: int | None = None,
        chat_template: str | None = None,
    ):
        self._tok = hf_tokenizer
        self.chat_template = chat_template
        n = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            for s in SPECIAL_TOKENS:
                if hf_tokenizer.token_to_id(s) is None:
                    raise DataError(f"tokenizer lacks the special token {s!r} (a pretrained tokenizer needs its eos_id)")
            eos_id, pad_id = hf_tokenizer.token_to_id(EOT), hf_tokenizer.token_to_id(PAD)
            self._ours = True
        else:
            self._ours = False
        for name, i in (("eos_id", eos_id), ("pad_id", pad_id), ("bos_id", bos_id)):
            if i is not None and not 0 <= int(i) < n:
                raise DataError(f"tokenizer {name} = {i} is outside the vocabulary (size {n})")
        self._eos = int(eos_id)
        self._pad = int(pad_id) if pad_id is not None else self._eos
        self._bos = int(bos_id) if bos_id is not None else None

    # -- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """End of text: ours ``<|endoftext|>``, or the pretrained model's eos id."""
        return self._eos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        """Ours ``<|pad|>``, or the pretrained model's pad id (its eos id when it has none)."""
        return self._pad

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def is_pretrained(self) -> bool:
        """True for a pretrained model's own tokenizer (no tokens of ours)."""
        return not self._ours

    @property
    def special_ids(self) -> tuple[int, ...]:
        if self._ours:
            return tuple(self._tok.token_to_id(s) for s in SPECIAL_TOKENS)
        added = self._tok.get_added_tokens_decoder()
        ids = {i for i, t in added.items() if t.special} | {self._eos, self._pad}
        return tuple(sorted(ids | ({self._bos} if self._bos is not None else set())))

    def token(self, i: int) -> str | None:
        """The string of token id ``i`` (None when out of range)."""
        return self._tok.id_to_token(int(i))

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- files ----------------------------------------------------------------------------------
    def special_tokens_config(self) -> dict:
        """bos/eos/pad token strings, as tokenizer_config.json holds them (a pretrained tokenizer's ids)."""
        name = lambda i: None if i is None else self._tok.id_to_token(i)  # noqa: E731
        return {"bos_token": name(self._bos), "eos_token": name(self._eos), "pad_token": name(self._pad)}

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json; a pretrained tokenizer also writes its special tokens to tokenizer_config.json beside it."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        self._tok.save(str(tmp))
        tmp.replace(path)
        if not self._ours or self.chat_template is not None:
            side = path.parent / "tokenizer_config.json"
            cfg = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
            if not self._ours:
                cfg.update(self.special_tokens_config())
            if self.chat_template is not None:
                cfg["chat_template"] = self.chat_template
            tmp = side.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
            tmp.replace(side)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read tokenizer.json; without our special tokens, the ids come from tokenizer_config.json beside it."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e
        side = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        if all(tok.token_to_id(s) is not None for s in SPECIAL_TOKENS):
            out = cls(tok)
        else:
            out = cls.from_special_tokens(tok, side, where=str(path))
        out.chat_template = chat_template_of(side, path.parent)
        return out

    @classmethod
    def from_special_tokens(cls, hf_tokenizer, special: dict, where: str = "tokenizer") -> "Tokenizer":
        """A pretrained tokenizer whose ``special`` dict names eos/pad/bos by string (tokenizer_config.json
        style: ``eos_token`` as a string or ``{"content": ...}``) or by id (``eos_token_id``)."""

        def ident(key: str):
            if special.get(key + "_id") is not None:
                v = special[key + "_id"]
                return int(v[0] if isinstance(v, list) else v)
            tok = special.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if tok is None:
                return None
            i = hf_tokenizer.token_to_id(tok)
            if i is None:
                raise DataError(f"{where}: {key} {tok!r} is not in the vocabulary")
            return i

        eos = ident("eos_token")
        if eos is None:
            raise DataError(f"{where}: no eos_token (tokenizer_config.json / generation_config.json) and no {EOT!r} token")
        return cls(hf_tokenizer, eos_id=eos, pad_id=ident("pad_token"), bos_id=ident("bos_token"))

    def to_json(self) -> str:
        return self._tok.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self._eos}, pad_id={self._pad})"


def chat_template_of(tokenizer_config: dict, folder: Path) -> str | None:
    """The chat template of an HF folder: ``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates: the one named "default")."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = tokenizer_config.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default", next(iter(named.values()), None))
    return t if isinstance(t, str) else None


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


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
