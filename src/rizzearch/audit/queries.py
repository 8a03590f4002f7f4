"""Load the bundled audit query set (or a user's own JSONL file with the same fields)."""

from __future__ import annotations

from pathlib import Path

from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import DataError

DATA = Path(__file__).resolve().parent / "data" / "queries.jsonl"
REQUIRED = ("id", "category", "question", "gold_answer", "false_premise")
CATEGORIES = ("general", "jurisdiction_time", "false_premise", "factual_recall")


def load_queries(path: str | Path | None = None, *, categories: list[str] | tuple[str, ...] | None = None,
                 limit: int | None = None) -> list[dict]:
    """The audit queries as dicts (``id``, ``category``, ``question``, ``gold_answer``, ``false_premise``,
    plus ``family``, ``aliases`` and ``gold_passages`` for the bundled set).

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
    out: list[dict] = []
    seen: set[str] = set()
    per_cat: dict[str, int] = {}
    for lineno, q in read_jsonl(p):
        missing = [k for k in REQUIRED if k not in q]
        if missing:
            raise DataError(f"{p}:{lineno}: missing field(s) {missing}")
        if q["category"] not in CATEGORIES:
            raise DataError(f"{p}:{lineno}: category {q['category']!r} is not one of {list(CATEGORIES)}")
        if not isinstance(q["false_premise"], bool):
            raise DataError(f"{p}:{lineno}: false_premise must be true or false, got {q['false_premise']!r}")
        if not isinstance(q["question"], str) or not q["question"].strip():
            raise DataError(f"{p}:{lineno}: empty question")
        if q["id"] in seen:
            raise DataError(f"{p}:{lineno}: duplicate query id {q['id']!r}")
        seen.add(q["id"])
        if categories is not None and q["category"] not in categories:
            continue
        if limit is not None and per_cat.get(q["category"], 0) >= limit:
            continue
        per_cat[q["category"]] = per_cat.get(q["category"], 0) + 1
        q.setdefault("aliases", [])
        q.setdefault("gold_passages", [])
        q.setdefault("family", q["category"])
        out.append(q)
    return out
