"""The bundled legal corpus as passages with stable ids and citable references.

The passages are what the RAG index retrieves and, through ``legal.citations.build_authorities``,
the authority table the audit checks citations against; both sides load them from here.

Three sources (``rizzearch.corpora``):

* ``constitution``: one passage per clause of the U.S. Constitution. Ids follow the structure,
  ``const/art1/s3/cl3``, ``const/amend14/s1``, ``const/amend5/cl2``, ``const/preamble``; the reference is
  the Bluebook form, ``U.S. Const. art. I, § 3, cl. 3`` / ``U.S. Const. amend. XIV, § 1``.
* ``scotus``: for each opinion (an OCR prefix of the *United States Reports*), one ``meta`` passage
  stating what the text itself states (case name, citation, decision date, the court below from the
  caption, the Justice who delivered the opinion) and the opinion text in chunks of about
  ``chunk_chars`` characters cut at sentence boundaries: ``scotus/347us483/meta``,
  ``scotus/347us483/c00``, ... The reference is ``Brown v. Board of Education, 347 U.S. 483 (1954)``.
* ``rule_qa``: the LegalBench rule_qa items, one passage each (``ruleqa/001``): the answer is the
  passage text and the question its title; the reference is ``LegalBench rule_qa #1 (Civil Procedure)``.

Ids depend only on the bundled files and ``chunk_chars``; they never change between runs.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from rizzearch import corpora
from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import DataError
from rizzearch.legal.text import from_roman, normalize_space, roman, split_sentences

SOURCES = ("constitution", "scotus", "rule_qa")

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


@dataclass(frozen=True)
class Passage:
    """One retrievable, citable unit of the corpus.

    Args:
        id: stable identifier (``const/amend19/cl1``, ``scotus/347us483/c02``, ``ruleqa/012``).
        source: ``constitution``, ``scotus`` or ``rule_qa``.
        ref: the citation a lawyer would write for it.
        title: a short heading (section name, case name, or the rule_qa question).
        text: the passage text.
        meta: structured fields (``cite``, ``case_name``, ``year``, ``decided``, ``opinion_by``,
            ``court_below``, ``article``, ``section``, ``clause``, ``amendment``, ``doctrine``, ``doc``).
    """

    id: str
    source: str
    ref: str
    title: str
    text: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def doc(self) -> str:
        """The authority this passage belongs to (``scotus/347us483``, ``const/art1/s3/cl3``, ``ruleqa/012``)."""
        return self.meta.get("doc", self.id)


# --------------------------------------------------------------------------------------------
# Constitution
# --------------------------------------------------------------------------------------------


def _content(node) -> str:
    c = node.get("content", "")
    if isinstance(c, list):
        c = " ".join(c)
    return normalize_space(str(c))


def _num(label: str) -> int:
    m = re.search(r"(\d+)", label or "")
    if not m:
        r = re.search(r"\b([IVXLC]+)\b", label or "")
        if r and from_roman(r.group(1)):
            return from_roman(r.group(1))
        raise DataError(f"constitution JSON: cannot read a number from {label!r}")
    return int(m.group(1))


def load_constitution(path: str | Path | None = None) -> list[Passage]:
    """One passage per clause of the Constitution (preamble, articles, amendments)."""
    p = Path(path) if path else corpora.path("us-constitution")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: cannot read the constitution JSON ({e})") from e
    out: list[Passage] = []

    def add(pid, ref, title, text, **meta):
        if text:
            out.append(Passage(pid, "constitution", ref, title, text, {"doc": pid, **meta}))

    pre = data.get("preamble", {})
    add("const/preamble", "U.S. Const. pmbl.", "Preamble", _content(pre), part="preamble")
    for art in data.get("articles", []):
        a = _num(art["num"])
        aname = art.get("name", "").strip()
        base_ref = f"U.S. Const. art. {roman(a)}"
        if art.get("content"):
            add(f"const/art{a}", base_ref, f"Article {roman(a)}: {aname}", _content(art), article=a)
        sections = art.get("sections", [])
        if sections and all(s.get("type") == "paragraph" for s in sections):  # Article V: one paragraph
            add(f"const/art{a}", base_ref, f"Article {roman(a)}: {aname}", " ".join(_content(s) for s in sections), article=a)
            sections = []
        for sec in sections:
            s = _num(sec["num"])
            sname = sec.get("name", "").strip()
            clauses = sec.get("clauses", [])
            title = f"Article {roman(a)}, Section {s}: {sname}"
            if len(clauses) <= 1:
                text = _content(clauses[0]) if clauses else _content(sec)
                add(f"const/art{a}/s{s}", f"{base_ref}, § {s}", title, text, article=a, section=s)
            else:
                for c, cl in enumerate(clauses, 1):
                    add(f"const/art{a}/s{s}/cl{c}", f"{base_ref}, § {s}, cl. {c}", title, _content(cl), article=a, section=s, clause=c)
        clauses = art.get("clauses", [])
        for c, cl in enumerate(clauses, 1):
            add(f"const/art{a}/cl{c}", f"{base_ref}, cl. {c}", f"Article {roman(a)}: {aname}", _content(cl), article=a, clause=c)
    for am in data.get("amendments", []):
        n = _num(am["num"])
        name = am.get("name", "").strip()
        title = f"Amendment {roman(n)}: {name}"
        base_ref = f"U.S. Const. amend. {roman(n)}"
        if am.get("sections"):
            parts = [("s", i, _content(s)) for i, s in enumerate(am["sections"], 1)]
        else:
            parts = [("cl", i, _content(c)) for i, c in enumerate(am.get("clauses", []), 1)]
        for kind, i, text in parts:
            if len(parts) == 1:
                add(f"const/amend{n}", base_ref, title, text, amendment=n)
            elif kind == "s":
                add(f"const/amend{n}/s{i}", f"{base_ref}, § {i}", title, text, amendment=n, section=i)
            else:
                add(f"const/amend{n}/cl{i}", f"{base_ref}, cl. {i}", title, text, amendment=n, clause=i)
    if not out:
        raise DataError(f"{p}: no clauses found in the constitution JSON")
    return out


# --------------------------------------------------------------------------------------------
# Supreme Court opinions
# --------------------------------------------------------------------------------------------

_COURT_BELOW = re.compile(
    r"^(?:ON\s+)?(?:WRIT\s+OF\s+)?(APPEALS?\s+FROM|CERTIORARI(?:\s+BEFORE\s+JUDGMENT)?\s+TO|ERROR\s+TO|CERTIFICATE\s+FROM)\s+(.*)$"
)


def _upperish(line: str) -> bool:
    letters = [c for c in line if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.85 * len(letters)


_SMALL = {"of", "the", "for", "and", "to", "in", "at"}


def _titlecase(s: str) -> str:
    out = []
    for i, w in enumerate(s.lower().split()):
        out.append(w if (i and w in _SMALL) else w[:1].upper() + w[1:])
    return " ".join(out)


def court_below(raw: str) -> tuple[str, str] | None:
    """``("certiorari", "Supreme Court of Arizona")`` from the caption, or None if absent."""
    lines = [ln.strip() for ln in raw.splitlines()]
    for i, line in enumerate(lines[:80]):
        if not re.match(r"^(ON |APPEAL|CERTIORARI|ERROR|CERTIFICATE)", line) or not _upperish(line):
            continue
        joined, j = line, i + 1
        while not joined.rstrip("*").endswith(".") and j < min(len(lines), i + 12):
            nxt = lines[j]
            j += 1
            if not nxt:
                continue
            if not _upperish(nxt) or re.match(r"^(NO\.|NOS\.|ARGUED|SUBMITTED)", nxt):
                break
            joined += " " + nxt
        m = _COURT_BELOW.match(joined)
        if not m:
            continue
        how = m.group(1).lower()
        how = "appeal" if "appeal" in how else "certiorari" if "certiorari" in how else "error" if "error" in how else "certificate"
        rest = re.sub(r"[*.,;:\s]+$", "", m.group(2).strip())
        rest = re.sub(r"^THE\s+", "", rest)
        if len(rest) < 6:
            return None
        return how, _titlecase(rest)
    return None


# How a case reached the Supreme Court (``court_below``'s first field), as a phrase.
REVIEW_PHRASES = {"appeal": "on appeal from", "certiorari": "on certiorari to", "error": "on writ of error to",
                  "certificate": "on a certificate from"}


def date_words(iso: str | None) -> str | None:
    """``"1954-05-17"`` -> ``"May 17, 1954"``; None for anything that is not an ISO date."""
    if not iso or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", iso):
        return None
    y, m, d = (int(x) for x in iso.split("-"))
    return f"{_MONTHS[m - 1]} {d}, {y}"


def chunk_text(raw: str, chunk_chars: int = 700) -> list[str]:
    """The passage scheme: sentences (``split_sentences``) packed into chunks of at most about ``chunk_chars``
    characters (a longer sentence is a chunk of its own)."""
    chunks: list[str] = []
    cur = ""
    for s in split_sentences(raw):
        if cur and len(cur) + len(s) + 1 > chunk_chars:
            chunks.append(cur)
            cur = ""
        cur = f"{cur} {s}".strip()
    if cur:
        chunks.append(cur)
    return chunks


def load_scotus(folder: str | Path | None = None, chunk_chars: int = 700) -> list[Passage]:
    """A meta passage plus text chunks for every opinion listed in ``index.jsonl``."""
    root = Path(folder) if folder else corpora.path("scotus")
    index = root / "index.jsonl"
    if not index.is_file():
        raise DataError(f"{index}: missing (the scotus folder needs an index.jsonl)")
    out: list[Passage] = []
    for lineno, row in read_jsonl(index):
        try:
            cite, fname, case = row["cite"], row["file"], row["case_name"]
        except KeyError as e:
            raise DataError(f"{index}:{lineno}: bad index row ({e})") from e
        f = root / fname
        if not f.is_file():
            raise DataError(f"{index}:{lineno}: file {fname!r} not found in {root}")
        raw = f.read_text(errors="replace")
        doc = "scotus/" + Path(fname).stem
        year = (row.get("decided") or "")[:4] or None
        ref = f"{case}, {cite}" + (f" ({year})" if year else "")
        below = court_below(raw)
        author = row.get("opinion_by")
        meta = {"doc": doc, "cite": cite, "case_name": case, "year": int(year) if year else None,
                "decided": row.get("decided"), "opinion_by": author,
                "court_below": below[1] if below else None, "review": below[0] if below else None}
        facts = [f"{case}, {cite}" + (f" ({year})" if year else "") + "."]
        when = date_words(row.get("decided"))
        if when:
            facts.append(f"{case} was decided by the Supreme Court of the United States on {when}.")
        if below:
            facts.append(f"The Supreme Court heard {case} {REVIEW_PHRASES[below[0]]} the {below[1]}.")
        if author:
            facts.append(f"In {case}, Justice {author} delivered the opinion of the Court.")
        else:
            facts.append(f"{case} was decided per curiam, without an opinion signed by a named Justice.")
        title = f"{case} ({year})" if year else case
        out.append(Passage(f"{doc}/meta", "scotus", ref, title, " ".join(facts), dict(meta)))
        for i, text in enumerate(chunk_text(raw, chunk_chars)):
            out.append(Passage(f"{doc}/c{i:02d}", "scotus", ref, title, text, dict(meta)))
    if not out:
        raise DataError(f"{index}: no opinions listed")
    return out


# --------------------------------------------------------------------------------------------
# LegalBench rule_qa
# --------------------------------------------------------------------------------------------


def load_rule_qa(path: str | Path | None = None) -> list[Passage]:
    """One passage per LegalBench rule_qa item (answer as text, question as title)."""
    p = Path(path) if path else corpora.path("legalbench-rule-qa")
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error) as e:
        raise DataError(f"{p}: cannot read the rule_qa TSV ({e})") from e
    out = []
    for i, r in enumerate(rows, 1):
        q, a, d = (normalize_space(r.get(k) or "") for k in ("text", "answer", "doctrine"))
        if not q or not a:
            raise DataError(f"{p}: row {i + 1}: empty 'text' or 'answer' field")
        pid = f"ruleqa/{i:03d}"
        out.append(Passage(pid, "rule_qa", f"LegalBench rule_qa #{i} ({d})", q, a,
                           {"doc": pid, "doctrine": d, "question": q, "row": i}))
    return out


def load_corpus(sources: tuple[str, ...] | list[str] = SOURCES, chunk_chars: int = 700) -> list[Passage]:
    """All passages of the chosen sources, in a fixed order (constitution, scotus, rule_qa)."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown corpus source(s) {unknown}; choose from {list(SOURCES)}")
    return list(_cached_corpus(tuple(s for s in SOURCES if s in sources), chunk_chars))


@lru_cache(maxsize=4)
def _cached_corpus(sources: tuple[str, ...], chunk_chars: int) -> tuple[Passage, ...]:
    out: list[Passage] = []
    if "constitution" in sources:
        out += load_constitution()
    if "scotus" in sources:
        out += load_scotus(chunk_chars=chunk_chars)
    if "rule_qa" in sources:
        out += load_rule_qa()
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):  # pragma: no cover - a bug, not user input
        raise DataError("duplicate passage ids in the corpus")
    return tuple(out)
