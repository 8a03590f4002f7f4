"""Run systems over queries, label every answer, compute metrics, write the report. Resumable.

Answers go to ``OUT/answers.jsonl``, one line per (system, query), appended and flushed as soon as
each answer exists. A rerun skips every (system, query) already answered (same question text) and
redoes only missing ones and ``error`` rows (an unreachable endpoint, say), so an interrupted audit
loses at most the answer in flight and never redoes finished work. A partial last line left by a
kill is dropped on resume. Labels (``labels.jsonl``), ``metrics.json`` and the report are recomputed
from the answers on every run (labelling is deterministic and fast).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rizzearch.audit.labels import label_response
from rizzearch.audit.metrics import compute_metrics
from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import DataError, RizzError
from rizzearch.legal.citations import Authorities
from rizzearch.runs import atomic_write_text


def _load_answers(path: Path) -> dict[tuple[str, str], dict]:
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a write cut short by a kill: drop the unfinished line
        keep = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(keep)
        raw = keep
    out = {}
    try:
        for lineno, row in read_jsonl(path, raw.decode("utf-8")):
            if "system" not in row or "query_id" not in row:
                raise DataError(f"{path}:{lineno}: corrupt answer row (no 'system' or 'query_id')")
            out[(row["system"], row["query_id"])] = row  # later lines (a retried error) win
    except DataError as e:
        raise DataError(f"{e}; fix or remove that line to resume") from e
    return out


def run_audit(systems: dict, queries: list[dict], out_dir: str | Path, *, resume: bool = True, progress: bool = True,
              authorities: Authorities | None = None, judge=None, n_boot: int = 2000, seed: int = 0,
              max_new: int | None = None) -> dict:
    """Answer every query with every system (skipping finished ones), label, and compute metrics.

    Args:
        systems: ``{name: System}``.
        queries: query dicts (``load_queries()``).
        out_dir: run folder.
        resume: keep finished answers of an earlier run in ``out_dir``; if False an existing
            ``answers.jsonl`` is renamed (never deleted) and the audit starts over.
        progress: show a tqdm bar.
        authorities: the corpus to check citations against (default: the bundled corpus).
        judge: optional LLM judge of support.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        max_new: answer at most this many new (system, query) pairs, then stop (for tests of resuming).

    Returns:
        ``{"rows": [...], "metrics": {...}, "new_answers": n, "reused_answers": n}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ans_path = out / "answers.jsonl"
    if not resume and ans_path.exists():
        ans_path.rename(out / f"answers.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    done = _load_answers(ans_path)
    todo = [(s, q) for s in systems for q in queries
            if not ((s, q["id"]) in done and done[(s, q["id"])]["status"] != "error"
                    and done[(s, q["id"])]["question"] == q["question"])]
    reused = len(systems) * len(queries) - len(todo)
    new = 0
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="audit", unit="answer")
    primed = set()
    for s, q in todo[: max_new if max_new is not None else len(todo)]:
        idx = getattr(systems[s], "index", None)
        if idx is not None and id(idx) not in primed:
            primed.add(id(idx))
            idx.prime([q2["question"] for s2, q2 in todo if getattr(systems[s2], "index", None) is idx])
    with open(ans_path, "a", encoding="utf-8") as fh:
        for s, q in todo:
            if max_new is not None and new >= max_new:
                break
            t0 = time.perf_counter()
            try:
                a = systems[s].answer(q["question"])
                row = {"system": s, "query_id": q["id"], "question": q["question"], "answer": a.text, "status": a.status,
                       "passages": [{k: p[k] for k in ("id", "ref", "score", "bm25_rank", "dense_rank")} for p in a.passages],
                       "checks": a.checks, "generator": a.generator, "latency_s": round(a.latency_s, 4), "error": None}
            except RizzError as e:
                row = {"system": s, "query_id": q["id"], "question": q["question"], "answer": "", "status": "error",
                       "passages": [], "checks": {}, "generator": "", "latency_s": round(time.perf_counter() - t0, 4),
                       "error": str(e)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            done[(s, q["id"])] = row
            new += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    rows = []
    for s in systems:
        for q in queries:
            a = done.get((s, q["id"]))
            if a is None:
                continue
            base = {"system": s, "query_id": q["id"], "category": q["category"], "family": q.get("family", ""),
                    "question": q["question"], "gold_answer": q["gold_answer"], "answer": a["answer"],
                    "status": a["status"], "error": a.get("error")}
            if a["status"] == "error":
                rows.append({**base, "correctness": None, "groundedness": None, "hallucinated": None, "label": "error",
                             "citations": [], "notes": [a.get("error")]})
                continue
            lab = label_response(q, a["answer"], authorities=authorities, judge=judge)
            rows.append({**base, **{k: v for k, v in lab.items() if k not in ("query_id", "category")}})
    atomic_write_text(out / "labels.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = compute_metrics(rows, n_boot=n_boot, seed=seed)
    metrics["n_queries"] = len(queries)
    metrics["complete"] = all((s, q["id"]) in done for s in systems for q in queries)
    for s, e in metrics["systems"].items():  # what produced the answers (e.g. "simulated closed-book (...)"), for the report
        e["generator"] = str(getattr(systems.get(s), "generator_label", "") or "")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return {"rows": rows, "metrics": metrics, "new_answers": new, "reused_answers": reused}
