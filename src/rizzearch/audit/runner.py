"""Run systems over queries, label every answer, compute metrics, write the report. Resumable.

Answers go to ``OUT/answers.jsonl``, one line per (system, query), appended and flushed as soon as
each chunk of answers exists (a chunk: every system's answer to a few queries, generated in one batched call). A rerun skips every (system, query) already answered (same question text) and
redoes only missing ones and ``error`` rows (an unreachable endpoint, say), so an interrupted audit
loses at most the chunk in flight and never redoes finished work. A partial last line left by a
kill is dropped on resume.

Answers are only reused under the settings that made them: the caller (``rizz audit``) describes them
(systems, generator and its options, k, retrieval mode, index and query file contents) and
``run_audit`` keeps that description in ``OUT/audit_settings.json``. A resume under other settings is
refused before anything is read or written, naming every setting that differs; ``resume=False`` sets
the old answers and settings aside under new names (never deleted) and starts over. Labels (``labels.jsonl``), ``metrics.json`` and the report are recomputed
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

SETTINGS_FILE = "audit_settings.json"


def _flatten(d, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def settings_diff(saved: dict, now: dict) -> list[str]:
    """``["key: saved -> now", ...]`` for every (dotted) setting that differs."""
    a, b = _flatten(saved), _flatten(now)
    missing = object()
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, missing), b.get(k, missing)
        if x != y:
            show = (lambda v: "(absent)" if v is missing else json.dumps(v)[:80])
            out.append(f"{k}: {show(x)} -> {show(y)}")
    return out


def _set_aside(path: Path) -> None:
    """Rename ``path`` to ``<stem>.<time>[.n]<suffix>`` beside it (a name not taken: never replace a file)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while True:
        new = path.with_name(f"{path.stem}.{stamp}{'' if n == 0 else f'.{n}'}{path.suffix}")
        if not new.exists():
            path.rename(new)
            return
        n += 1


def check_settings(out: Path, settings: dict, resume: bool) -> None:
    """Make ``out`` ready for an audit under ``settings``, or refuse (DataError) before touching anything.

    With ``resume`` and answers already in ``out``, their recorded settings must equal ``settings``.
    Without ``resume``, earlier answers and settings are set aside (renamed). Then ``settings`` is saved.
    """
    ans, path = out / "answers.jsonl", out / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # the form it takes on disk (tuples -> lists)
    has_answers = ans.is_file() and ans.stat().st_size > 0
    if resume and has_answers:
        how = "rerun with --resume false (the old answers are kept, renamed) or use another --out"
        if not path.is_file():
            raise DataError(f"{out}: holds answers from an audit whose settings were not recorded, so they cannot "
                            f"be reused safely; {how}")
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: unreadable ({e}); {how}") from e
        diff = settings_diff(saved, settings)
        if diff:
            raise DataError(f"{out}: holds answers made under other settings ({'; '.join(diff)}); {how}")
    if not resume:
        for p in (ans, path):
            if p.exists():
                _set_aside(p)
    atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")


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
              max_new: int | None = None, settings: dict | None = None, chunk_size: int = 24) -> dict:
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
        settings: what decides the answers (JSON-able); saved in ``out_dir``, and a resume under other
            settings is refused (``check_settings``). None: not checked (library use that keys folders itself).
        chunk_size: (system, query) pairs prepared together; each generator answers a chunk's drafts in one
            batched call (``generate_batch``), and a chunk's rows are written as soon as it is done.

    Returns:
        ``{"rows": [...], "metrics": {...}, "new_answers": n, "reused_answers": n, "timing": {...}}``; ``timing`` (also
        ``OUT/timing.json``; kept out of the deterministic metrics) holds the time split (retrieval, generation with its
        prefill and decode, verification, labelling) and answers per second.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ans_path = out / "answers.jsonl"
    if settings is not None:
        check_settings(out, settings, resume)
    elif not resume and ans_path.exists():
        _set_aside(ans_path)
    done = _load_answers(ans_path)
    todo = [(s, q) for s in systems for q in queries
            if not ((s, q["id"]) in done and done[(s, q["id"])]["status"] != "error"
                    and done[(s, q["id"])]["question"] == q["question"])]
    reused = len(systems) * len(queries) - len(todo)
    if max_new is not None:
        todo = todo[:max_new]
    t0 = time.perf_counter()
    new, split = _answer_all(systems, todo, ans_path, done, progress, chunk_size)
    t1 = time.perf_counter()
    rows = _label_all(systems, queries, done, authorities, judge)
    split["labelling_s"] = time.perf_counter() - t1
    atomic_write_text(out / "labels.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    metrics = compute_metrics(rows, n_boot=n_boot, seed=seed)
    metrics["n_queries"] = len(queries)
    metrics["complete"] = all((s, q["id"]) in done for s in systems for q in queries)
    for s, e in metrics["systems"].items():  # what produced the answers (e.g. "simulated closed-book (...)"), for the report
        e["generator"] = str(getattr(systems.get(s), "generator_label", "") or "")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    timing = timing_summary(split, new, len(rows), time.perf_counter() - t0)
    atomic_write_text(out / "timing.json", json.dumps(timing, indent=2))
    return {"rows": rows, "metrics": metrics, "new_answers": new, "reused_answers": reused, "timing": timing}


def timing_summary(split: dict, new_answers: int, labelled: int, wall_s: float) -> dict:
    """The audit's time split (seconds, rounded), answers per second and the share of each phase.

    ``answers_per_s`` = new answers / (answering + labelling wall seconds of this run); labelling covers every
    row (reused ones too), so a resumed run reads low."""
    out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in split.items()}
    out |= {"new_answers": new_answers, "labelled_rows": labelled, "wall_s": round(wall_s, 3),
            "answers_per_s": round(new_answers / wall_s, 4) if wall_s > 0 else None}
    return out


def _error_row(s: str, q: dict, error: str, latency_s: float) -> dict:
    return {"system": s, "query_id": q["id"], "question": q["question"], "answer": "", "status": "error",
            "passages": [], "checks": {}, "generator": "", "latency_s": round(latency_s, 4), "error": error}


def _row(s: str, q: dict, a) -> dict:
    """An answer object (``text``, ``status``, ``passages``, ``checks``, ``generator``, ``latency_s``) as a row of answers.jsonl."""
    return {"system": s, "query_id": q["id"], "question": q["question"], "answer": a.text, "status": a.status,
            "passages": [{k: p[k] for k in ("id", "ref", "score", "bm25_rank", "dense_rank")} for p in a.passages],
            "checks": a.checks, "generator": a.generator, "latency_s": round(a.latency_s, 4), "error": None}


def _answer_row(system, s: str, q: dict) -> dict:
    """One answer of ``system`` (named ``s``) to ``q`` as a row of answers.jsonl (an ``error`` row on RizzError)."""
    t0 = time.perf_counter()
    try:
        return _row(s, q, system.answer(q["question"]))
    except RizzError as e:
        return _error_row(s, q, str(e), time.perf_counter() - t0)


def new_split() -> dict:
    """An empty time split of answering: retrieval (``prepare``), generation (its prefill and decode when the generator
    reports them), verification (``complete``), seconds each."""
    return {"retrieval_s": 0.0, "generation_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "verification_s": 0.0,
            "prompt_tokens": 0, "new_tokens": 0}


def _generate(gen, requests: list) -> list:
    """Texts for ``requests`` (an exception in place of a text that failed): ``generate_batch`` when the generator has it."""
    if hasattr(gen, "generate_batch"):
        try:
            return list(gen.generate_batch(requests))
        except RizzError as e:
            return [e] * len(requests)
    out: list = []
    for r in requests:
        try:
            out.append(gen.generate(r))
        except RizzError as e:
            out.append(e)
    return out


def _answer_chunk(systems: dict, chunk: list[tuple[str, dict]], split: dict) -> list[dict]:
    """Rows for ``chunk``: every system ``prepare``s its questions, each generator answers all their drafts in one
    batched call, then every system ``complete``s its drafts. Systems without ``prepare`` answer one at a time."""
    rows: dict[int, dict] = {}
    pending: dict[int, list[tuple[int, str, dict, object]]] = {}  # id(generator) -> [(position, system, query, draft)]
    gens: dict[int, object] = {}
    for i, (s, q) in enumerate(chunk):
        system, t0 = systems[s], time.perf_counter()
        if not hasattr(system, "prepare"):
            rows[i] = _answer_row(system, s, q)
            split["generation_s"] += time.perf_counter() - t0
            continue
        try:
            got = system.prepare(q["question"])
        except RizzError as e:
            rows[i] = _error_row(s, q, str(e), time.perf_counter() - t0)
            continue
        finally:
            split["retrieval_s"] += time.perf_counter() - t0
        if hasattr(got, "request"):
            gens[id(system.generator)] = system.generator
            pending.setdefault(id(system.generator), []).append((i, s, q, got))
        else:
            rows[i] = _row(s, q, got)
    for g, items in pending.items():
        t0 = time.perf_counter()
        texts = _generate(gens[g], [d.request for _, _, _, d in items])
        gen_s = (time.perf_counter() - t0) / len(items)
        split["generation_s"] += time.perf_counter() - t0
        for k, v in (getattr(gens[g], "take_timing", dict)() or {}).items():
            if k in split:
                split[k] += v
        for (i, s, q, d), text in zip(items, texts):
            t1 = time.perf_counter()
            if isinstance(text, Exception):
                rows[i] = _error_row(s, q, f"{type(text).__name__}: {text}" if not isinstance(text, RizzError) else str(text),
                                     d.prep_s + gen_s)
            else:
                try:
                    rows[i] = _row(s, q, systems[s].complete(d, text, gen_s))
                except RizzError as e:
                    rows[i] = _error_row(s, q, str(e), d.prep_s + gen_s)
            split["verification_s"] += time.perf_counter() - t1
    return [rows[i] for i in range(len(chunk))]


def _answer_all(systems: dict, todo: list[tuple[str, dict]], ans_path: Path, done: dict, progress: bool,
                chunk_size: int = 24) -> tuple[int, dict]:
    """Answer every (system, query) of ``todo`` in chunks of ``chunk_size`` (generation batched within a chunk),
    appending each chunk's rows to ``ans_path`` as soon as they exist; returns the count and the time split."""
    primed = set()
    for s, _ in todo:  # batch the retrieval work of each index once
        idx = getattr(systems[s], "index", None)
        if idx is not None and id(idx) not in primed:
            primed.add(id(idx))
            idx.prime([q2["question"] for s2, q2 in todo if getattr(systems[s2], "index", None) is idx])
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="audit", unit="answer")
    order = {s: i for i, s in enumerate(systems)}
    qpos = _first_seen(todo)
    todo = sorted(todo, key=lambda sq: (qpos[sq[1]["id"]], order[sq[0]]))
    new, split = 0, new_split()
    with open(ans_path, "a", encoding="utf-8") as fh:
        for c in range(0, len(todo), chunk_size):
            chunk = todo[c : c + chunk_size]
            for row in _answer_chunk(systems, chunk, split):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[(row["system"], row["query_id"])] = row
            fh.flush()
            new += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return new, split


def _first_seen(todo: list[tuple[str, dict]]) -> dict[str, int]:
    """Query id -> position of its first (system, query) in ``todo``: chunks hold every system's answer to a query together."""
    pos: dict[str, int] = {}
    for s, q in todo:
        pos.setdefault(q["id"], len(pos))
    return pos


def _label_all(systems: dict, queries: list[dict], done: dict, authorities, judge) -> list[dict]:
    """A labelled row for every (system, query) answered so far (error rows labelled ``error``)."""
    rows = []
    for s in systems:
        for q in queries:
            a = done.get((s, q["id"]))
            if a is None:
                continue
            base = {"system": s, "query_id": q["id"], "category": q["category"], "family": q.get("family", ""),
                    "question": q["question"], "gold_answer": q["gold_answer"], "answer": a["answer"],
                    "status": a["status"], "error": a.get("error"),
                    "retrieved": [p["id"] for p in a.get("passages") or []], "gold_passages": list(q.get("gold_passages") or [])}
            if a["status"] == "error":
                rows.append({**base, "correctness": None, "groundedness": None, "hallucinated": None, "label": "error",
                             "citations": [], "notes": [a.get("error")]})
                continue
            lab = label_response(q, a["answer"], authorities=authorities, judge=judge)
            rows.append({**base, **{k: v for k, v in lab.items() if k not in ("query_id", "category")}})
    return rows
