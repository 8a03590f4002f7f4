"""The verified system's own support check (rag.support), and how reports name each system's generator."""

import pytest

from rizzearch.errors import ConfigError
from rizzearch.legal.citations import build_authorities
from rizzearch.legal.corpus import Passage
from rizzearch.legal.text import STOPWORDS, content_set, stem, words
from rizzearch.rag.generators import GenerationRequest
from rizzearch.rag.support import SupportCheck, claim_overlap
from rizzearch.rag.systems import EXTRACTIVE, SIMULATED_CLOSED_BOOK, VerifiedRAG, generator_label, make_system

P = Passage("x/1", "scotus", "Brown v. Board of Education, 347 U.S. 483 (1954)", "Brown v. Board of Education (1954)",
            "In Brown v. Board of Education, Justice Warren delivered the opinion of the Court on May 17, 1954.")


def test_overlap_is_plain_share_of_claim_words():
    assert claim_overlap({"warren", "deliver", "opinion"}, {"warren", "deliver", "court"}) == pytest.approx(2 / 3)
    assert claim_overlap(set(), {"warren"}) == 0.0
    assert claim_overlap({"warren", "1955"}, {"warren", "1954"}) == 0.0  # a wrong number sinks the claim


def test_support_check_on_one_passage():
    chk = SupportCheck()
    assert chk.score("Justice Warren delivered the opinion of the Court.", [P]) == 1.0
    assert chk.score("Justice Warren delivered the opinion in 1954.", [P]) == 1.0
    assert chk.score("Justice Warren delivered the opinion in 1955.", [P]) == 0.0
    assert chk.score("Justice Holmes wrote a famous dissent about wiretaps.", [P]) < 0.6
    assert chk.score("anything", []) == 0.0 and chk.score("", [P]) == 0.0
    assert chk.score("Warren delivered wiretaps.", [P]) == pytest.approx(2 / 3)
    assert SupportCheck(0.6).supports("Warren delivered wiretaps.", [P])
    assert not SupportCheck(0.7).supports("Warren delivered wiretaps.", [P])
    with pytest.raises(ConfigError, match="min_overlap"):
        SupportCheck(0.0)


def _distinct_words(p: Passage, other: Passage, n: int) -> list[str]:
    """``n`` words of ``p`` whose stems are in neither ``other`` nor the heading (so only ``p`` holds them)."""
    taken = content_set(other.text) | content_set(other.title) | content_set(p.title)
    out = []
    for w in words(p.text):
        if w not in STOPWORDS and not w.isdigit() and stem(w) not in taken and stem(w) not in {stem(x) for x in out}:
            out.append(w)
    assert len(out) >= n
    return out[:n]


def test_claim_pieced_from_two_passages_is_not_supported_unlike_the_audit_scorer(bm25_index):
    """The verifier needs one passage holding the claim; the audit's scorer pools every passage of the authority."""
    from rizzearch.audit.labels import support_score

    auth = build_authorities(bm25_index.passages)
    c0, c1 = auth.by_id["scotus/347us483/c01"], auth.by_id["scotus/347us483/c02"]
    claim = " ".join(_distinct_words(c0, c1, 3) + _distinct_words(c1, c0, 3)) + "."
    pids = [p.id for p in auth.by_doc["scotus/347us483"]]
    assert support_score(claim, pids, auth) >= 0.6  # the audit would call it supported
    assert SupportCheck().score(claim, [auth.by_id[p] for p in pids]) <= 0.5  # the verifier does not

    class Canned:
        name = "canned"

        def generate(self, request: GenerationRequest) -> str:
            return f"{claim[:-1]}. Brown v. Board of Education, 347 U.S. 483 (1954)."

    a = VerifiedRAG(bm25_index, Canned(), mode="bm25").answer("What did the Court say in Brown v. Board of Education?")
    assert a.status == "abstained" and "does not support" in a.text


def test_generator_labels(bm25_index):
    systems = {s: make_system(s, bm25_index, mode="bm25") for s in ("closed_book", "naive_rag", "verified_rag")}
    assert systems["closed_book"].generator_label == SIMULATED_CLOSED_BOOK
    assert SIMULATED_CLOSED_BOOK.startswith("simulated closed-book (MemoryGenerator")
    assert systems["naive_rag"].generator_label == systems["verified_rag"].generator_label == EXTRACTIVE
    assert EXTRACTIVE.startswith("extractive (ExtractiveGenerator")

    class Named:
        name = "endpoint:qwen"

    class Labelled(Named):
        label = "language model (Qwen2.5-7B-Instruct via vLLM)"

    assert generator_label(Named()) == "endpoint:qwen" and generator_label(Labelled()) == Labelled.label
