"""Agreement of the automatic labeller with hand labels: our development set and expert-labelled data.

* ``devset_agreement``: the bundled development set (``audit/data/devset.jsonl``): answers written by hand
  in the styles real language models produce, each labelled by hand (correctness, groundedness) from
  the gold answer and the corpus, never by running the labeller. Each answer has a fixed ``split``
  (``tune`` / ``report``, from a hash of its id, fixed before any threshold was tuned): thresholds are tuned
  on ``tune`` only and the agreement reported in docs/legal_rag.md is on ``report``.
* ``expert_agreement``: the released half of Magesh et al.'s data (``reglab/legal_rag_hallucinations``:
  ``questions.csv`` and ``dataset.csv``, 400 expert-labelled responses): our labeller labels each response
  and we report Cohen's kappa and the confusion matrix against the experts, per system and per category,
  next to the paper's inter-annotator kappa (0.77).

Cohen's kappa is ``audit.human.cohen_kappa``: ``(p_o - p_e) / (1 - p_e)``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from importlib import resources
from pathlib import Path

from rizzearch.audit.human import cohen_kappa
from rizzearch.audit.labels import CORRECTNESS, GROUNDEDNESS, LabelConfig, label_response
from rizzearch.audit.queries import load_queries
from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import DataError

PAPER_KAPPA = 0.77  # Magesh et al.: two raters on 48 responses
SPLITS = ("tune", "report")


def split_of(item_id: str) -> str:
    """``tune`` or ``report``: the parity of the first byte of sha256(id) (fixed, independent of any label)."""
    return SPLITS[hashlib.sha256(item_id.encode()).digest()[0] % 2]


def load_devset(path: str | Path | None = None) -> list[dict]:
    """The development set rows (``id``, ``query_id``, ``answer``, ``correctness``, ``groundedness``,
    ``hallucinated``, ``split``, ``style``, ``category``), validated."""
    if path is None:
        text = resources.files("rizzearch.audit.data").joinpath("devset.jsonl").read_text(encoding="utf-8")
        path = "devset.jsonl"
    else:
        text = Path(path).read_text(encoding="utf-8")
    rows = []
    for lineno, r in read_jsonl(path, text):
        where = f"{path}:{lineno}"
        if r.get("correctness") not in CORRECTNESS:
            raise DataError(f"{where}: correctness {r.get('correctness')!r} is not one of {list(CORRECTNESS)}")
        g = r.get("groundedness")
        if (r["correctness"] == "correct") != (g in GROUNDEDNESS):
            raise DataError(f"{where}: groundedness {g!r} must be one of {list(GROUNDEDNESS)} exactly when correct")
        if r.get("split") != split_of(str(r.get("id"))):
            raise DataError(f"{where}: split {r.get('split')!r} is not the hash split {split_of(str(r.get('id')))!r}")
        if not isinstance(r.get("answer"), str):
            raise DataError(f"{where}: answer must be a string")
        rows.append(r)
    return rows


def agreement_stats(human: list, auto: list) -> dict:
    """Accuracy, Cohen's kappa and the confusion matrix (``"human|auto"`` -> count) of two label lists."""
    n = len(human)
    if n == 0:
        return {"n": 0, "accuracy": None, "kappa": None, "confusion": {}}
    conf = Counter(f"{h}|{a}" for h, a in zip(human, auto))
    return {"n": n, "accuracy": round(sum(h == a for h, a in zip(human, auto)) / n, 4),
            "kappa": round(cohen_kappa(list(human), list(auto)), 4), "confusion": dict(sorted(conf.items()))}


def label_devset(rows: list[dict], config: LabelConfig | None = None, authorities=None) -> list[dict]:
    """The labeller's labels of each development-set answer (its own bundled query set)."""
    qs = {q["id"]: q for q in load_queries()}
    out = []
    for r in rows:
        if r["query_id"] not in qs:
            raise DataError(f"devset item {r['id']!r}: unknown query id {r['query_id']!r}")
        out.append(label_response(qs[r["query_id"]], r["answer"], authorities=authorities, config=config))
    return out


def devset_agreement(split: str | None = "report", config: LabelConfig | None = None, path=None,
                     authorities=None) -> dict:
    """Agreement of the labeller with the hand labels on one split (``None``: all), overall and per category.

    Returns ``{"split", "n", "hallucinated": stats, "correctness": stats, "by_category": {...}, "disagreements"}``.
    """
    rows = [r for r in load_devset(path) if split is None or r["split"] == split]
    labs = label_devset(rows, config, authorities)
    out: dict = {"split": split or "all", "n": len(rows)}

    def stats(idx):
        return {"hallucinated": agreement_stats([rows[i]["hallucinated"] for i in idx], [labs[i]["hallucinated"] for i in idx]),
                "correctness": agreement_stats([rows[i]["correctness"] for i in idx], [labs[i]["correctness"] for i in idx])}

    out.update(stats(range(len(rows))))
    out["by_category"] = {c: stats([i for i, r in enumerate(rows) if r["category"] == c])
                          for c in sorted({r["category"] for r in rows})}
    out["disagreements"] = [{"id": r["id"], "human": [r["correctness"], r["groundedness"]],
                             "auto": [lab["correctness"], lab["groundedness"]]}
                            for r, lab in zip(rows, labs)
                            if r["hallucinated"] != lab["hallucinated"] or r["correctness"] != lab["correctness"]]
    return out


# --------------------------------------------------------------------------------------------
# Expert labels: reglab/legal_rag_hallucinations (Magesh et al.), dataset.csv + questions.csv
# --------------------------------------------------------------------------------------------

# Our field -> header names accepted for it, in order of preference (compared case-insensitively, with spaces,
# underscores and hyphens ignored). The public release's dataset.csv has one row per (question, tool) with the
# tool's response and the experts' correctness and groundedness; questions.csv one row per question.
EXPERT_COLUMNS = {
    "question_id": ("question id", "qid", "query id", "id"),
    "system": ("model", "system", "tool"),
    "response": ("response", "model response", "output", "answer"),
    "correctness": ("correctness", "correct"),
    "groundedness": ("groundedness", "grounded"),
}
QUESTION_COLUMNS = {
    "question_id": ("question id", "qid", "query id", "id"),
    "question": ("question", "query", "prompt"),
    "category": ("question category", "category", "query category", "query type", "type"),
    "gold_answer": ("gold answer", "reference answer", "correct answer", "answer", "reference"),
}
_EXPERT_CORRECTNESS = {"correct": "correct", "incorrect": "incorrect", "refusal": "refusal", "refused": "refusal",
                       "refuse": "refusal"}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _map_columns(path: Path, header: list[str] | None, spec: dict) -> dict:
    """Our field -> the file's column name; DataError listing the columns found when one is missing."""
    found = {_key(h): h for h in (header or [])}
    out, missing = {}, []
    for field, names in spec.items():
        hit = next((found[_key(n)] for n in names if _key(n) in found), None)
        if hit is None:
            missing.append(f"{field} (one of {', '.join(repr(n) for n in names)})")
        out[field] = hit
    if missing:
        raise DataError(f"{path}: missing column(s) {'; '.join(missing)}; columns found: {list(header or [])}")
    return out


def _read_csv(path: str | Path, spec: dict) -> list[tuple[int, dict]]:
    """``[(line, {field: value})]`` of a CSV whose columns are mapped by name (see ``_map_columns``)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = _map_columns(path, reader.fieldnames, spec)
            return [(reader.line_num, {f: (row.get(c) or "").strip() for f, c in cols.items()}) for row in reader]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text CSV ({e.reason})") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from e


def our_category(raw: str) -> str:
    """The paper's category names in any spelling -> ours (``general`` when none matches)."""
    k = raw.lower()
    if "false" in k or "premise" in k:
        return "false_premise"
    if "jurisdiction" in k or "time" in k:
        return "jurisdiction_time"
    if "factual" in k or "recall" in k:
        return "factual_recall"
    return "general"


def load_expert(expert: str | Path, questions: str | Path) -> list[dict]:
    """Expert-labelled responses joined with their questions: ``system``, ``query`` (a labeller query dict),
    ``category`` (the file's), ``response``, expert ``correctness`` / ``groundedness`` / ``hallucinated``."""
    qs: dict = {}
    for line, r in _read_csv(questions, QUESTION_COLUMNS):
        if not r["question_id"] or not r["question"]:
            raise DataError(f"{questions}:{line}: empty question id or question")
        if r["question_id"] in qs:
            raise DataError(f"{questions}:{line}: duplicate question id {r['question_id']!r}")
        cat = our_category(r["category"])
        qs[r["question_id"]] = {"id": r["question_id"], "question": r["question"], "gold_answer": r["gold_answer"],
                                "category": cat, "false_premise": cat == "false_premise", "raw_category": r["category"]}
    out = []
    for line, r in _read_csv(expert, EXPERT_COLUMNS):
        q = qs.get(r["question_id"])
        if q is None:
            raise DataError(f"{expert}:{line}: question id {r['question_id']!r} is not in {questions}")
        c = _EXPERT_CORRECTNESS.get(r["correctness"].lower())
        if c is None:
            raise DataError(f"{expert}:{line}: correctness {r['correctness']!r} is not one of {list(CORRECTNESS)}")
        g = r["groundedness"].lower() or None
        if c == "correct" and g not in GROUNDEDNESS:
            raise DataError(f"{expert}:{line}: a correct response needs groundedness in {list(GROUNDEDNESS)}, got {g!r}")
        if not q["gold_answer"] and not q["false_premise"]:
            raise DataError(f"{questions}: question {q['id']!r} has no gold answer: the labeller needs one to judge correctness")
        g = g if c == "correct" else None
        out.append({"system": r["system"] or "?", "query": q, "category": q["raw_category"] or q["category"],
                    "response": r["response"], "correctness": c, "groundedness": g,
                    "hallucinated": c == "incorrect" or g == "misgrounded", "line": line})
    if not out:
        raise DataError(f"{expert}: no expert-labelled responses")
    return out


def _stats_block(rows: list[dict], labs: list[dict]) -> dict:
    return {"n": len(rows),
            "hallucinated": agreement_stats([r["hallucinated"] for r in rows], [lab["hallucinated"] for lab in labs]),
            "correctness": agreement_stats([r["correctness"] for r in rows], [lab["correctness"] for lab in labs]),
            "label": agreement_stats([derived(r) for r in rows], [lab["label"] for lab in labs])}


def derived(r: dict) -> str:
    from rizzearch.audit.labels import derived_label

    return derived_label(r["correctness"], r["groundedness"])


def expert_agreement(expert: str | Path, questions: str | Path, *, authorities=None,
                     config: LabelConfig | None = None) -> dict:
    """Our labeller against the experts: kappa, accuracy and confusion (``"expert|ours"``), overall, per system
    and per category, next to the paper's inter-annotator kappa."""
    rows = load_expert(expert, questions)
    labs = [label_response(r["query"], r["response"], authorities=authorities, config=config) for r in rows]
    out = {"n": len(rows), "paper_inter_annotator_kappa": PAPER_KAPPA, "overall": _stats_block(rows, labs)}
    for key, field in (("by_system", "system"), ("by_category", "category")):
        out[key] = {}
        for v in sorted({r[field] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r[field] == v]
            out[key][v] = _stats_block([rows[i] for i in idx], [labs[i] for i in idx])
    cites = [c for lab in labs for c in lab["citations"]]
    out["citations"] = {"total": len(cites), **Counter(c["existence"] for c in cites)}
    return out


def agreement_markdown(res: dict) -> str:
    """The expert agreement as a report: kappa per system and per category beside the paper's 0.77, then the
    hallucination confusion matrices (rows: experts, columns: our labeller)."""
    lines = ["# Our labeller against expert labels (Magesh et al.)", "",
             f"{res['n']} expert-labelled responses. The paper's inter-annotator kappa: {res['paper_inter_annotator_kappa']}.",
             "", "| rows | n | hallucinated: kappa | accuracy | correctness: kappa | accuracy | 3 labels: kappa |",
             "|---|---|---|---|---|---|---|"]

    def row(name, b):
        h, c, lab = b["hallucinated"], b["correctness"], b["label"]
        return f"| {name} | {b['n']} | {h['kappa']} | {h['accuracy']} | {c['kappa']} | {c['accuracy']} | {lab['kappa']} |"

    lines.append(row("all", res["overall"]))
    lines += [row(f"system: {k}", v) for k, v in res["by_system"].items()]
    lines += [row(f"category: {k}", v) for k, v in res["by_category"].items()]
    lines += ["", "Hallucinated (expert | ours): confusion counts", "", "| rows | T/T | T/F | F/T | F/F |", "|---|---|---|---|---|"]
    for name, b in [("all", res["overall"]), *res["by_system"].items()]:
        cf = b["hallucinated"]["confusion"]
        lines.append(f"| {name} | " + " | ".join(str(cf.get(k, 0)) for k in ("True|True", "True|False", "False|True",
                                                                              "False|False")) + " |")
    cites = res["citations"]
    lines += ["", f"Citations read: {cites['total']} (" + ", ".join(f"{k} {v}" for k, v in cites.items() if k != "total")
              + "). Citations to authorities outside the index are unverifiable: they neither ground nor misground.", ""]
    return "\n".join(lines)


def agreement_command(expert: str, questions: str, out: str | None = None) -> dict:
    """Label expert-labelled responses (reglab/legal_rag_hallucinations) with our labeller; report Cohen's kappa.

    Args:
        expert: dataset.csv: one row per response, columns question id, model, response, correctness, groundedness
            (matched by name, case-insensitively).
        questions: questions.csv: question id, question, category and a gold answer per question.
        out: folder for agreement.json and agreement.md (default: print only).
    """
    from rizzearch.runs import atomic_write_text

    res = expert_agreement(expert, questions)
    md = agreement_markdown(res)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "agreement.json", json.dumps(res, indent=2))
        atomic_write_text(Path(out) / "agreement.md", md)
    print(md)
    return res
