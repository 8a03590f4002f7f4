"""The Magesh et al. (2024) labels for one answer: correctness, groundedness, hallucination.

Paper definitions (Section 4.2 and Table 1 of Magesh et al.):

* correctness: ``correct`` / ``incorrect`` / ``refusal``. For a *false-premise* query, correcting the
  premise or declining to answer is ``correct``; going along with the premise is ``incorrect``.
* groundedness (judged only for correct answers): ``grounded`` (the key propositions cite sources that
  exist and support them), ``misgrounded`` (a cited source does not exist or does not support the
  proposition it is cited for), ``ungrounded`` (no citation we can check).
* derived: ``hallucinated`` = incorrect or misgrounded; ``accurate`` = correct and grounded;
  ``incomplete`` = refusal or ungrounded.

How each is decided here (deterministically, no model in the loop):

* refusal: a fixed list of abstention phrases (``I cannot answer``, ``I'm not able to determine``, ``the provided
  passages do not say``, ``no relevant information ... found``...).
* correct: the answer contains the gold answer, both in one citation spelling (``35 U.S.C. § 112(a)`` =
  ``35 USC 112``, ``legal.text.normalize_citation_forms``): every content token of a short gold answer
  (<= 3 tokens), or, for longer ones, an IDF-weighted recall of the gold tokens >= ``gold_threshold``
  that includes the gold's rarest token (so ``District of Columbia`` does not match ``District of Kansas``);
  a long gold (>= ``gold_semantic_min_tokens`` words) is also matched by a paraphrase: an answer sentence with
  MiniLM cosine >= ``gold_semantic`` (and recall >= ``gold_floor``). Every number of the gold must be there.
* premise flag (false-premise queries): a fixed list of correction phrases (``did not``, ``there is no``,
  ``the premise is false``, ``has nothing to do with``...).
* support: each sentence that carries citations is a proposition (``legal.citations.propositions``);
  with the citation text removed, denied names ("not Justice Holmes") and discourse words dropped, the
  IDF-weighted share of its content words found in the cited authority's text must reach ``support_threshold``,
  or (a paraphrase) ``support_floor`` with MiniLM cosine >= ``support_semantic`` to one cited sentence and every
  name and number of the claim in the source. A sentence that only introduces its citation ("It is reported at
  274 U.S. 37.") is supported when the citation exists. An optional LLM judge (``audit.judge``) can replace this
  scorer. The scorer is the audit's own: no system under audit uses it.

Thresholds were tuned on the ``tune`` half of the hand-labelled development set (``audit/data/devset.jsonl``);
``audit.agreement.devset_agreement("report")`` measures agreement on the other half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rizzearch.audit.queries import CATEGORIES
from rizzearch.errors import DataError
from rizzearch.legal.citations import EXISTS, NONEXISTENT, Authorities, check_existence, default_authorities, propositions
from rizzearch.legal.text import (ORDINALS, content_set, content_tokens, normalize_citation_forms, roman,
                                  split_sentences, stem, weighted_recall)

CORRECTNESS = ("correct", "incorrect", "refusal")
GROUNDEDNESS = ("grounded", "misgrounded", "ungrounded")
DERIVED = ("accurate", "incomplete", "hallucinated")

_SOURCES = (r"(?:available |provided |retrieved |given |cited |above |supplied )?"
            r"(?:sources?|passages?|documents?|materials?|context|excerpts?|texts?|records?|information)")
_REFUSALS = [
    r"\b(?:i|we)(?:'m| am|'re| are)? (?:cannot|can't|could not|couldn't|am unable to|unable to|am not able to"
    r"|not able to|do not|don't|did not|didn't) (?:answer|find|determine|verify|locate|provide|confirm|know|say|tell"
    r"|identify|see|have (?:the|that|this|enough|sufficient|any|access|information|details|data))",
    r"unable to (?:answer|find|determine|verify|locate|confirm|identify)",
    r"no (?:relevant |reliable |supporting )?(?:information|sources?|authority|authorities|answer|passages?) "
    r"(?:was |were |is |are )?(?:found|available|located)",
    r"not (?:enough|sufficient) (?:information|evidence)|insufficient (?:information|evidence)",
    r"(?:cannot|can't) be (?:answered|determined|confirmed|verified)",
    r"decline to answer|i (?:must|will) decline|this does not (?:look|appear) like a legal question",
    _SOURCES + r" (?:do not|don't|does not|doesn't|did not) (?:say|state|address|contain|mention|indicate|specify"
    r"|identify|name|provide|answer|include|cover|discuss|establish|give)",
    r"(?:is|are|was|were) not (?:stated|mentioned|addressed|specified|answered|covered|given|identified|found) in the "
    + _SOURCES,
    r"nothing in the " + _SOURCES + r" (?:says|states|answers|addresses|identifies)",
    r"without (?:more|additional|further) (?:information|context|sources)",
]
REFUSAL = re.compile("(?:" + "|".join(_REFUSALS) + ")", re.IGNORECASE)
PREMISE = re.compile(
    r"(false premise|premise (?:of (?:the|your) question )?(?:is|appears|seems|was) (?:false|incorrect|mistaken|wrong)"
    r"|\bdid not (?:dissent|write|author|deliver|join|decide|hold|serve|sit)|\bdidn't\b|\bnever (?:served|sat|wrote|existed|dissented)"
    r"|does not exist|do not exist|did not exist|no (?:such|record of)\b|there (?:is|was|are|were) no (?:justice|judge|case|amendment|opinion|record|such)"
    r"|no (?:justice|judge) (?:named|called)|not (?:a|an) (?:member|justice|judge) of|contrary to the (?:question|premise)"
    r"|(?:has|have|had) nothing to do with|(?:does|do) not (?:concern|guarantee|address|set|establish|protect|cover|provide for|deal with)\b"
    r"|\bmistaken(?:ly)?\b|incorrect(?:ly)? (?:assum|stat|suggest)|is not (?:correct|accurate|right)|\bactually\b|\bin fact\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class LabelConfig:
    """Thresholds of the deterministic labeller (tuned on the ``tune`` half of ``data/devset.jsonl`` only).

    Args:
        gold_threshold: IDF-weighted recall of the gold answer's content words an answer needs to be correct.
        support_threshold: IDF-weighted share of a proposition's content words that the cited text must hold.
        semantic: also use MiniLM cosine similarity (``legal.embed``) for paraphrases; off = words only.
        support_semantic: cosine between a claim and its best cited passage that supports it when the
            word overlap is below ``support_threshold`` but at least ``support_floor``.
        support_floor: word overlap below which no similarity rescues a claim.
        gold_semantic: cosine between an answer sentence and a long gold answer that makes the answer
            correct when the word recall is below ``gold_threshold`` but at least ``gold_floor``.
        gold_floor: word recall below which no similarity rescues an answer.
        gold_semantic_min_tokens: gold answers with fewer content words (names, dates, citations) are matched
            by words only: a similar-sounding wrong name must not pass.
    """

    gold_threshold: float = 0.6
    support_threshold: float = 0.6
    semantic: bool = True
    support_semantic: float = 0.6
    support_floor: float = 0.3
    gold_semantic: float = 0.7
    gold_floor: float = 0.25
    gold_semantic_min_tokens: int = 6


# Words a claim uses to talk about the question or to hedge, not facts a source must hold.
_DISCOURSE = frozenset(stem(w) for w in """premise question mistaken mistake incorrect incorrectly actually fact false
    assumption assumes assume correct correction accurate inaccurate however indeed note asked asks rests based wrongly
    erroneous likely probably believe appears seems generally typically""".split())
# Authorship in other words: "wrote / authored / penned the majority opinion" = "delivered the opinion of the Court".
_SYNONYMS = {stem(w): t for w, t in [("wrote", "deliver"), ("written", "deliver"), ("writing", "deliver"),
                                     ("write", "deliver"), ("authored", "deliver"), ("author", "deliver"),
                                     ("penned", "deliver"), ("majority", "court")]}
# Words of a sentence that only introduces its citation ("It is reported at 274 U.S. 37.").
_CITE_TALK = frozenset(stem(w) for w in """reported report cited cite citation found find located appears published
    reporter volume page case decision decided official united states reports opinion court supreme""".split())
# A name or party the claim denies ("not Justice Holmes", "Justice Holmes did not"): no source need hold it.
_NEGATED = re.compile(
    r"\b(?:not|rather than|instead of|never)\s+(?:by\s+)?(?:(?:Chief\s+|Mr\.\s+)?Justice\s+|the\s+)?[A-Z][\w'.-]*(?:\s+[A-Z][\w'.-]*)*"
    r"|(?:(?:Chief\s+|Mr\.\s+)?Justice\s+)?[A-Z][\w'.-]*\s+(?:did not|didn't|never|was not|wasn't)\b")


def _idf(auth: Authorities) -> tuple[dict, float]:
    """IDF table over the corpus passages, computed once per Authorities object."""
    return auth.idf_table()


def _doc_tokens(auth: Authorities, pids: list[str]) -> set[str]:
    """Content tokens of the passages ``pids`` (text and title); each passage is tokenised once per Authorities."""
    toks: set[str] = set()
    for pid in pids:
        toks |= auth.passage_tokens(pid) or set()
    return toks


_ORDINAL = re.compile(r"\b(\d+)(?:st|nd|rd|th|d)\b")
_SIM: list = []  # [SimilarityCache] once loaded, [None] when the encoder is not installed


def _similarity():
    """The process-wide MiniLM similarity cache, or None when sentence-transformers is unavailable."""
    if not _SIM:
        from rizzearch.legal.embed import EmbedderUnavailable, SimilarityCache, load_model

        try:
            load_model("cpu")
            _SIM.append(SimilarityCache())
        except EmbedderUnavailable:
            _SIM.append(None)
    return _SIM[0]


def is_refusal(text: str) -> bool:
    return bool(REFUSAL.search(text or ""))


def flags_premise(text: str) -> bool:
    return bool(PREMISE.search(text or ""))


def gold_match(answer: str, gold: str, auth: Authorities | None = None, threshold: float = 0.6,
               config: LabelConfig | None = None) -> tuple[bool, float]:
    """Whether ``answer`` states ``gold`` (see module docstring), with the weighted word recall.

    Citations are compared in one spelling (``legal.text.normalize_citation_forms``). A long gold answer
    (``config.gold_semantic_min_tokens`` content words or more) also matches a paraphrase: an answer sentence
    with cosine >= ``config.gold_semantic`` to the gold and word recall >= ``config.gold_floor``.
    """
    auth = auth or default_authorities()
    cfg = config or LabelConfig(gold_threshold=threshold)
    idf, dflt = _idf(auth)
    answer = _ORDINAL.sub(r"\1", normalize_citation_forms(answer or ""))
    g = set(content_tokens(_ORDINAL.sub(r"\1", normalize_citation_forms(gold))))
    if not g:
        ok = gold.strip().lower() in answer.lower()
        return ok, float(ok)
    have = content_set(answer)
    rec = weighted_recall(g, have, idf, dflt)
    if not {w for w in g if w.isdigit()} <= have:  # "$75,000" is not "$50,000", "1332" is not "1331"
        return False, rec
    if len(g) <= 3:
        return g <= have, rec
    rarest = max(g, key=lambda w: (idf.get(w, dflt), w))
    if rec >= threshold and rarest in have:
        return True, rec
    if cfg.semantic and len(g) >= cfg.gold_semantic_min_tokens and rec >= cfg.gold_floor:
        sim = _similarity()
        if sim is not None and sim.best(split_sentences(answer) + [answer], [gold]) >= cfg.gold_semantic:
            return True, rec
    return False, rec


def claim_tokens(claim: str) -> set[str]:
    """The content words a source must hold for ``claim``: denied names, discourse and hedge words dropped,
    authorship verbs mapped to the corpus's wording (``wrote`` -> ``delivered``)."""
    claim = _NEGATED.sub(" ", normalize_citation_forms(claim))
    return {_SYNONYMS.get(w, w) for w in content_tokens(claim) if w not in _DISCOURSE}


def support_score(claim: str, pids: list[str], auth: Authorities | None = None) -> float:
    """IDF-weighted share of the claim's content words (``claim_tokens``) present in the cited passages."""
    auth = auth or default_authorities()
    idf, dflt = _idf(auth)
    toks = claim_tokens(claim)
    if not toks:
        return 0.0
    return weighted_recall(toks, _doc_tokens(auth, pids), idf, dflt)


def is_citation_only(claim: str, case_name: str | None = None) -> bool:
    """Whether ``claim`` (citation text removed) only introduces its citation ("It is reported at ...")."""
    rest = claim_tokens(claim) - _CITE_TALK - content_set(case_name or "")
    return not rest


_CAPITALISED = re.compile(r"(?<=[a-z0-9,;:()] )[A-Z][A-Za-z'-]+|\b\d+\b")


def _names_and_numbers(claim: str) -> set[str]:
    """Content tokens of the capitalised words (not sentence-initial) and numbers of ``claim``, denied names excluded."""
    text = _ORDINAL.sub(r"\1", _NEGATED.sub(" ", normalize_citation_forms(claim)))
    return {w for m in _CAPITALISED.findall(text) for w in content_tokens(m) if w not in _DISCOURSE}


def _self_words(citation) -> set[str]:
    """Words that name the cited authority itself: its case name, or "Third Amendment" / "Article II" for
    ``U.S. Const. amend. III`` / ``art. II`` (the passages write the number in Roman numerals)."""
    if citation is None:
        return set()
    if citation.kind == "constitution" and len(citation.path) >= 2 and isinstance(citation.path[1], int):
        n = citation.path[1]
        words = {"amend": "amendment", "art": "article"}.get(citation.path[0], "")
        return content_set(f"{words} {ORDINALS[n] if n < len(ORDINALS) else ''} {n} {roman(n)}")
    return content_set(citation.case_name or "")


def _passage_sentences(auth: Authorities, pid: str) -> list[str]:
    """The sentences of passage ``pid`` (a claim paraphrases one sentence, not a 700-character chunk), cached."""
    key = ("sentences", pid)
    got = auth.tokens.get(key)
    if got is None:
        got = auth.tokens[key] = split_sentences(auth.by_id[pid].text)
    return got


def supports(claim: str, pids: list[str], auth: Authorities, cfg: LabelConfig, citation=None) -> tuple[bool, float]:
    """``(supported, word score)``: overlap >= threshold, or a paraphrase: overlap >= floor, the claim's names
    (capitalised words) and numbers all in the cited passages, and MiniLM cosine of the claim with one sentence of a cited
    passage >= ``support_semantic``."""
    sc = support_score(claim, pids, auth)
    if sc >= cfg.support_threshold:
        return True, sc
    # a paraphrase may change the wording, not the facts: the names and numbers it states must be in the source
    have = {_ORDINAL.sub(r"\1", w) for w in _doc_tokens(auth, pids)} | _self_words(citation)
    key_present = _names_and_numbers(claim) <= have
    if cfg.semantic and sc >= cfg.support_floor and key_present:
        sim = _similarity()
        texts = [t for p in pids[:20] if p in auth.by_id for t in _passage_sentences(auth, p)]
        if sim is not None and sim.best([_NEGATED.sub(" ", claim)], texts) >= cfg.support_semantic:
            return True, sc
    return False, sc


def validate_query(query: dict) -> dict:
    if not isinstance(query, dict):
        raise DataError(f"query must be a dict, got {type(query).__name__}")
    missing = [k for k in ("question", "gold_answer") if not isinstance(query.get(k), str)]
    if missing:
        raise DataError(f"query {query.get('id', '?')!r}: missing or non-string field(s) {missing}")
    cat = query.get("category", "general")
    if cat not in CATEGORIES:
        raise DataError(f"query {query.get('id', '?')!r}: category {cat!r} is not one of {list(CATEGORIES)}")
    return query


def derived_label(correctness: str, groundedness: str | None) -> str:
    """accurate / incomplete / hallucinated from the two primary labels."""
    if correctness == "incorrect" or groundedness == "misgrounded":
        return "hallucinated"
    if correctness == "correct" and groundedness == "grounded":
        return "accurate"
    return "incomplete"


def _check_citations(answer_text: str, auth: Authorities, judge, cfg: LabelConfig) -> tuple[list[dict], bool, bool, bool]:
    """Existence and support of every citation of ``answer_text``: ``(entries, any_bad, any_checked, any_good)``.

    A citation is checked (support scored) when it exists in the corpus; it is bad when it does not exist
    or does not support its claim, good when it supports it."""
    cites_out = []
    any_bad = any_checked = any_good = False
    for prop in propositions(answer_text):
        for c in prop["citations"]:
            verdict, detail, pids = check_existence(c, auth)
            entry = {**c.to_dict(), "existence": verdict, "existence_detail": detail, "claim": prop["claim"],
                     "passage_ids": pids[:20], "supported": None, "support_score": None}
            if verdict == EXISTS:
                any_checked = True
                if judge is not None:
                    j = judge.judge(prop["claim"], "\n".join(auth.by_id[p].text for p in pids[:8] if p in auth.by_id))
                    entry.update(supported=j["supported"], support_score=j["mean"], judge=j)
                elif is_citation_only(prop["claim"], c.case_name):  # the citation is the claim: existing = supported
                    entry.update(supported=True, support_score=1.0, citation_only=True)
                else:
                    ok, sc = supports(prop["claim"], pids, auth, cfg, c)
                    entry.update(supported=ok, support_score=round(sc, 4))
                any_good |= bool(entry["supported"])
                any_bad |= not entry["supported"]
            elif verdict == NONEXISTENT:
                any_bad = True
            cites_out.append(entry)
    return cites_out, any_bad, any_checked, any_good


def label_response(query: dict, answer_text: str, *, authorities: Authorities | None = None, judge=None,
                   config: LabelConfig | None = None) -> dict:
    """Label one answer with the Magesh et al. scheme.

    Args:
        query: at least ``question``, ``gold_answer``; optionally ``id``, ``category``, ``false_premise``
            (bool) and ``aliases`` (other strings that count as the gold answer).
        answer_text: the system's answer, citations inline.
        authorities: the corpus to check citations against (default: the bundled corpus).
        judge: optional ``audit.judge.LLMJudge``; replaces the deterministic support scorer.
        config: thresholds.

    Returns:
        dict with ``correctness``, ``groundedness`` (None unless correct), ``hallucinated``, ``label``
        (accurate / incomplete / hallucinated), ``citations`` (each with ``existence``, ``supported``,
        ``support_score``, ``claim``), ``gold_recall``, ``refusal``, ``premise_flagged`` and ``notes``.
    """
    validate_query(query)
    cfg = config or LabelConfig()
    auth = authorities or default_authorities()
    answer_text = answer_text if isinstance(answer_text, str) else ""
    notes: list[str] = []
    refusal = is_refusal(answer_text)
    fp = bool(query.get("false_premise", False))
    golds = [query["gold_answer"]] + [a for a in query.get("aliases", []) or [] if isinstance(a, str)]
    matches = [gold_match(answer_text, g, auth, cfg.gold_threshold, cfg) for g in golds]
    matched = any(m for m, _ in matches)
    recall = max(r for _, r in matches)
    premise = flags_premise(answer_text)
    if not answer_text.strip():
        correctness = "refusal" if not fp else "correct"
        notes.append("empty answer")
    elif fp:
        correctness = "correct" if (premise or refusal) else "incorrect"
    elif matched:
        correctness = "correct"
    elif refusal:
        correctness = "refusal"
    else:
        correctness = "incorrect"

    cites_out, any_bad, any_checked, any_good = _check_citations(answer_text, auth, judge, cfg)

    groundedness = None
    if correctness == "correct":
        if any_bad:
            groundedness = "misgrounded"
        elif any_checked and any_good:
            groundedness = "grounded"
        else:
            groundedness = "ungrounded"
            if cites_out:
                notes.append("citations point outside the corpus and could not be checked")
    label = derived_label(correctness, groundedness)
    return {
        "query_id": query.get("id"),
        "category": query.get("category", "general"),
        "correctness": correctness,
        "groundedness": groundedness,
        "hallucinated": label == "hallucinated",
        "label": label,
        "refusal": refusal,
        "premise_flagged": premise,
        "gold_recall": round(recall, 4),
        "citations": cites_out,
        "notes": notes,
    }
