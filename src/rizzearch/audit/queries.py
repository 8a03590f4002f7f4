"""Load the bundled audit query set (or a user's own JSONL file with the same fields).

Every field of every line is checked before anything is returned (so before any answer is
generated), and a problem is a ``DataError`` naming ``file:line`` and the field:

=================  ========================================  =========
field              type                                      required
=================  ========================================  =========
``id``             non-empty string, unique in the file      yes
``category``       one of ``CATEGORIES``                     yes
``question``       non-empty string                          yes
``gold_answer``    non-empty string                          yes
``false_premise``  ``true`` or ``false``                     yes
``aliases``        list of non-empty strings                 no (``[]``)
``gold_passages``  list of non-empty strings (passage ids)   no (``[]``)
``family``         non-empty string                          no (the category)
=================  ========================================  =========

Any other field is an error too: a misspelt ``alias`` would otherwise be ignored without a word.
"""

from __future__ import annotations

from pathlib import Path

from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import DataError

DATA = Path(__file__).resolve().parent / "data" / "queries.jsonl"
REQUIRED = ("id", "category", "question", "gold_answer", "false_premise")
OPTIONAL = ("aliases", "gold_passages", "family")
CATEGORIES = ("general", "jurisdiction_time", "false_premise", "factual_recall")


def _kind(v) -> str:
    """A JSON-ish name of ``v``'s type for error messages (``null``, ``number``, ``list`` ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return "an empty string" if not v.strip() else "a string"
    return {"list": "a list", "dict": "an object"}.get(type(v).__name__, type(v).__name__)


def _text(q: dict, key: str) -> str | None:
    """The problem with ``q[key]`` as a non-empty string, or None when it is one."""
    v = q[key]
    return None if isinstance(v, str) and v.strip() else f"{key} must be a non-empty string, got {_kind(v)}"


def _text_list(q: dict, key: str) -> str | None:
    """The problem with ``q[key]`` as a list of non-empty strings, or None when it is one."""
    v = q[key]
    if not isinstance(v, list):
        hint = " (write [\"...\"] for one)" if isinstance(v, str) else ""
        return f"{key} must be a list of strings, got {_kind(v)}{hint}"
    for i, a in enumerate(v):
        if not isinstance(a, str) or not a.strip():
            return f"{key}[{i}] must be a non-empty string, got {_kind(a)}"
    return None


def check_query(q: dict) -> str | None:
    """What is wrong with one query object (field names, types, values), or None if nothing is."""
    unknown = sorted(set(q) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        return f"unknown field(s) {unknown}; a query has {list(REQUIRED)} and optionally {list(OPTIONAL)}"
    missing = [k for k in REQUIRED if k not in q]
    if missing:
        return f"missing field(s) {missing}"
    for key in ("id", "question", "gold_answer"):
        if (problem := _text(q, key)) is not None:
            return problem
    if not isinstance(q["category"], str) or q["category"] not in CATEGORIES:
        return f"category {q['category']!r} is not one of {list(CATEGORIES)}"
    if not isinstance(q["false_premise"], bool):
        return f"false_premise must be true or false, got {q['false_premise']!r}"
    for key in ("aliases", "gold_passages"):
        if key in q and (problem := _text_list(q, key)) is not None:
            return problem
    if "family" in q and (problem := _text(q, "family")) is not None:
        return problem
    return None


def load_queries(path: str | Path | None = None, *, categories: list[str] | tuple[str, ...] | None = None,
                 limit: int | None = None) -> list[dict]:
    """The audit queries as dicts (``id``, ``category``, ``question``, ``gold_answer``, ``false_premise``,
    ``family``, ``aliases`` and ``gold_passages``), every line of the file validated first.

    Args:
        path: a JSONL file of queries; default the bundled set (210 queries in the paper's four categories).
        categories: keep only these categories.
        limit: keep at most this many per category (first ones, in file order), for quick runs.
    """
    p = Path(path) if path else DATA
    if not p.is_file():
        raise DataError(f"{p}: query file not found")
    if categories is not None:
        bad = [c for c in categories if c not in CATEGORIES]
        if bad:
            raise DataError(f"unknown categories {bad}; choose from {list(CATEGORIES)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive number of queries per category, got {limit!r}")
    out: list[dict] = []
    seen: dict[str, int] = {}
    per_cat: dict[str, int] = {}
    for lineno, q in read_jsonl(p):
        problem = check_query(q)
        if problem is not None:
            raise DataError(f"{p}:{lineno}: {problem}")
        if q["id"] in seen:
            raise DataError(f"{p}:{lineno}: duplicate query id {q['id']!r} (first on line {seen[q['id']]})")
        seen[q["id"]] = lineno
        if categories is not None and q["category"] not in categories:
            continue
        if limit is not None and per_cat.get(q["category"], 0) >= limit:
            continue
        per_cat[q["category"]] = per_cat.get(q["category"], 0) + 1
        q.setdefault("aliases", [])
        q.setdefault("gold_passages", [])
        q.setdefault("family", q["category"])
        out.append(q)
    if not seen:
        raise DataError(f"{p}: no queries (the file is empty)")
    return out
