"""Rates with bootstrap 95% intervals, per system and per query category.

The paper's headline numbers are shares of *all* queries: accurate, incomplete, hallucinated. We also
report hallucination among *answered* queries (the system did not refuse or abstain), the
correctness/groundedness breakdown, and citation statistics. Intervals are percentile bootstraps over
queries (``n_boot`` resamples, numpy ``default_rng(seed)``), so reruns give identical numbers. The
paired difference between two systems resamples the same queries for both.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rizzearch.audit.labels import CATEGORIES, DERIVED


def _seed(seed: int, *keys: str) -> int:
    h = hashlib.sha256(("|".join(keys) + f"|{seed}").encode()).digest()
    return int.from_bytes(h[:8], "big")


def bootstrap_ci(x, n_boot: int = 2000, seed: int = 0, key: str = "") -> tuple[float, float, float]:
    """(mean, low, high): percentile 95% interval of the mean of a 0/1 (or real) vector."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(_seed(seed, key))
    idx = rng.integers(0, x.size, size=(n_boot, x.size))  # (B, n)
    means = x[idx].mean(axis=1)  # (B,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def _rate(rows: list[dict], pred, n_boot: int, seed: int, key: str) -> dict:
    if not rows:  # undefined (e.g. hallucination among answered when nothing was answered)
        return {"rate": None, "ci95": [None, None], "n": 0}
    m, lo, hi = bootstrap_ci([1.0 if pred(r) else 0.0 for r in rows], n_boot, seed, key)
    return {"rate": round(m, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(rows)}


def answered(r: dict) -> bool:
    return r["correctness"] != "refusal" and r.get("status", "answered") == "answered"


def summarize(rows: list[dict], n_boot: int = 2000, seed: int = 0, key: str = "") -> dict:
    """Shares of the derived labels and the primary labels over ``rows`` (label dicts without errors)."""
    out: dict = {"n": len(rows)}
    for lab in DERIVED:
        out[lab] = _rate(rows, lambda r, lab=lab: r["label"] == lab, n_boot, seed, f"{key}/{lab}")
    ans = [r for r in rows if answered(r)]
    out["answered"] = len(ans)
    out["hallucinated_among_answered"] = _rate(ans, lambda r: r["hallucinated"], n_boot, seed, f"{key}/hall_ans")
    for lab in ("correct", "incorrect", "refusal"):
        out[lab] = round(sum(r["correctness"] == lab for r in rows) / max(1, len(rows)), 4)
    for lab in ("grounded", "misgrounded", "ungrounded"):
        out[lab] = round(sum(r["groundedness"] == lab for r in rows) / max(1, len(rows)), 4)
    cites = [c for r in rows for c in r.get("citations", [])]
    out["citations"] = {
        "total": len(cites),
        "per_answer": round(len(cites) / max(1, len(rows)), 3),
        "nonexistent": sum(c["existence"] == "nonexistent" for c in cites),
        "unverifiable": sum(c["existence"] == "unverifiable" for c in cites),
        "unsupported": sum(c.get("supported") is False for c in cites),
    }
    judged = [c["judge"] for c in cites if c.get("judge") and c["judge"].get("valid")]
    if judged:  # how much the LLM judge disagreed with itself across its runs
        out["judge"] = {"citations": len(judged),
                        "mean_stdev": round(sum(j["stdev"] for j in judged) / len(judged), 4),
                        "share_runs_disagree": round(sum(j["spread"] > 0 for j in judged) / len(judged), 4),
                        "invalid_replies": sum(j["runs"] - j["valid"] for j in judged)}
    return out


def retrieval_quality(rows: list[dict], n_boot: int = 2000, seed: int = 0, key: str = "") -> dict | None:
    """How well the retrieved passages (``retrieved``, ranked) find the query's ``gold_passages``.

    Over rows with gold passages and a retrieval (closed-book systems retrieve nothing: None):
    ``recall_at_k`` = share of a query's gold passages among the k retrieved, ``hit_at_k`` = at least one
    gold passage retrieved, ``mrr`` = mean of 1 / rank of the first gold passage (0 when none), each with
    a bootstrap 95% interval over queries; ``k`` = the most passages any row retrieved.
    """
    use = [r for r in rows if r.get("gold_passages") and r.get("retrieved")]
    if not use:
        return None
    rec, hit, rr = [], [], []
    for r in use:
        gold, got = set(r["gold_passages"]), r["retrieved"]
        rec.append(len(gold & set(got)) / len(gold))
        hit.append(float(bool(gold & set(got))))
        rr.append(next((1.0 / (i + 1) for i, pid in enumerate(got) if pid in gold), 0.0))
    out: dict = {"n": len(use), "k": max(len(r["retrieved"]) for r in use)}
    for name, xs in (("recall_at_k", rec), ("hit_at_k", hit), ("mrr", rr)):
        m, lo, hi = bootstrap_ci(xs, n_boot, seed, f"{key}/retrieval/{name}")
        out[name] = {"rate": round(m, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return out


def compute_metrics(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Metrics for every system in ``rows`` (each row: ``system``, ``query_id``, ``category``, labels, ``status``).

    Returns ``{"systems": {name: {"overall": ..., "by_category": {...}, "errors": n, "retrieval": ...}}, "paired": {...}}``
    (``retrieval``: ``retrieval_quality`` of the system's rows, also inside each category).
    """
    systems = sorted({r["system"] for r in rows}, key=lambda s: (_ORDER.get(s, 99), s))
    out: dict = {"systems": {}, "n_boot": n_boot, "seed": seed}
    for s in systems:
        mine = [r for r in rows if r["system"] == s]
        ok = [r for r in mine if r.get("status") != "error"]
        entry = {"overall": summarize(ok, n_boot, seed, s), "errors": len(mine) - len(ok), "by_category": {},
                 "retrieval": retrieval_quality(ok, n_boot, seed, s)}
        for cat in CATEGORIES:
            sub = [r for r in ok if r["category"] == cat]
            if sub:
                entry["by_category"][cat] = summarize(sub, n_boot, seed, f"{s}/{cat}")
                entry["by_category"][cat]["retrieval"] = retrieval_quality(sub, n_boot, seed, f"{s}/{cat}")
        out["systems"][s] = entry
    out["paired"] = {}
    for a in systems:
        for b in systems:
            if a < b or a == b:
                continue
            d = paired_difference(rows, b, a, "hallucinated", n_boot, seed)
            if d:
                out["paired"][f"{a} - {b}"] = d
    return out


_ORDER = {"closed_book": 0, "naive_rag": 1, "verified_rag": 2}


def paired_difference(rows: list[dict], sys_a: str, sys_b: str, label: str = "hallucinated", n_boot: int = 2000,
                      seed: int = 0) -> dict | None:
    """Rate(sys_b) - rate(sys_a) of ``label`` on the queries both answered, with a paired bootstrap CI."""
    a = {r["query_id"]: r for r in rows if r["system"] == sys_a and r.get("status") != "error"}
    b = {r["query_id"]: r for r in rows if r["system"] == sys_b and r.get("status") != "error"}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    pick = (lambda r: r["label"] == label) if label in DERIVED else (lambda r: bool(r.get(label)))
    d = [float(pick(b[q])) - float(pick(a[q])) for q in common]
    m, lo, hi = bootstrap_ci(d, n_boot, seed, f"paired/{sys_a}/{sys_b}/{label}")
    return {"diff": round(m, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(common), "label": label}
