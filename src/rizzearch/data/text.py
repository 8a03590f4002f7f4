"""Text -> token memmap shards with a train/val split.

``prepare_text(source, out_dir, tokenizer)`` reads a bundled corpus (by name) or text file(s),
splits off the last ``val_fraction`` of the text (at a line boundary) as validation, tokenizes,
and writes ``out_dir/{train,val}_NNN.bin`` (uint16, or uint32 for vocabularies >= 65,536) plus
``meta.json`` (token/byte counts per split, the tokenizer fingerprint). ``TextDataset.open``
memory-maps the shards back. Bytes per token is recorded so losses convert to bits per byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rizzearch.data.tokenizer import Tokenizer, tokenizer_fingerprint
from rizzearch.errors import DataError
from rizzearch.runs import atomic_write_text

SHARD_TOKENS = 1 << 24  # 16M tokens per shard file


def resolve_source(source: str | Path) -> Path:
    """A bundled corpus name or a file path -> the file."""
    from rizzearch import corpora

    src = str(source)
    return corpora.path(src) if src in corpora.list() else Path(src)


def read_source(source: str | Path) -> tuple[str, str]:
    """Text of a bundled corpus name or a file path -> (text, description). Errors name the file."""
    text, desc, _ = read_source_digest(source)
    return text, desc


def read_source_digest(source: str | Path) -> tuple[str, str, dict]:
    """Like ``read_source``, plus the content key of the file: ``{"sha256", "bytes"}`` of its raw
    bytes (read once). Caches and resume checks use this key, never the path or the mtime, so a
    replaced corpus is never mistaken for the old one."""
    import hashlib

    from rizzearch import corpora

    path = resolve_source(source)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a text file or a bundled corpus name ({', '.join(corpora.list())})")
    if not path.exists():
        raise DataError(f"{path}: corpus file not found (bundled corpora: {', '.join(corpora.list())})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() in text mode
    if not text.strip():
        raise DataError(f"{path}: corpus file is empty")
    return text, str(path), {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split at the line boundary nearest to (1 - val_fraction) of the characters."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return text, ""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < (1 << 16) else np.uint32


def _write_shards(ids: np.ndarray, out: Path, prefix: str) -> list[str]:
    names = []
    for i, start in enumerate(range(0, max(len(ids), 1), SHARD_TOKENS)):
        name = f"{prefix}_{i:03d}.bin"
        tmp = out / (name + ".tmp")
        ids[start : start + SHARD_TOKENS].tofile(tmp)
        os.replace(tmp, out / name)
        names.append(name)
    return names


@dataclass
class TextDataset:
    """Token shards of one corpus: ``train`` / ``val`` are lists of 1-D uint arrays (memmaps)."""

    root: Path
    train: list[np.ndarray]
    val: list[np.ndarray]
    meta: dict

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token on the validation split (for bits per byte)."""
        m = self.meta["val"] if self.meta["val"]["tokens"] else self.meta["train"]
        return m["bytes"] / max(m["tokens"], 1)

    @classmethod
    def open(cls, root: str | Path) -> "TextDataset":
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: not found (run prepare_text first)")
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])

        def load(names):
            arrays = []
            for n in names:
                p = root / n
                if not p.is_file():
                    raise DataError(f"{p}: token shard missing")
                if p.stat().st_size % dtype.itemsize:
                    raise DataError(f"{p}: truncated token shard ({p.stat().st_size} bytes)")
                arrays.append(np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype))
            return arrays

        return cls(root, load(meta["train"]["shards"]), load(meta["val"]["shards"]), meta)


def prepare_text(
    source: str | Path,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    val_fraction: float = 0.1,
) -> TextDataset:
    """Tokenize ``source`` into ``out_dir``. The shards are reused only when ``meta.json`` records
    the same content key (sha256 and size of the corpus bytes), tokenizer fingerprint and split; a
    replaced corpus or another tokenizer rebuilds them."""
    text, desc, digest = read_source_digest(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = tokenizer_fingerprint(tokenizer)
    meta_path = out / "meta.json"
    key = {"tokenizer": fp, "content": digest, "val_fraction": val_fraction}
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            old = {}  # an unreadable cache is rebuilt
        if isinstance(old, dict) and all(old.get(k) == v for k, v in key.items()):
            return TextDataset.open(out)
    train_text, val_text = split_text(text, val_fraction)
    meta_path.unlink(missing_ok=True)  # shards are rewritten below: no stale key may vouch for them meanwhile
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {"source": desc, **key, "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name}
    for split, part in (("train", train_text), ("val", val_text)):
        ids = np.asarray(tokenizer.encode(part) if part else [], dtype=dtype)
        meta[split] = {"tokens": int(len(ids)), "bytes": len(part.encode("utf-8")), "shards": _write_shards(ids, out, split)}
    if meta["train"]["tokens"] < 2:
        raise DataError(f"{desc}: too little text to train on ({meta['train']['tokens']} tokens)")
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return TextDataset.open(out)
