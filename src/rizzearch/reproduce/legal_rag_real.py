"""Study (real tier): Magesh et al. (2024) on all 210 queries with SmolLM2-135M-Instruct.

The same study as ``reproduce.legal_rag`` (closed-book, naive RAG and verified RAG around the real model through
our own Llama, greedy and batched; the claims as the paper states them, each with ``model=`` and 95% intervals;
the simulated generators only as a labelled ablation), at the real tier's sizes: every query of the bundled set
(``rizz reproduce --tier real``, <= 15 min on 2 quiet cores). Full mode adds the retrieval ablation. Tiny mode:
a random tiny llama with SmolLM2's tokenizer and a few queries per category, without the simulated ablation
(the quick tier's tiny test covers it): seconds.
"""

from __future__ import annotations

from rizzearch.reproduce.common import Modes
from rizzearch.reproduce.legal_rag import STUDY, Size, run_study

__all__ = ["MODES", "STUDY", "run"]

MODES = Modes(tiny=Size(queries_per_category=2, retrieval="bm25", n_boot=200, max_new_tokens=8, simulated_ablation=False),
              quick=Size(queries_per_category=None), full=Size(queries_per_category=None, retrieval_ablation=True),
              budget_s={"tiny": 120.0, "quick": 900.0, "full": 1500.0}, tier="real")


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """The real tier: every query of the set with the real model (``MODES``)."""
    return run_study(MODES, out_dir, full=full, tiny=tiny, device=device, seed=seed)
