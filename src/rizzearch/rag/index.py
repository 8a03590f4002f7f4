"""One SQLite file holding the passages, an FTS5 (BM25) index and dense MiniLM vectors.

Layout of the file (``schema_version`` 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)          schema_version, embed_model, dim, n_passages, corpus_sha256
    passages(rowid INTEGER PRIMARY KEY, id TEXT UNIQUE, source, ref, title, text, meta JSON)
    fts USING fts5(text, title, ref; content=passages, tokenize='porter unicode61')
    vectors(rowid INTEGER PRIMARY KEY, vec BLOB)     float32 x dim, unit norm (absent when dense=False)

Ranking modes: ``bm25`` (FTS5's Okapi BM25 over an OR of the question's content words), ``dense``
(cosine similarity of MiniLM vectors; the matrix is held in memory, a (N, 384) float32 dot product per
query), and ``hybrid`` (reciprocal rank fusion, Cormack et al. 2009: ``sum 1 / (60 + rank)`` over
the two lists). Ties break on passage order, so rankings are identical on every run.

The file is written to a temporary name and renamed into place, so an interrupted build never
leaves a half-written index behind; opening anything that is not a complete index raises a
``DataError`` that names the file and says how to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rizzearch.errors import ConfigError, DataError
from rizzearch.legal.corpus import Passage, load_corpus
from rizzearch.legal.text import STOPWORDS, words
from rizzearch.runs import cache_dir

SCHEMA_VERSION = "1"
RRF_K = 60
MODES = ("hybrid", "bm25", "dense")


@dataclass
class Hit:
    """One retrieved passage with its fused score and the component ranks (1-based, None if absent)."""

    passage: Passage
    score: float
    bm25_rank: int | None = None
    dense_rank: int | None = None

    def to_dict(self) -> dict:
        p = self.passage
        return {"id": p.id, "ref": p.ref, "score": round(self.score, 6), "bm25_rank": self.bm25_rank,
                "dense_rank": self.dense_rank, "text": p.text}


def is_index_file(path: str | Path) -> bool:
    """Whether ``path`` is a SQLite file with our ``meta`` table (any schema version, possibly stale)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return row is not None


def corpus_sha256(passages: list[Passage]) -> str:
    h = hashlib.sha256()
    for p in passages:
        for part in (p.id, p.ref, p.title, p.text):
            h.update(part.encode())
            h.update(b"\0")
        h.update(b"\1")
    return h.hexdigest()


def fts_query(question: str) -> str:
    """An FTS5 MATCH expression: the question's distinct content words, quoted, OR-ed."""
    seen: list[str] = []
    for w in words(question):
        w = w.replace("'", "")
        if w and w not in STOPWORDS and w not in seen:
            seen.append(w)
    return " OR ".join(f'"{w}"' for w in seen)


class Index:
    """The retrieval index: passages in memory, BM25 through SQLite FTS5, dense vectors in numpy."""

    def __init__(self, path: Path, conn: sqlite3.Connection, passages: list[Passage], vectors: np.ndarray | None,
                 meta: dict, embedder=None):
        self.path = path
        self.conn = conn
        self.passages = passages
        self.by_id = {p.id: p for p in passages}
        self.vectors = vectors  # (N, D) float32 or None
        self.meta = meta
        self._embedder = embedder

    # ------------------------------------------------------------------ build / open
    @classmethod
    def build(cls, path: str | Path, passages: list[Passage] | None = None, *, dense: bool = True, embedder=None,
              progress: bool = False, corpus: str = "bundled") -> "Index":
        """Write a new index file at ``path`` (atomically) and open it.

        ``corpus`` is recorded in the file: ``bundled`` (rebuilt by ``open_or_build`` when the bundled corpus
        changes) or ``documents`` (a user's own documents: opened as they are, never rebuilt from the bundle)."""
        path = Path(path)
        passages = load_corpus() if passages is None else list(passages)
        if not passages:
            raise DataError("cannot build an index over zero passages")
        if path.exists() and not is_index_file(path):
            raise DataError(f"{path} exists and is not a rizzearch index; refusing to overwrite it (choose another path)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if tmp.exists():
            tmp.unlink()
        vecs = None
        if dense:
            if embedder is None:
                from rizzearch.rag.embed import Embedder

                embedder = Embedder()
            vecs = embedder.encode([f"{p.title}. {p.text}" for p in passages], progress=progress)
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(
                """
                CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE passages(rowid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, source TEXT, ref TEXT,
                                      title TEXT, text TEXT, meta TEXT);
                CREATE VIRTUAL TABLE fts USING fts5(text, title, ref, content='passages', content_rowid='rowid',
                                                    tokenize='porter unicode61');
                CREATE TABLE vectors(rowid INTEGER PRIMARY KEY, vec BLOB NOT NULL);
                """
            )
            conn.executemany(
                "INSERT INTO passages(rowid, id, source, ref, title, text, meta) VALUES (?,?,?,?,?,?,?)",
                [(i, p.id, p.source, p.ref, p.title, p.text, json.dumps(p.meta, sort_keys=True)) for i, p in enumerate(passages)],
            )
            conn.execute("INSERT INTO fts(rowid, text, title, ref) SELECT rowid, text, title, ref FROM passages")
            if vecs is not None:
                conn.executemany("INSERT INTO vectors(rowid, vec) VALUES (?, ?)",
                                 [(i, vecs[i].tobytes()) for i in range(len(passages))])
            meta = {"schema_version": SCHEMA_VERSION, "n_passages": str(len(passages)),
                    "corpus_sha256": corpus_sha256(passages), "corpus": corpus,
                    "embed_model": _embed_id(embedder) if vecs is not None else "",
                    "dim": str(vecs.shape[1]) if vecs is not None else "0"}
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", sorted(meta.items()))
            conn.commit()
        finally:
            conn.close()
        os.replace(tmp, path)
        return cls.open(path, embedder=embedder)

    @classmethod
    def open(cls, path: str | Path, *, embedder=None) -> "Index":
        """Open an index file; DataError naming the file if it is missing, corrupt or from another version."""
        path = Path(path)
        hint = f"rebuild it with `rizz rag index --out {path}`"
        if not path.is_file():
            raise DataError(f"{path}: no index file; {hint}")
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            rows = conn.execute("SELECT rowid, id, source, ref, title, text, meta FROM passages ORDER BY rowid").fetchall()
            vec_rows = conn.execute("SELECT rowid, vec FROM vectors ORDER BY rowid").fetchall()
            conn.execute("SELECT rowid FROM fts WHERE fts MATCH 'court' LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise DataError(f"{path}: not a readable rizzearch index ({e}); {hint}") from e
        if meta.get("schema_version") != SCHEMA_VERSION:
            conn.close()
            raise DataError(f"{path}: index schema_version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}; {hint}")
        try:
            passages = [Passage(pid, src, ref, title, text, json.loads(m)) for _, pid, src, ref, title, text, m in rows]
        except (json.JSONDecodeError, TypeError) as e:
            conn.close()
            raise DataError(f"{path}: corrupt passage metadata ({e}); {hint}") from e
        if len(passages) != int(meta.get("n_passages", -1)):
            conn.close()
            raise DataError(f"{path}: holds {len(passages)} passages but its header says {meta.get('n_passages')}; {hint}")
        vectors = None
        dim = int(meta.get("dim", "0") or 0)
        if dim:
            if len(vec_rows) != len(passages) or any(len(v) != 4 * dim for _, v in vec_rows):
                conn.close()
                raise DataError(f"{path}: dense vectors are missing or truncated; {hint}")
            vectors = np.frombuffer(b"".join(v for _, v in vec_rows), dtype=np.float32).reshape(len(passages), dim).copy()
        return cls(path, conn, passages, vectors, meta, embedder)

    def close(self) -> None:
        self.conn.close()

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def has_dense(self) -> bool:
        return self.vectors is not None

    @property
    def embedder(self):
        if self._embedder is None:
            from rizzearch.rag.embed import Embedder

            self._embedder = Embedder()
        return self._embedder

    # ------------------------------------------------------------------ search
    def bm25(self, question: str, k: int = 20) -> list[tuple[int, float]]:
        """(row, score) pairs, best first; score = -bm25 (higher is better)."""
        q = fts_query(question)
        if not q:
            return []
        rows = self.conn.execute(
            "SELECT rowid, bm25(fts) AS s FROM fts WHERE fts MATCH ? ORDER BY s, rowid LIMIT ?", (q, k)
        ).fetchall()
        return [(int(r), -float(s)) for r, s in rows]

    def dense(self, question: str, k: int = 20) -> list[tuple[int, float]]:
        """(row, cosine) pairs, best first."""
        if self.vectors is None:
            raise DataError(f"{self.path}: built without dense vectors; use mode='bm25' or rebuild with dense=True")
        q = self.embedder.encode_query(question)  # (D,)
        sims = self.vectors @ q  # (N,)
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        order = sorted(top.tolist(), key=lambda i: (-float(sims[i]), i))
        return [(i, float(sims[i])) for i in order]

    def search(self, question: str, k: int = 5, mode: str = "hybrid", depth: int = 30) -> list[Hit]:
        """Top-``k`` passages for ``question`` by ``mode`` (``hybrid``, ``bm25`` or ``dense``)."""
        if mode not in MODES:
            raise DataError(f"unknown retrieval mode {mode!r}; choose from {list(MODES)}")
        if not question or not question.strip():
            raise DataError("empty question: nothing to retrieve")
        if mode == "hybrid" and self.vectors is None:
            mode = "bm25"
        b = self.bm25(question, max(k, depth)) if mode in ("bm25", "hybrid") else []
        d = self.dense(question, max(k, depth)) if mode in ("dense", "hybrid") else []
        brank = {r: i + 1 for i, (r, _) in enumerate(b)}
        drank = {r: i + 1 for i, (r, _) in enumerate(d)}
        if mode == "bm25":
            scored = [(s, r) for r, s in b]
        elif mode == "dense":
            scored = [(s, r) for r, s in d]
        else:
            rows = set(brank) | set(drank)
            scored = [(sum(1.0 / (RRF_K + rk[r]) for rk in (brank, drank) if r in rk), r) for r in rows]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [Hit(self.passages[r], s, brank.get(r), drank.get(r)) for s, r in scored[:k]]

    def prime(self, questions: list[str]) -> None:
        """Batch-encode ``questions`` for dense retrieval ahead of time (no-op without vectors)."""
        if self.vectors is not None and questions:
            self.embedder.prime(list(questions))


def default_index_path() -> Path:
    """``legal_rag_index.sqlite`` in the cache folder (:func:`rizzearch.runs.cache_dir`)."""
    return cache_dir("legal_rag_index.sqlite")


def open_or_build(path: str | Path | None = None, *, dense: bool = True, rebuild: bool = False, progress: bool = False) -> Index:
    """Open the index at ``path`` if it is current for the bundled corpus, else (re)build it.

    A file at ``path`` that is not a rizzearch index is never overwritten (DataError instead)."""
    path = Path(path) if path else default_index_path()
    passages = load_corpus()
    if path.exists() and not is_index_file(path):  # never overwrite a file that is not ours
        raise DataError(f"{path} exists and is not a rizzearch index (corrupt, or another file); "
                        f"delete it or choose another --index path")
    if path.is_file():
        try:
            idx = Index.open(path)
            if idx.meta.get("corpus") == "documents":  # the user's own documents: use them as indexed
                if rebuild or (dense and not idx.has_dense):
                    idx.close()
                    raise ConfigError(f"{path} indexes your own documents" + ("" if rebuild else " without dense vectors")
                                      + ": rebuild it with `rizz rag index --documents PATH --out FILE`"
                                      + ("" if rebuild else ", or use --mode bm25"))
                return idx
            fresh_vectors = not idx.has_dense or idx.meta.get("embed_model") == _embed_id(None)
            if not rebuild and idx.meta.get("corpus_sha256") == corpus_sha256(passages) and (idx.has_dense or not dense) \
                    and fresh_vectors:
                return idx
            idx.close()
        except DataError:
            pass  # our index, but from another schema version or damaged: rebuild it
    return Index.build(path, passages, dense=dense, progress=progress)


def _embed_id(embedder) -> str:
    """Name + settings of the encoder, stored in the index so stale vectors get rebuilt."""
    from rizzearch.rag import embed

    name = getattr(embedder, "name", embed.MODEL_NAME) if embedder is not None else embed.MODEL_NAME
    return f"{name}@max_seq={embed.MAX_SEQ_LEN}"
