"""``rizz audit``: run RAG systems over the query set, label their answers with the audit, report (resumable).

The one place that imports both the systems (``rizzearch.rag``) and their judge (``rizzearch.audit``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rizzearch.errors import ConfigError, DataError, RizzError
from rizzearch.runs import atomic_write_text, lock_run_dir


def check_k(k) -> int:
    """``k`` (passages to retrieve) as a positive int, or a ConfigError naming it."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--k: the number of passages to retrieve must be at least 1, got {k!r}")
    return k


def _system_settings(sysm) -> dict:
    """What decides one system's answers: its kind, its generator and options, k and retrieval mode."""
    gen = sysm.generator
    out = {"kind": type(sysm).__name__, "generator": {"name": gen.name, **(gen.settings() if hasattr(gen, "settings") else {})}}
    for key in ("k", "mode", "support_threshold", "min_coverage"):
        if hasattr(sysm, key):
            out[key] = getattr(sysm, key)
    return out


def audit_settings(systems: dict, generator: str, idx, queries_file: str | None) -> dict:
    """The settings answers.jsonl is keyed by: per system what decides its answers, the index contents
    (and embedding model when any system retrieves densely) and the query file's SHA-256."""
    from rizzearch.audit.queries import DATA

    dense = any(getattr(s, "mode", "bm25") != "bm25" for s in systems.values())
    return {"version": 1, "generator": generator,
            "systems": {name: _system_settings(s) for name, s in sorted(systems.items())},
            "index": {"corpus_sha256": idx.meta.get("corpus_sha256"),
                      "embed_model": idx.meta.get("embed_model") if dense else None},
            "queries_sha256": hashlib.sha256(Path(queries_file or DATA).read_bytes()).hexdigest()}


def _errors_md(rows: list[dict]) -> str:
    """A report section on failed answers ('' when none failed)."""
    errs = [r for r in rows if r.get("status") == "error"]
    if not errs:
        return ""
    head = "Every request failed" if len(errs) == len(rows) else f"{len(errs)} of {len(rows)} answers failed"
    return (f"## {head}\n\n{len(errs)} of {len(rows)} (system, query) answers are errors and are left out of "
            f"every rate above; rerun with `--resume true` to retry them. First error: `{errs[0].get('error')}`\n")


def audit(
    system: list[str] | str = "closed_book,naive_rag,verified_rag",
    out: str = "runs/audit",
    index: str | None = None,
    generator: str = "extractive",
    queries: str | None = None,
    categories: list[str] | None = None,
    limit: int | None = None,
    k: int = 4,
    mode: str = "hybrid",
    dense: bool = True,
    resume: bool = True,
    base_url: str | None = None,
    model: str | None = None,
    timeout: float = 60.0,
    retries: int = 2,
    judge: bool = False,
    judge_runs: int = 3,
    human_sheet: str | None = None,
    second_human_sheet: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the Magesh et al. hallucination audit over RAG systems and write a report.

    Args:
        system: systems to audit, comma-separated or a list: closed_book, naive_rag, verified_rag.
        out: run folder (answers.jsonl, labels.jsonl, metrics.json, report.md/html, chart, label sheet).
        index: index file (default $RIZZ_CACHE/legal_rag_index.sqlite; built if missing or stale).
        generator: extractive (deterministic default), memory, endpoint, or checkpoint:PATH.
        queries: a JSONL query file (default: the bundled 210-query set).
        categories: only these categories (general, jurisdiction_time, false_premise, factual_recall).
        limit: at most this many queries per category.
        k: passages retrieved per question.
        mode: retrieval mode: hybrid, bm25 or dense.
        dense: build the index with dense vectors (needed for hybrid/dense).
        resume: keep finished answers in OUT and only answer the rest.
        base_url: OpenAI-compatible endpoint for generator=endpoint or the judge (or RIZZ_LLM_BASE_URL).
        model: model name at the endpoint (or RIZZ_LLM_MODEL).
        timeout: deadline in seconds for each endpoint request as a whole (connect, headers and body).
        retries: endpoint retries after connection errors, 429 and 5xx.
        judge: also judge support with the LLM at base_url (run judge_runs times; spread reported).
        judge_runs: number of judge runs per citation.
        human_sheet: a filled-in label sheet CSV: report Cohen's kappa between it and the automatic labels.
        second_human_sheet: a second rater's sheet: report kappa between the two humans.
        n_boot: bootstrap resamples for the 95% intervals.
        seed: seed of the bootstrap and of the closed-book memory.
        progress: show a progress bar.
    """
    from rizzearch.audit.queries import load_queries
    from rizzearch.audit.runner import run_audit
    from rizzearch.legal.citations import build_authorities
    from rizzearch.rag.index import open_or_build
    from rizzearch.rag.systems import make_system

    system = _check_inputs(system, k, human_sheet, second_human_sheet)
    qs = load_queries(queries, categories=categories, limit=limit)
    if not qs:
        raise DataError("no queries selected (check --categories / --limit / --queries)")
    Path(out).mkdir(parents=True, exist_ok=True)
    run_lock = lock_run_dir(out, "audit")  # one writer per run folder
    try:
        idx = open_or_build(index, dense=dense and mode != "bm25", progress=progress)
        auth = build_authorities(idx.passages)
        systems = {s: make_system(s, idx, generator, k=k, mode=mode, seed=seed, base_url=base_url, model=model,
                                  timeout=timeout, retries=retries) for s in system}
        j = _judge(base_url, model, timeout, retries, judge_runs) if judge else None
        res = run_audit(systems, qs, out, resume=resume, progress=progress, authorities=auth, judge=j, n_boot=n_boot,
                        seed=seed, settings=audit_settings(systems, generator, idx, queries))
        return _write_outputs(res, Path(out), auth, human_sheet, second_human_sheet)
    finally:
        run_lock.release()


def _judge(base_url, model, timeout: float, retries: int, runs: int):
    """The optional LLM judge of support, at the same OpenAI-compatible endpoint settings."""
    from rizzearch.audit.judge import LLMJudge
    from rizzearch.rag.generators import EndpointGenerator

    return LLMJudge(EndpointGenerator(base_url, model, timeout=timeout, retries=retries), runs=runs)


def _write_outputs(res: dict, out: Path, auth, human_sheet: str | None, second_human_sheet: str | None) -> dict:
    """Label sheet, report (with the failed answers and the human agreement), a JSON summary on stdout.
    Raises RizzError (after writing the report) when every answer failed."""
    from rizzearch.audit.human import export_sheet
    from rizzearch.audit.report import write_report

    rows, metrics = res["rows"], res["metrics"]
    export_sheet(rows, out / "label_sheet.csv", auth.by_id)
    all_failed = bool(rows) and all(r.get("status") == "error" for r in rows)
    extra = _errors_md(rows)
    if human_sheet and not all_failed:  # all failed: nothing to compare with, and the report says why
        extra += _human_agreement(rows, metrics, human_sheet, second_human_sheet, out)
    paths = write_report(out, metrics, rows, extra_md=extra)
    summary = {s: {k2: e["overall"][k2]["rate"] for k2 in ("accurate", "incomplete", "hallucinated")}
               for s, e in metrics["systems"].items()}
    print(json.dumps({"out": str(out), "new_answers": res["new_answers"], "reused_answers": res["reused_answers"],
                      "summary": summary, **paths}, indent=1))
    if all_failed:
        raise RizzError(f"every one of the {len(rows)} answers failed (first: {rows[0].get('error')}); "
                        f"the report in {out} says so; rerun with --resume true to retry them")
    return metrics


def _check_inputs(system, k, *sheets) -> list[str]:
    """The system names as a list; ConfigError/DataError for unknown systems, k < 1 or a missing label sheet."""
    from rizzearch.rag.systems import SYSTEMS

    if isinstance(system, str):
        system = [s.strip() for s in system.split(",") if s.strip()]
    bad = [s for s in system if s not in SYSTEMS]
    if bad or not system:
        raise ConfigError(f"--system: unknown {bad or system}; choose from {list(SYSTEMS)}")
    check_k(k)
    for sheet in sheets:
        if sheet and not Path(sheet).is_file():
            raise DataError(f"{sheet}: label sheet not found")
    return system


def _human_agreement(rows: list[dict], metrics: dict, human_sheet: str, second_human_sheet: str | None, out: Path) -> str:
    """Kappa of the human sheet(s) against the automatic labels, into ``metrics`` (rewritten); the report section."""
    from rizzearch.audit.human import agreement, import_sheet

    auto = {(r["system"], r["query_id"]): r for r in rows if r.get("status") != "error"}
    h1 = import_sheet(human_sheet, expected=sorted(auto))
    metrics["human_agreement"] = {"auto_vs_human": agreement(auto, h1)}
    if second_human_sheet:
        h2 = import_sheet(second_human_sheet, expected=sorted(auto))
        metrics["human_agreement"]["human_vs_human"] = agreement(h1, h2)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return "## Agreement with human labels\n\n```\n" + json.dumps(metrics["human_agreement"], indent=1) + "\n```\n"
