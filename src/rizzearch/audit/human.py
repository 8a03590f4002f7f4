"""Human labelling sheets (CSV) and agreement (Cohen's kappa).

``export_sheet`` writes one row per (system, query): the question, gold answer, the answer, its
citations with the existence verdicts, and the text of the cited passages, with empty
``human_correctness`` / ``human_groundedness`` columns to fill in (the automatic labels are hidden
unless ``blind=False``). ``import_sheet`` reads it back and rejects unknown labels, duplicate rows and
rows that are missing or unlabelled, naming the row.

Spreadsheets run a cell that begins with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return) as
a formula, so an answer such as ``=HYPERLINK(...)`` from an endpoint could act on the labeller's
machine: ``export_sheet`` writes such a cell (and one that already begins with ``'``) with a leading
``'``, the spreadsheet convention for "text", and ``import_sheet`` removes exactly that quote again,
so every value reads back as it was written.

``cohen_kappa`` is Cohen (1960):
``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_e`` from the two raters' marginal label frequencies. The
paper reports kappa = 0.77 between two human raters on 48 responses.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

from rizzearch.audit.labels import CORRECTNESS, GROUNDEDNESS, derived_label
from rizzearch.errors import DataError

FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")

COLUMNS = ["system", "query_id", "category", "question", "gold_answer", "answer", "citations", "cited_passages",
           "auto_correctness", "auto_groundedness", "human_correctness", "human_groundedness", "notes"]


def escape_cell(value) -> str:
    """``value`` as CSV text no spreadsheet runs as a formula: a leading ``'`` before a risky first character."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def unescape_cell(text: str | None) -> str:
    """Inverse of ``escape_cell`` (a cell a spreadsheet saved without the quote is returned as is)."""
    text = text or ""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


def export_sheet(rows: list[dict], path: str | Path, passages_by_id: dict | None = None, blind: bool = True,
                 max_passage_chars: int = 1500) -> Path:
    """Write a labelling CSV for ``rows`` (audit rows: system, query_id, category, question, gold_answer,
    answer, citations, correctness, groundedness); returns the path written.

    If ``path`` already holds human labels it is kept and the new sheet goes to ``<name>.new.csv``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and _has_human_labels(path):  # never overwrite labels someone already entered
        path = path.with_name(path.stem + ".new" + path.suffix)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            cites = r.get("citations", [])
            texts = []
            for c in cites:
                for pid in c.get("passage_ids", [])[:2]:
                    p = (passages_by_id or {}).get(pid)
                    if p is not None:
                        texts.append(f"[{pid}] {p.text[:max_passage_chars]}")
            w.writerow({k: escape_cell(v) for k, v in {
                "system": r["system"], "query_id": r["query_id"], "category": r.get("category", ""),
                "question": r.get("question", ""), "gold_answer": r.get("gold_answer", ""), "answer": r.get("answer", ""),
                "citations": "; ".join(f"{c['normalized']} [{c['existence']}"
                                       + ("" if c.get("supported") is None else f", supported={c['supported']}") + "]" for c in cites),
                "cited_passages": "\n\n".join(texts),
                "auto_correctness": "" if blind else r.get("correctness", ""),
                "auto_groundedness": "" if blind else (r.get("groundedness") or ""),
                "human_correctness": "", "human_groundedness": "", "notes": "",
            }.items()})
    os.replace(tmp, path)
    return path


def _has_human_labels(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return any((r.get("human_correctness") or "").strip() for r in csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return True  # unreadable: treat as precious


def import_sheet(path: str | Path, expected: list[tuple[str, str]] | None = None, allow_partial: bool = False) -> dict:
    """Read a filled-in sheet -> ``{(system, query_id): {"correctness", "groundedness", "label"}}``.

    Raises DataError naming the file and row for an unknown label, a correct answer without a
    groundedness label, a duplicate row, an unlabelled row (unless ``allow_partial``), or rows of
    ``expected`` that are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label sheet not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"system", "query_id", "human_correctness", "human_groundedness"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise DataError(f"{path}: header must contain {sorted(need)}, got {reader.fieldnames}")
        out: dict = {}
        unlabelled = []
        for i, row in enumerate(reader, 2):
            row = {k: unescape_cell(v) for k, v in row.items() if k is not None}
            key = (row["system"].strip(), row["query_id"].strip())
            if key in out:
                raise DataError(f"{path}: row {i}: duplicate row for system={key[0]!r} query_id={key[1]!r}")
            c = (row["human_correctness"] or "").strip().lower()
            g = (row["human_groundedness"] or "").strip().lower() or None
            if not c:
                unlabelled.append(i)
                continue
            if c not in CORRECTNESS:
                raise DataError(f"{path}: row {i}: human_correctness {c!r} is not one of {list(CORRECTNESS)}")
            if g is not None and g not in GROUNDEDNESS:
                raise DataError(f"{path}: row {i}: human_groundedness {g!r} is not one of {list(GROUNDEDNESS)} (or empty)")
            if c == "correct" and g is None:
                raise DataError(f"{path}: row {i}: a correct answer needs human_groundedness ({'/'.join(GROUNDEDNESS)})")
            if c != "correct":
                g = None
            out[key] = {"correctness": c, "groundedness": g, "label": derived_label(c, g)}
    if unlabelled and not allow_partial:
        raise DataError(f"{path}: {len(unlabelled)} row(s) have no human_correctness label (rows {unlabelled[:10]})")
    if expected is not None:
        missing = [k for k in expected if k not in out and not allow_partial]
        if missing:
            raise DataError(f"{path}: {len(missing)} expected row(s) missing, e.g. {missing[:5]}")
    return out


def cohen_kappa(a: list, b: list) -> float:
    """Cohen's kappa of two equally long label lists (1.0 when both raters use one identical label)."""
    if len(a) != len(b):
        raise DataError(f"kappa needs two equally long label lists, got {len(a)} and {len(b)}")
    if not a:
        raise DataError("kappa of zero items is undefined")
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if pe == 1.0:
        return 1.0 if po == 1.0 else 0.0
    return (po - pe) / (1 - pe)


def agreement(first: dict, second: dict) -> dict:
    """Kappa and raw agreement between two label maps ``{(system, query_id): {"correctness", "label", ...}}``."""
    keys = sorted(set(first) & set(second))
    if not keys:
        raise DataError("the two label sets share no (system, query_id) rows")
    out = {"n": len(keys)}
    for field in ("correctness", "label"):
        a = [first[k][field] for k in keys]
        b = [second[k][field] for k in keys]
        out[f"kappa_{field}"] = round(cohen_kappa(a, b), 4)
        out[f"agreement_{field}"] = round(sum(x == y for x, y in zip(a, b)) / len(keys), 4)
    return out
