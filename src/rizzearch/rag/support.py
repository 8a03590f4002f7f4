"""The verified RAG system's own support check: does a cited passage back the sentence it is cited for?

The verified system (``rag.systems.VerifiedRAG``) abstains when a citation of its draft answer is not
supported by its source. It must not use the audit's scorer for this (``audit.labels.support_score``),
or the system would be graded by the very check it answers with, and its low hallucination rate would
hold by construction. This check is its own, simpler and different in kind:

* **one passage.** The claim must be found in a single cited passage (text and heading), as a careful
  researcher quotes one place, not pieced together from every passage of the cited opinion (the
  audit's scorer pools them all).
* **plain word overlap.** The share of the claim's distinct content tokens (``legal.text``:
  lower-cased, stop words dropped, lightly stemmed) found in that passage, every word counting the
  same (the audit's scorer weighs words by IDF).
* **numbers must match.** Every number the claim states (a year, an age, a count, a volume) must
  occur in that passage; a claim with a wrong number scores 0 against it, however many words agree.

The score of a claim is its best passage's overlap; the verifier accepts it at ``min_overlap`` (0.6)
or more. The threshold was set when this check was written, before it was run on the audit's query
set, and is not tuned on the audit's labels.
"""

from __future__ import annotations

from typing import Iterable

from rizzearch.errors import ConfigError
from rizzearch.legal.corpus import Passage
from rizzearch.legal.text import content_set


def claim_overlap(claim_tokens: set[str], passage_tokens: set[str]) -> float:
    """Share of ``claim_tokens`` in ``passage_tokens``; 0.0 if a number of the claim is missing or the claim is empty."""
    if not claim_tokens:
        return 0.0
    if any(t.isdigit() and t not in passage_tokens for t in claim_tokens):
        return 0.0
    return len(claim_tokens & passage_tokens) / len(claim_tokens)


class SupportCheck:
    """Scores a claim against the passages of a cited authority (see the module docstring).

    Passages are tokenised once per checker (by id), so one checker serves a whole audit run.

    Args:
        min_overlap: least overlap (share of the claim's distinct content words, numbers all present)
            with one cited passage for the claim to count as supported.
    """

    def __init__(self, min_overlap: float = 0.6):
        if not 0.0 < min_overlap <= 1.0:
            raise ConfigError(f"support check: min_overlap must be in (0, 1], got {min_overlap}")
        self.min_overlap = min_overlap
        self._tokens: dict[str, tuple[tuple[str, str], set[str]]] = {}

    def _passage_tokens(self, p: Passage) -> set[str]:
        got = self._tokens.get(p.id)
        if got is None or got[0] != (p.text, p.title):
            got = self._tokens[p.id] = ((p.text, p.title), content_set(p.text) | content_set(p.title))
        return got[1]

    def score(self, claim: str, passages: Iterable[Passage]) -> float:
        """Best overlap of ``claim`` with any one of ``passages`` (0.0 when there are none)."""
        toks = content_set(claim)
        return max((claim_overlap(toks, self._passage_tokens(p)) for p in passages), default=0.0)

    def supports(self, claim: str, passages: Iterable[Passage]) -> bool:
        """Whether some passage of ``passages`` supports ``claim``."""
        return self.score(claim, passages) >= self.min_overlap
