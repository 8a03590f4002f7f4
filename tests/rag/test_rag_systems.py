import pytest

from rizzearch.errors import DataError
from rizzearch.rag.generators import GenerationRequest
from rizzearch.rag.systems import (
    ClosedBook,
    EntityFinder,
    NaiveRAG,
    VerifiedRAG,
    is_legal_question,
    make_system,
)


class Canned:
    """A generator that always says the same thing (to test the verifier)."""

    def __init__(self, text):
        self.text, self.name = text, "canned"
        self.requests = []

    def generate(self, request: GenerationRequest) -> str:
        self.requests.append(request)
        return self.text


def test_entities(bm25_index):
    f = EntityFinder(bm25_index.passages)
    ents = {(e.kind, e.key) for e in f.find("Why did Justice Black dissent in Brown v. Board of Education under the Fourteenth Amendment?")}
    assert ("case", "scotus/347us483") in ents and ("justice", "black") in ents and ("amendment", "14") in ents
    fake = f.find("What did the Court hold in Harrington v. Vermont Board of Fisheries?")
    assert [e.kind for e in fake] == ["unknown_case"]
    assert is_legal_question("What is the best pizza recipe?", []) is False
    assert is_legal_question("When is evidence hearsay?", []) is True
    naive = make_system("naive_rag", bm25_index, mode="bm25")
    assert naive.answer("What are the requirements for a dying declaration?").status == "answered"
    assert naive.answer("Which recipe makes the crispiest pizza crust?").status == "non_legal"


def test_united_states_does_not_identify_a_case(bm25_index):
    # "Korematsu v. United States" is named by "Korematsu": the stop words are compared stemmed ("unit", "stat")
    f = EntityFinder(bm25_index.passages)
    assert ("case", "scotus/323us214") in {(e.kind, e.key) for e in f.find("What did the Court hold in the Korematsu case?")}


def test_naive_and_closed_book(bm25_index):
    naive = make_system("naive_rag", bm25_index, mode="bm25")
    a = naive.answer("Which Justice delivered the opinion of the Court in Miranda v. Arizona?")
    assert a.status == "answered" and "Warren" in a.text and "384 U.S. 436" in a.text
    assert len(a.passages) == 4 and a.passages[0]["id"].startswith("scotus/384us436")
    assert a.prompt[0]["role"] == "system" and "[scotus/384us436" in a.prompt[1]["content"]
    cb = make_system("closed_book", bm25_index, seed=0)
    assert isinstance(cb, ClosedBook) and cb.answer("What is the minimum age to be a Senator?").passages == []
    with pytest.raises(DataError, match="non-empty"):
        naive.answer("  ")
    assert naive.answer("What is the best pizza recipe?").status == "non_legal"


def test_verified_abstains_on_unknown_entities(bm25_index):
    v = make_system("verified_rag", bm25_index, mode="bm25")
    for q in ("Summarize Justice Eleanor Whitcombe's dissent in Miranda v. Arizona.",
              "What did the Supreme Court hold in Harrington v. Vermont Board of Fisheries (1973)?"):
        a = v.answer(q)
        assert a.status == "abstained" and a.text.startswith("I cannot answer")
    ok = v.answer("Which Justice delivered the opinion of the Court in Miranda v. Arizona?")
    assert ok.status == "answered" and "Warren" in ok.text and ok.checks["support"][0] >= 0.6


def test_verifier_checks_existence_and_support(bm25_index):
    q = "Which Justice delivered the opinion of the Court in Miranda v. Arizona?"
    fabricated = Canned("Justice Warren delivered the opinion of the Court. Miranda v. Arizona, 384 U.S. 999 (1966).")
    a = VerifiedRAG(bm25_index, fabricated, mode="bm25").answer(q)
    assert a.status == "abstained" and "does not exist" in a.text and a.checks["failed_citation"] == "384 U.S. 999"
    assert "384 U.S. 999" not in a.text  # the abstention does not repeat the bad citation
    unsupported = Canned("Justice Holmes wrote a famous dissent about wiretaps. Miranda v. Arizona, 384 U.S. 436 (1966).")
    a = VerifiedRAG(bm25_index, unsupported, mode="bm25").answer(q)
    assert a.status == "abstained" and "does not support" in a.text
    uncited = Canned("Justice Warren delivered the opinion of the Court.")
    assert VerifiedRAG(bm25_index, uncited, mode="bm25").answer(q).status == "abstained"
    good = Canned("In Miranda v. Arizona, Justice Warren delivered the opinion of the Court. Miranda v. Arizona, 384 U.S. 436 (1966).")
    a = VerifiedRAG(bm25_index, good, mode="bm25").answer(q)
    assert a.status == "answered" and a.text == good.text
    # the same draft passes through naive RAG untouched, even when fabricated
    assert NaiveRAG(bm25_index, fabricated, mode="bm25").answer(q).text == fabricated.text


def test_make_system_errors(bm25_index):
    with pytest.raises(DataError, match="unknown system"):
        make_system("oracle", bm25_index)
    with pytest.raises(DataError, match="unknown generator"):
        make_system("naive_rag", bm25_index, "gpt-7")


def test_hybrid_answers_use_dense_ranks(dense_index):
    a = make_system("naive_rag", dense_index).answer("Can police interrogate a suspect in custody without warning him of his rights?")
    assert a.status == "answered" and any(p["dense_rank"] is not None for p in a.passages)
