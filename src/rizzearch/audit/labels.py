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

* refusal: a fixed list of abstention phrases (``I cannot answer``, ``no relevant information``...).
* correct: the answer contains the gold answer: every content token of a short gold answer
  (<= 3 tokens), or, for longer ones, an IDF-weighted recall of the gold tokens >= ``gold_threshold``
  that includes the gold's rarest token (so ``District of Columbia`` does not match ``District of Kansas``).
* premise flag (false-premise queries): a fixed list of correction phrases (``did not``, ``there is no``,
  ``the premise is false``...).
* support: each sentence that carries citations is a proposition (``legal.citations.propositions``);
  with the citation text removed, the IDF-weighted share of its content words found in the cited
  authority's text must reach ``support_threshold``. An optional LLM judge (``audit.judge``) can
  replace this scorer. The scorer is the audit's own: no system under audit uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rizzearch.audit.queries import CATEGORIES
from rizzearch.errors import DataError
from rizzearch.legal.citations import EXISTS, NONEXISTENT, Authorities, check_existence, default_authorities, propositions
from rizzearch.legal.text import content_set, content_tokens, weighted_recall

CORRECTNESS = ("correct", "incorrect", "refusal")
GROUNDEDNESS = ("grounded", "misgrounded", "ungrounded")
DERIVED = ("accurate", "incomplete", "hallucinated")

REFUSAL = re.compile(
    r"\b(i (?:cannot|can't|could not|couldn't|am unable to|am not able to|do not|don't) "
    r"(?:answer|find|determine|verify|locate|provide|confirm|know|say)"
    r"|unable to (?:answer|find|determine|verify|locate|confirm)"
    r"|no (?:relevant |reliable |supporting )?(?:information|sources?|authority|authorities|answer|passages?) "
    r"(?:was |were |is |are )?(?:found|available|located)"
    r"|not (?:enough|sufficient) (?:information|evidence)|insufficient (?:information|evidence)"
    r"|cannot be answered|decline to answer|i (?:must|will) decline|this does not (?:look|appear) like a legal question)",
    re.IGNORECASE,
)
PREMISE = re.compile(
    r"(false premise|premise (?:of (?:the|your) question )?(?:is|appears|seems|was) (?:false|incorrect|mistaken|wrong)"
    r"|\bdid not (?:dissent|write|author|deliver|join|decide|hold|serve|sit)|\bdidn't\b|\bnever (?:served|sat|wrote|existed|dissented)"
    r"|does not exist|do not exist|did not exist|no (?:such|record of)\b|there (?:is|was|are|were) no (?:justice|judge|case|amendment|opinion|record|such)"
    r"|no (?:justice|judge) (?:named|called)|not (?:a|an) (?:member|justice|judge) of|contrary to the (?:question|premise)"
    r"|\bmistaken(?:ly)?\b|incorrect(?:ly)? (?:assum|stat|suggest)|is not (?:correct|accurate|right)|\bactually\b|\bin fact\b)",
    re.IGNORECASE,
)


@dataclass
class LabelConfig:
    """Thresholds of the deterministic labeller.

    Args:
        gold_threshold: IDF-weighted recall of the gold answer's content words an answer needs to be correct.
        support_threshold: IDF-weighted share of a proposition's content words that the cited text must hold.
    """

    gold_threshold: float = 0.6
    support_threshold: float = 0.6


def _idf(auth: Authorities) -> tuple[dict, float]:
    """IDF table over the corpus passages, computed once per Authorities object."""
    return auth.idf_table()


def _doc_tokens(auth: Authorities, pids: list[str]) -> set[str]:
    """Content tokens of the passages ``pids`` (text and title); each passage is tokenised once per Authorities."""
    toks: set[str] = set()
    for pid in pids:
        toks |= auth.passage_tokens(pid) or set()
    return toks


def is_refusal(text: str) -> bool:
    return bool(REFUSAL.search(text or ""))


def flags_premise(text: str) -> bool:
    return bool(PREMISE.search(text or ""))


def gold_match(answer: str, gold: str, auth: Authorities | None = None, threshold: float = 0.6) -> tuple[bool, float]:
    """Whether ``answer`` states ``gold`` (see module docstring), with the weighted recall."""
    auth = auth or default_authorities()
    idf, dflt = _idf(auth)
    g = set(content_tokens(gold))
    if not g:
        ok = gold.strip().lower() in (answer or "").lower()
        return ok, float(ok)
    have = content_set(answer or "")
    rec = weighted_recall(g, have, idf, dflt)
    if len(g) <= 3:
        return g <= have, rec
    rarest = max(g, key=lambda w: (idf.get(w, dflt), w))
    return (rec >= threshold and rarest in have), rec


def support_score(claim: str, pids: list[str], auth: Authorities | None = None) -> float:
    """IDF-weighted share of the claim's content words present in the cited passages."""
    auth = auth or default_authorities()
    idf, dflt = _idf(auth)
    toks = set(content_tokens(claim))
    if not toks:
        return 0.0
    return weighted_recall(toks, _doc_tokens(auth, pids), idf, dflt)


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
                else:
                    sc = support_score(prop["claim"], pids, auth)
                    entry.update(supported=sc >= cfg.support_threshold, support_score=round(sc, 4))
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
    matches = [gold_match(answer_text, g, auth, cfg.gold_threshold) for g in golds]
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
