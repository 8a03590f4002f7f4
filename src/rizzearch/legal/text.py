"""Small, deterministic text helpers shared by retrieval, generation and the audit.

Everything here is plain Python so that labels and answers are identical on every machine:
lower-cased word tokens, a fixed stop-word list, a light suffix stemmer, a legal-abbreviation-aware
sentence splitter, and inverse document frequencies over a list of texts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache
from typing import Iterable

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

# Function words plus question words; "may" is kept on purpose (the month), so are numbers.
STOPWORDS = frozenset(
    """a an the and or but nor of to in on at by for from with without into onto upon about as is are was were be been
    being am do does did doing done have has had having it its it's this that these those there their them they he she
    his her him hers i me my we our us you your yours what which who whom whose when where why how than then so such
    not no yes if else also any all each every some many much more most other another same own only very can could
    would should shall will might must one ones s t d ll m re ve say says said according per under over whether
    please tell explain describe give provide list name""".split()
)

# Abbreviations after which a period does not end a sentence (legal citations are full of them).
_ABBREV = frozenset(
    """v vs mr mrs ms dr no nos co corp inc ltd bros st jr sr ry r s u e g i cf al ex rel stat ct cl art amend const
    sec ed eds supp app cir dist f pp p ch n j jj c bd educ comm'n ass'n dept ins mfg nat'l int'l ave op etc viz""".split()
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, inner apostrophes)."""
    return _WORD.findall(text.lower())


def stem(word: str) -> str:
    """A light, deterministic suffix stemmer (plurals, ``-ed``, ``-ing``, final ``-e``).

    ``decide``, ``decided``, ``decides`` and ``deciding`` all become ``decid``; ``states`` and ``state``
    become ``stat``. Crude, but the same on both sides of every comparison, which is all we need.
    """
    if word.isdigit() or len(word) <= 3:
        return word
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith("ied"):
        word = word[:-3] + "y"
    elif len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
        word = word[:-2]
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


# Words that do not tell two case names apart, stemmed like content tokens ("United States" -> "unit", "stat"),
# since they are compared with content_set(...) of a name.
CASE_NAME_STOPWORDS = frozenset(stem(w) for w in "v of the and for co inc corp united state states ex rel in re".split())


def content_tokens(text: str) -> list[str]:
    """Stemmed tokens without stop words (order kept, duplicates kept)."""
    return [stem(w) for w in words(text) if w not in STOPWORDS]


def content_set(text: str) -> set[str]:
    return set(content_tokens(text))


def normalize_space(text: str) -> str:
    """Join OCR line breaks (re-joining hyphenated words) and collapse whitespace."""
    text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)
    return re.sub(r"\s+", " ", text).strip()


_DOTTED = re.compile(r"\b((?:[A-Za-z]\.\s?){2,})")
_SUBSECTION = re.compile(r"(\d)((?:\([a-z0-9]{1,4}\))+)")


def normalize_citation_forms(text: str) -> str:
    """One spelling for statute-style citations, so ``35 U.S.C. § 112(a)`` and ``35 USC 112`` compare equal.

    Dotted abbreviations lose their periods and spaces (``U.S.C.`` -> ``USC``, ``C. F. R.`` -> ``CFR``),
    ``§``/``§§`` and the words ``section``/``sec.`` before a number are dropped, and subsection parentheticals
    after a number go (``112(a)(1)`` -> ``112``). Applied to both sides of a comparison, never to stored text.
    """
    text = _DOTTED.sub(lambda m: re.sub(r"[.\s]", "", m.group(1)) + " ", text)
    text = re.sub(r"§+|\b(?:sections?|secs?\.?)\s+(?=\d)", " ", text, flags=re.IGNORECASE)
    text = _SUBSECTION.sub(r"\1", text)
    return re.sub(r"[ \t]+", " ", text)


def split_sentences(text: str) -> list[str]:
    """Split on ``.``, ``?``, ``!`` followed by a capital, unless the period closes a legal abbreviation.

    ``Brown v. Board of Education, 347 U. S. 483.`` stays one sentence; ``Mr. Justice Black`` too.
    """
    text = normalize_space(text)
    out: list[str] = []
    start = 0
    for m in re.finditer(r"[.?!][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])", text):
        end = m.start() + 1
        before = text[start:end]
        last = re.search(r"([A-Za-z'.]+)\.$", before)
        if m.group(0)[0] == "." and last:
            tok = last.group(1).lower().rstrip(".").split(".")[-1]
            if tok in _ABBREV or len(tok) == 1:
                continue
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def idf_table(texts: Iterable[str]) -> dict[str, float]:
    """Smoothed inverse document frequency ``log(1 + N / df)`` of each content token."""
    df: Counter[str] = Counter()
    n = 0
    for t in texts:
        n += 1
        df.update(content_set(t))
    return {w: math.log(1.0 + n / c) for w, c in df.items()}


def corpus_idf(texts: Iterable[str]) -> tuple[dict[str, float], float]:
    """``(idf_table(texts), default)`` with ``default`` the largest IDF (for unseen words), memoised on the texts.

    The index, the citation authorities and the closed-book memory all weigh words over the same corpus;
    this computes that table once per process. Treat the returned table as read-only.
    """
    return _corpus_idf(tuple(texts))


@lru_cache(maxsize=4)
def _corpus_idf(texts: tuple[str, ...]) -> tuple[dict[str, float], float]:
    idf = idf_table(texts)
    return idf, (max(idf.values()) if idf else 1.0)


def weighted_recall(needles: Iterable[str], haystack: set[str], idf: dict[str, float], default_idf: float) -> float:
    """IDF-weighted share of ``needles`` (content tokens) that appear in ``haystack``."""
    needles = set(needles)
    if not needles:
        return 0.0
    total = sum(idf.get(w, default_idf) for w in needles)
    hit = sum(idf.get(w, default_idf) for w in needles if w in haystack)
    return hit / total if total else 0.0


ORDINALS = [
    "zeroth", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth",
    "nineteenth", "twentieth", "twenty-first", "twenty-second", "twenty-third", "twenty-fourth", "twenty-fifth",
    "twenty-sixth", "twenty-seventh", "twenty-eighth", "twenty-ninth", "thirtieth",
]

_ROMAN = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
          (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]


def roman(n: int) -> str:
    """Roman numeral of a positive integer (``14 -> 'XIV'``)."""
    out = []
    for v, s in _ROMAN:
        while n >= v:
            out.append(s)
            n -= v
    return "".join(out)


def from_roman(s: str) -> int | None:
    """Integer value of a Roman numeral, or None when ``s`` is not one."""
    s = s.upper()
    if not s or not re.fullmatch(r"M{0,3}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})", s):
        return None
    vals = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    total = 0
    for i, ch in enumerate(s):
        v = vals[ch]
        total += -v if i + 1 < len(s) and vals[s[i + 1]] > v else v
    return total
