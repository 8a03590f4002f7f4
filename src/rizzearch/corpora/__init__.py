"""Corpora shipped inside the package, so a fresh clone works offline.

``list()`` names them; ``path(name)`` returns the file or folder. Origins, licenses and the
attribution each one needs are in ``SOURCES.md`` next to this file.

    >>> from rizzearch import corpora
    >>> corpora.path("tinyshakespeare").name
    'tinyshakespeare.txt'
"""

from __future__ import annotations

import builtins
from pathlib import Path

from rizzearch.errors import DataError

ROOT = Path(__file__).resolve().parent

_CORPORA: dict[str, tuple[str, str]] = {
    "tinyshakespeare": ("text/tinyshakespeare.txt", "Shakespeare's works, 1.1 MB of text (karpathy/char-rnn; public domain)"),
    "wikitext-2-valid": ("text/wikitext-2/valid.txt", "WikiText-2 validation split, tokenized (CC BY-SA 3.0)"),
    "wikitext-2-test": ("text/wikitext-2/test.txt", "WikiText-2 test split, tokenized (CC BY-SA 3.0)"),
    "hh-rlhf-harmless-test": (
        "preference/hh-rlhf-harmless-base-test.jsonl.gz",
        "Anthropic HH-RLHF harmless-base test split, 2,312 chosen/rejected dialogues (MIT)",
    ),
    "us-constitution": ("legal/constitution/usconstitution.full.json", "U.S. Constitution, structured JSON (public domain text; LII Cornell)"),
    "scotus": ("legal/scotus", "101 U.S. Supreme Court opinion prefixes with index.jsonl (public domain; LoC via jeffpar/lonedissent)"),
    "legalbench-rule-qa": ("legal/legalbench/rule_qa.tsv", "LegalBench rule_qa test split (CC BY 4.0)"),
    "legalbench-hearsay": ("legal/legalbench/hearsay.tsv", "LegalBench hearsay test split (CC BY 4.0)"),
    "legalbench-personal-jurisdiction": ("legal/legalbench/personal_jurisdiction.tsv", "LegalBench personal_jurisdiction test split (CC BY 4.0)"),
    "legalbench-overruling": ("legal/legalbench/overruling.tsv", "LegalBench overruling test split (CC BY 4.0)"),
}


def list() -> builtins.list[str]:  # noqa: A001  (the API name is part of the design)
    """Names of the bundled corpora."""
    return sorted(_CORPORA)


def describe(name: str) -> str:
    """One line on what the corpus is and its license."""
    return _CORPORA[_check(name)][1]


def path(name: str) -> Path:
    """Absolute path of corpus ``name`` (a file, or a folder for ``scotus``)."""
    p = ROOT / _CORPORA[_check(name)][0]
    if not p.exists():
        raise DataError(f"bundled corpus {name!r} is missing from the installation: {p}")
    return p


def _check(name: str) -> str:
    if name not in _CORPORA:
        raise DataError(f"unknown corpus {name!r}; bundled corpora: {', '.join(sorted(_CORPORA))}")
    return name
