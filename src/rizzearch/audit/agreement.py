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
