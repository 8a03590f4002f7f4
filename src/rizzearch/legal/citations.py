"""Citations and the authority table: what a legal answer cites, and whether it exists.

Shared by the systems under audit (``rag``) and the audit itself: both need to read citations and to
know which authorities exist. Whether a cited source *supports* a claim is not decided here; the
audit's labeller (``audit.labels``) and the verified RAG system (``rag.support``) each have their own
check, so the system under audit never answers with its judge's scorer.

Three kinds of citation are read from an answer, in the forms lawyers write them:

* case citations, by ``eyecite`` (``347 U.S. 483``; ``Brown v. Board of Education, 347 U.S. 483 (1954)``);
* Constitution citations, by our own parser (``U.S. Const. art. I, § 3, cl. 3``, ``U.S. Const. amend. XIX``,
  ``U.S. Const. amend. XIV, § 1``, ``U.S. Const. pmbl.``);
* internal passage ids of our corpus (``[scotus/347us483/c02]``, ``ruleqa/012``, ``const/amend5/cl2``).

``propositions`` splits an answer into sentences with the citations each carries (the claims a
citation is offered for).

Existence (``check_existence``) is decided against the corpus first: a case citation whose
volume/reporter/page is one of our opinions exists (and its stated case name and year must agree
with that opinion, else the citation is ``nonexistent`` as written); a citation that names one of
our cases with another volume/page is ``nonexistent``; anything else is checked against
``reporters-db`` (the reporter must be known and the year inside the reporter's publication
dates; U.S. Reports volumes must be consistent with the year) and is then ``unverifiable``
(plausible, but we hold no text to check support against) or ``nonexistent``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from rizzearch.legal.corpus import Passage
from rizzearch.legal.text import CASE_NAME_STOPWORDS, content_set, content_tokens, corpus_idf, from_roman, roman, split_sentences

EXISTS, NONEXISTENT, UNVERIFIABLE = "exists", "nonexistent", "unverifiable"


@dataclass
class Citation:
    """One citation found in a text.

    Args:
        kind: ``case``, ``statute`` (U.S. Code or C.F.R.), ``constitution`` or ``internal``.
        text: the matched text.
        start: character offset where the citation starts (its case name included, if any).
        end: character offset just past the citation (year parenthetical included, if any).
        normalized: canonical form (``347 U.S. 483``, ``U.S. Const. art. I, § 3, cl. 3``, ``ruleqa/012``).
        case_name: the case name written before a case citation, if any.
        year: the year written after a case citation, if any.
        volume: reporter volume (case citations), title (statute citations).
        reporter: reporter abbreviation as normalized by eyecite (``U.S.``; ``U.S.C.`` / ``C.F.R.`` for statutes).
        page: first page (case citations).
        path: Constitution location, e.g. ``["art", 1, "s", 3, "cl", 3]`` or ``["amend", 19]``; for a statute
            ``["usc", 35, "112"]`` (code, title, section without subsections).
    """

    kind: str
    text: str
    start: int
    end: int
    normalized: str
    case_name: str | None = None
    year: int | None = None
    volume: int | None = None
    reporter: str | None = None
    page: int | None = None
    path: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_NUM = r"([IVXLC]+|\d+)"
_CONST = re.compile(
    r"U\.\s?S\.\s?Const(?:\.|itution)?,?\s+"
    r"(?:(?P<pmbl>pmbl\.?|preamble)"
    r"|(?P<art>art(?:icle)?\.?)\s*" + _NUM.replace("(", "(?P<an>", 1) +
    r"|(?P<am>amend(?:ment)?\.?)\s*" + _NUM.replace("(", "(?P<mn>", 1) + r")"
    r"(?:,?\s*(?:§|sec(?:tion)?\.?)\s*(?P<sec>\d+))?"
    r"(?:,?\s*cl(?:ause)?\.?\s*(?P<cl>\d+))?",
    re.IGNORECASE,
)
_INTERNAL = re.compile(r"\b((?:const|scotus|ruleqa)/[a-z0-9]+(?:/[a-z0-9]+)*)\b")
_YEAR_AFTER = re.compile(r"^\s*\((?:[^()]*?\s)?(\d{4})\)")
_CASE_BEFORE = re.compile(
    r"((?:[A-Z][\w.'&-]*|of|the|and|for|ex|rel\.|de|la|in|on|to)(?:[\s,]+(?:[A-Z][\w.'&-]*|of|the|and|for|ex|rel\.|de|la|in|on|to))*"
    r"\s+v\.\s+(?:[A-Z0-9][\w.'&-]*|of|the|and|for|ex|rel\.|de|la|in|on|to)(?:[\s,]+(?:[A-Z0-9][\w.'&-]*|of|the|and|for|ex|rel\.|de|la|in|on|to))*?)"
    r",?\s*$"
)
_LEAD_WORDS = {"See", "In", "Under", "As", "Also", "Cf", "Cf.", "But", "And", "The", "per", "Per", "Held", "According", "to"}


_NAME_ABBREV = {"corp", "bros", "dept", "comm'n", "ass'n", "int'l", "nat'l", "mfg", "educ", "assn"}
_SENT_END = re.compile(r"\b([\w']{4,})[.;:!?]\s+")


def _case_name_before(text: str, start: int) -> tuple[str | None, int]:
    lo = max(0, start - 160)
    window = text[lo:start]
    cut = 0
    for m in _SENT_END.finditer(window):  # a case name never spans a sentence end ("... of the Court. Brown v. ...")
        if m.group(1).lower() not in _NAME_ABBREV:
            cut = m.end()
    window, lo = window[cut:], lo + cut
    m = _CASE_BEFORE.search(window)
    if not m:
        return None, start
    name = m.group(1).strip().rstrip(",")
    base = lo + m.start(1)
    toks = name.split()
    while toks and (toks[0] in _LEAD_WORDS or toks[0].islower()):
        base += len(toks[0]) + 1
        toks = toks[1:]
        name = " ".join(toks)
    return (name or None), base


def _eyecite_cases(text: str) -> list[Citation]:
    from eyecite import get_citations
    from eyecite.models import FullCaseCitation

    out = []
    for c in get_citations(text):
        if not isinstance(c, FullCaseCitation):
            continue
        g = c.groups
        try:
            vol, page = int(g.get("volume")), int(g.get("page"))
        except (TypeError, ValueError):
            continue
        reporter = c.corrected_reporter() if hasattr(c, "corrected_reporter") else g.get("reporter")
        s, e = c.span()
        y = _YEAR_AFTER.match(text[e:])
        year = int(y.group(1)) if y else None
        end = e + (y.end() if y else 0)
        name, start = _case_name_before(text, s)
        out.append(Citation("case", text[start:end], start, end, f"{vol} {reporter} {page}", name, year, vol, reporter, page))
    return out


def _const_cites(text: str) -> list[Citation]:
    out = []
    for m in _CONST.finditer(text):
        if m.group("pmbl"):
            path, norm = ["pmbl"], "U.S. Const. pmbl."
        else:
            raw = m.group("an") or m.group("mn")
            n = int(raw) if raw.isdigit() else from_roman(raw)
            if n is None:
                continue
            kind = "art" if m.group("art") else "amend"
            path, norm = [kind, n], f"U.S. Const. {kind}. {roman(n)}"
            if m.group("sec"):
                path += ["s", int(m.group("sec"))]
                norm += f", § {int(m.group('sec'))}"
            if m.group("cl"):
                path += ["cl", int(m.group("cl"))]
                norm += f", cl. {int(m.group('cl'))}"
        out.append(Citation("constitution", m.group(0), m.start(), m.end(), norm, path=path))
    return out


CODES = {"U.S.C.": ("usc", 54), "C.F.R.": ("cfr", 50)}  # reporter -> (path key, number of titles)
_CODE_FALLBACK = re.compile(r"\b(\d{1,2})\s+(U\.?\s?S\.?\s?C|C\.?\s?F\.?\s?R)\.?(?:\s*(?:§§?|sec(?:tion)?s?\.?))?\s*(\d+[\w.-]*)",
                            re.IGNORECASE)


_CODE_HINT = re.compile(r"U\.?\s?S\.?\s?C\b|C\.?\s?F\.?\s?R\b", re.IGNORECASE)


def _statute(text: str, s: int, e: int, title: str, reporter: str, section: str) -> Citation | None:
    try:
        t = int(title)
    except (TypeError, ValueError):
        return None
    section = re.sub(r"(\d)(?:\([a-z0-9]{1,4}\))+$", r"\1", section.rstrip(".,;"))
    key = CODES[reporter][0]
    return Citation("statute", text[s:e], s, e, f"{t} {reporter} § {section}", volume=t, reporter=reporter,
                    path=[key, t, section])


def _law_cites(text: str) -> list[Citation]:
    """U.S. Code and C.F.R. citations: eyecite's ``FullLawCitation`` (``35 U.S.C. § 112(a)``, ``40 C.F.R. § 1.2``),
    plus the bare form eyecite skips (``28 U.S.C. 1367``)."""
    from eyecite import get_citations
    from eyecite.models import FullLawCitation

    out = []
    for c in get_citations(text):
        if not isinstance(c, FullLawCitation):
            continue
        rep = c.corrected_reporter() if hasattr(c, "corrected_reporter") else c.groups.get("reporter")
        if rep not in CODES:
            continue
        g = c.groups
        got = _statute(text, *c.span(), g.get("title") or g.get("chapter"), rep, str(g.get("section") or ""))
        if got is not None:
            out.append(got)
    for m in _CODE_FALLBACK.finditer(text):
        if any(c.start <= m.start() < c.end for c in out):
            continue
        rep = "U.S.C." if m.group(2).upper().replace(".", "").replace(" ", "") == "USC" else "C.F.R."
        got = _statute(text, m.start(), m.end(), m.group(1), rep, m.group(3))
        if got is not None:
            out.append(got)
    return out


def extract_citations(text: str) -> list[Citation]:
    """All case, statute/regulation (U.S.C., C.F.R.), Constitution and internal-id citations in ``text``, in order."""
    if not text:
        return []
    cites = _const_cites(text)
    taken = [(c.start, c.end) for c in cites]
    for c in _eyecite_cases(text) + _law_cites(text):
        if not any(a <= c.start < b or a < c.end <= b for a, b in taken):
            cites.append(c)
            taken.append((c.start, c.end))
    for m in _INTERNAL.finditer(text):
        cites.append(Citation("internal", m.group(1), m.start(1), m.end(1), m.group(1)))
    cites.sort(key=lambda c: (c.start, c.end))
    return cites


def _strip_citations(sentence: str, spans: list[tuple[int, int]], offset: int) -> str:
    out, pos = [], 0
    for s, e in sorted(spans):
        s, e = s - offset, e - offset
        out.append(sentence[pos:max(pos, s)])
        pos = max(pos, e)
    out.append(sentence[pos:])
    return "".join(out)


def propositions(answer: str) -> list[dict]:
    """Sentences of ``answer`` with the citations they carry (a citation-only sentence attaches to the one before)."""
    cites = extract_citations(answer)
    sents, pos = [], 0
    for s in split_sentences(answer):
        i = answer.find(s[:20], pos) if s else -1
        i = pos if i < 0 else i
        sents.append((i, i + len(s), s))
        pos = i + len(s)
    props: list[dict] = []
    for a, b, s in sents:
        mine = [c for c in cites if a <= c.start < b + 1]
        claim = _strip_citations(s, [(c.start, c.end) for c in mine], a)
        if props and mine and len(content_tokens(claim)) < 3:
            props[-1]["citations"] += mine
            continue
        if mine and not content_tokens(claim):  # the answer is the citation itself ("X, 341 U.S. 494 (1951).")
            # (passage ids are never what a sentence says: "35 USC 103 [ruleqa/035]." claims "35 USC 103")
            claim = _strip_citations(s, [(c.start, c.end) for c in mine if c.kind == "internal"], a)
            claim = claim if content_tokens(claim) else s
        props.append({"sentence": s, "claim": claim.strip(), "citations": mine})
    return props


# --------------------------------------------------------------------------------------------
# Existence
# --------------------------------------------------------------------------------------------


@dataclass
class Authorities:
    """What the corpus holds, keyed for citation look-ups."""

    passages: list[Passage]
    by_id: dict
    by_cite: dict  # "347 U.S. 483" -> doc
    by_doc: dict  # doc -> [Passage]
    case_names: dict  # doc -> case name
    const_docs: dict  # tuple path -> [Passage]
    us_years: list  # sorted (volume, year) points of our U.S. Reports opinions
    idf: tuple | None = None  # (idf table, default idf), filled lazily by ``idf_table()``
    tokens: dict = field(default_factory=dict)  # passage id -> content tokens of text and title, filled by ``passage_tokens``

    def idf_table(self) -> tuple[dict, float]:
        """``(idf, default idf)`` of the content tokens over the corpus passages, computed once."""
        if self.idf is None:
            self.idf = corpus_idf(p.text for p in self.passages)
        return self.idf

    def statute_passages(self) -> dict:
        """``("usc"|"cfr", title, section) -> [passage ids]``: passages that are, or quote, a statute section.

        Built once, on the first statute citation checked: the reference of each passage (a user's corpus may
        index the sections themselves) and its text are read for U.S.C. and C.F.R. citations."""
        got = self.tokens.get(("statutes",))
        if got is None:
            got = {}
            for p in self.passages:
                text = f"{p.ref}\n{p.text}"
                if not _CODE_HINT.search(text):  # eyecite is slow; most passages cite no code
                    continue
                for c in _law_cites(text):
                    got.setdefault((c.path[0], c.volume, _section_base(c.path[2])), []).append(p.id)
            self.tokens[("statutes",)] = got
        return got

    def passage_tokens(self, pid: str) -> set[str] | None:
        """Content tokens of passage ``pid`` (its text and title), tokenised once; None for an unknown id."""
        got = self.tokens.get(pid)
        if got is None:
            p = self.by_id.get(pid)
            if p is None:
                return None
            got = self.tokens[pid] = content_set(p.text) | content_set(p.title)
        return got


def _section_base(section: str) -> str:
    """``112(a)`` -> ``112``; ``1983-1985`` -> ``1983`` (a range is checked by its first section)."""
    return re.split(r"[(\-–]", section, maxsplit=1)[0].strip()


def _const_key(p: Passage) -> list[tuple]:
    m = p.meta
    if p.id == "const/preamble":
        return [("pmbl",)]
    if "amendment" in m:
        base = ("amend", m["amendment"])
        keys = [base]
        if "section" in m:
            keys.append(base + ("s", m["section"]))
        if "clause" in m:
            keys += [base + ("cl", m["clause"]), base + ("s", m["clause"])]  # lone-level amendments: § == cl.
        return keys
    base = ("art", m["article"])
    keys = [base]
    if "section" in m:
        keys.append(base + ("s", m["section"]))
        if "clause" in m:
            keys.append(base + ("s", m["section"], "cl", m["clause"]))
    elif "clause" in m:
        keys.append(base + ("cl", m["clause"]))
    return keys


def build_authorities(passages: list[Passage]) -> Authorities:
    by_doc: dict[str, list[Passage]] = {}
    by_cite, names, const = {}, {}, {}
    for p in passages:
        by_doc.setdefault(p.doc, []).append(p)
        if p.source == "scotus":
            by_cite[p.meta["cite"]] = p.doc
            names[p.doc] = p.meta["case_name"]
        elif p.source == "constitution":
            for k in _const_key(p):
                const.setdefault(k, []).append(p)
        elif p.source == "documents" and p.doc not in names and p.meta.get("citation"):
            for c in _eyecite_cases(p.meta["citation"]):  # a user's document that is a case: cite it like ours
                by_cite.setdefault(c.normalized, p.doc)
                names[p.doc] = c.case_name or p.title
    pts = sorted({(int(c.split()[0]), by_doc[d][0].meta.get("year")) for c, d in by_cite.items()
                  if c.split()[1] == "U.S." and by_doc[d][0].meta.get("year")})
    return Authorities(passages, {p.id: p for p in passages}, by_cite, by_doc, names, const, pts)


@lru_cache(maxsize=1)
def default_authorities() -> Authorities:
    from rizzearch.legal.corpus import load_corpus

    return build_authorities(load_corpus())


_NAME_STOP = CASE_NAME_STOPWORDS | {"board"}


def _names_agree(a: str, b: str) -> bool:
    ta = {w for w in content_set(a) if w not in _NAME_STOP}
    tb = {w for w in content_set(b) if w not in _NAME_STOP}
    if not ta or not tb:
        return content_set(a) & content_set(b) != set()
    return bool(ta & tb)


def _expected_us_year(auth: Authorities, vol: int) -> float | None:
    pts = auth.us_years
    if len(pts) < 2 or not (pts[0][0] <= vol <= pts[-1][0]):
        return None
    for (v0, y0), (v1, y1) in zip(pts, pts[1:]):
        if v0 <= vol <= v1:
            return y0 if v1 == v0 else y0 + (y1 - y0) * (vol - v0) / (v1 - v0)
    return None


@lru_cache(maxsize=1)
def _reporter_editions() -> dict:
    """Reporter abbreviation (an edition, or a variation of one) -> its reporters-db edition, built once.

    The first reporters-db entry naming the abbreviation wins, and within an entry its editions come before
    its variations."""
    from reporters_db import REPORTERS

    out: dict = {}
    for entries in REPORTERS.values():
        for e in entries:
            for abbr, edition in e["editions"].items():
                out.setdefault(abbr, edition)
            for var, target in e.get("variations", {}).items():
                if target in e["editions"]:
                    out.setdefault(var, e["editions"][target])
    return out


def _reporter_check(c: Citation) -> tuple[str, str]:
    import datetime

    reps = _reporter_editions().get(c.reporter)
    if reps is None:
        return NONEXISTENT, f"reporter {c.reporter!r} is not in reporters-db"
    this_year = datetime.date.today().year
    start, end = reps.get("start"), reps.get("end")
    if c.year is not None:
        if c.year > this_year:
            return NONEXISTENT, f"year {c.year} is in the future"
        if start and c.year < start.year or end and c.year > end.year:
            return NONEXISTENT, f"{c.reporter} was not published in {c.year} (reporters-db: {start and start.year}-{end and end.year or 'present'})"
    return UNVERIFIABLE, f"{c.reporter} is a real reporter (reporters-db) but {c.normalized} is not in our corpus"


def _statute_existence(c: Citation, auth: Authorities) -> tuple[str, str, list[str]]:
    """A U.S.C./C.F.R. section exists when a passage of the index is that section (its reference) or quotes it;
    a title beyond the code's last is nonexistent; any other section is real-looking but unverifiable."""
    key, n_titles = CODES[c.reporter]
    pids = auth.statute_passages().get((key, c.volume, _section_base(c.path[2])), [])
    if pids:
        return EXISTS, f"{c.normalized} is in the index", list(pids)
    if not 1 <= (c.volume or 0) <= n_titles:
        return NONEXISTENT, f"the {c.reporter} has {n_titles} titles, not {c.volume}", []
    return UNVERIFIABLE, f"{c.normalized} is not in our index (a real-looking section we cannot read)", []


def check_existence(c: Citation, auth: Authorities | None = None) -> tuple[str, str, list[str]]:
    """``(verdict, detail, passage_ids)``: verdict is ``exists``, ``nonexistent`` or ``unverifiable``."""
    auth = auth or default_authorities()
    if c.kind == "internal":
        if c.normalized in auth.by_id:
            return EXISTS, "passage id in the corpus", [c.normalized]
        docs = [d for d in auth.by_doc if d == c.normalized or d.startswith(c.normalized + "/")]
        if docs:
            return EXISTS, "document id in the corpus", [p.id for d in docs for p in auth.by_doc[d]]
        return NONEXISTENT, f"no passage {c.normalized!r} in the corpus", []
    if c.kind == "statute":
        return _statute_existence(c, auth)
    if c.kind == "constitution":
        key = tuple(c.path)
        ps = auth.const_docs.get(key)
        if ps:
            return EXISTS, "provision of the U.S. Constitution", [p.id for p in ps]
        if key and key[0] == "amend" and (key[1] < 1 or key[1] > 27):
            return NONEXISTENT, f"the Constitution has 27 amendments, not {key[1]}", []
        return NONEXISTENT, f"{c.normalized} does not exist in the Constitution", []
    # case citation
    doc = auth.by_cite.get(f"{c.volume} {c.reporter} {c.page}")
    if doc:
        real = auth.case_names[doc]
        if c.case_name and not _names_agree(c.case_name, real):
            return NONEXISTENT, f"{c.normalized} is {real}, not {c.case_name}", []
        year = auth.by_doc[doc][0].meta.get("year")
        if c.year and year and abs(c.year - year) > 1:
            return NONEXISTENT, f"{real} was decided in {year}, not {c.year}", []
        return EXISTS, f"{real} is in the corpus", [p.id for p in auth.by_doc[doc]]
    if c.case_name:
        for d, name in auth.case_names.items():
            if _names_agree(c.case_name, name) and content_set(c.case_name) >= {w for w in content_set(name) if w not in _NAME_STOP}:
                real = auth.by_doc[d][0].meta.get("cite") or next(k for k, v in auth.by_cite.items() if v == d)
                return NONEXISTENT, f"{name} is reported at {real}, not {c.normalized}", []
    if c.reporter == "U.S." and c.volume is not None:
        if c.volume > 610:
            return NONEXISTENT, f"the United States Reports have no volume {c.volume}", []
        exp = _expected_us_year(auth, c.volume)
        if c.year is not None and exp is not None and abs(exp - c.year) > 4:
            return NONEXISTENT, f"volume {c.volume} of the U.S. Reports is from about {round(exp)}, not {c.year}", []
    verdict, detail = _reporter_check(c)
    return verdict, detail, []
