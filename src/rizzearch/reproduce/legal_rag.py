"""Study: Magesh et al. (2024), "Hallucination-Free? Assessing the Reliability of Leading AI Legal Research Tools".

Claims checked on our bundled corpus (U.S. Constitution, 101 Supreme Court opinion prefixes, LegalBench
rule_qa) with the deterministic systems (``rizz reproduce legal-rag --out DIR``). No language model is
in the loop: closed-book answers come from a *simulated* closed-book model (``MemoryGenerator``, which
misremembers a fixed share of citations by construction) and RAG answers from the extractive answerer
(``ExtractiveGenerator``), so claims 1 and 4 hold partly by design. results.json records each system's
generator, and every claim, table row and chart bar names it:

1. Retrieval lowers hallucination against closed-book (paper: GPT-4 closed-book 43% hallucinated vs.
   Lexis+ AI 17% and Westlaw 33%).
2. ... but does not remove it (paper: 17-33% for the RAG tools).
3. Verifying before answering trades hallucinations for refusals (paper: Ask Practical Law AI, the most
   conservative tool, 17% hallucinated but 63% incomplete).
4. Closed-book answers cite authorities that do not exist; retrieval-grounded answers do not.

Modes: quick (default; full query set, hybrid BM25 + MiniLM index, <= 5 min on 2 CPU cores), ``tiny``
(6 queries per category, BM25-only index: a smoke run), ``full`` (also runs the audit with BM25-only and
dense-only retrieval to show how retrieval quality moves the numbers).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rizzearch.reproduce.common import Claim, Modes, StudyRun, claims_table

STUDY = "legal-rag"
SYSTEMS = ("closed_book", "naive_rag", "verified_rag")


@dataclass(frozen=True)
class Size:
    """Sizes of one study mode.

    Args:
        queries_per_category: audit at most this many queries of each category (None: all 210).
        retrieval: "bm25" (a fresh BM25-only index in the run folder) or "hybrid" (the cached BM25 + MiniLM index).
        n_boot: bootstrap resamples of the 95% intervals.
        ablation: also audit the RAG systems with BM25-only and dense-only retrieval.
    """

    queries_per_category: int | None = None
    retrieval: str = "hybrid"
    n_boot: int = 2000
    ablation: bool = False


MODES = Modes(tiny=Size(queries_per_category=6, retrieval="bm25", n_boot=500), quick=Size(), full=Size(ablation=True),
              budget_s={"tiny": 120.0, "quick": 300.0, "full": 900.0})


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}%"


def _index(out: Path, size: Size):
    """Data step: the retrieval index (a fresh BM25-only one, or the cached hybrid index)."""
    from rizzearch.legal.corpus import load_corpus
    from rizzearch.rag.index import Index, default_index_path, open_or_build

    if size.retrieval == "bm25":
        return Index.build(out / "index_bm25.sqlite", load_corpus(), dense=False)
    return open_or_build(default_index_path(), dense=True, progress=True)


def _deterministic(rows: list[dict], queries: list[dict], auth) -> bool:
    """Labelling the same answers again gives identical labels (first 60 rows)."""
    from rizzearch.audit.labels import label_response

    qmap = {q["id"]: q for q in queries}
    relabel = [label_response(qmap[r["query_id"]], r["answer"], authorities=auth)["label"] for r in rows[:60]]
    return relabel == [r["label"] for r in rows[:60]]


def _claims(rows: list[dict], m: dict, short: dict, seed: int) -> tuple[list[Claim], dict]:
    """Claims step: the four claims (each naming the generators behind its numbers) and the paired differences."""
    from rizzearch.audit.metrics import paired_difference

    o = {s: m["systems"][s]["overall"] for s in SYSTEMS}
    hall = {s: o[s]["hallucinated"] for s in SYSTEMS}
    d_rag = paired_difference(rows, "closed_book", "naive_rag", "hallucinated", seed=seed)
    d_ver_h = paired_difference(rows, "naive_rag", "verified_rag", "hallucinated", seed=seed)
    d_ver_i = paired_difference(rows, "naive_rag", "verified_rag", "incomplete", seed=seed)
    nonexist = {s: o[s]["citations"]["nonexistent"] for s in SYSTEMS}
    claims = [
        Claim("retrieval_lowers_hallucination",
              "Retrieval-augmented generation hallucinates less than a closed-book model.",
              "GPT-4 closed-book 43% vs. Lexis+ AI 17% / Westlaw 33% hallucinated",
              f"closed-book ({short['closed_book']}) {_fmt(hall['closed_book']['rate'])} vs. naive RAG ({short['naive_rag']}) "
              f"{_fmt(hall['naive_rag']['rate'])} "
              f"(paired difference {_fmt(d_rag['diff'])}, 95% CI [{_fmt(d_rag['ci95'][0])}, {_fmt(d_rag['ci95'][1])}])",
              bool(d_rag["ci95"][1] < 0)),
        Claim("retrieval_does_not_remove_hallucination",
              "Even with retrieval, a substantial share of answers is hallucinated.",
              "17-33% of all queries (Lexis+ AI, Westlaw)",
              f"naive RAG ({short['naive_rag']}) {_fmt(hall['naive_rag']['rate'])} (95% CI [{_fmt(hall['naive_rag']['ci95'][0])}, "
              f"{_fmt(hall['naive_rag']['ci95'][1])}]); verified RAG ({short['verified_rag']}) {_fmt(hall['verified_rag']['rate'])}",
              bool(hall["naive_rag"]["ci95"][0] > 0)),
        Claim("verification_trades_hallucinations_for_refusals",
              "Checking citations and support before answering lowers hallucination but raises incomplete answers.",
              "Ask Practical Law AI: 17% hallucinated, 63% incomplete (vs. Westlaw 33% / 25%)",
              f"verified vs. naive RAG ({short['verified_rag']}): hallucinated {_fmt(d_ver_h['diff'])} (CI [{_fmt(d_ver_h['ci95'][0])}, "
              f"{_fmt(d_ver_h['ci95'][1])}]), incomplete +{_fmt(d_ver_i['diff'])} (CI [{_fmt(d_ver_i['ci95'][0])}, "
              f"{_fmt(d_ver_i['ci95'][1])}])",
              bool(d_ver_h["ci95"][1] < 0 and d_ver_i["ci95"][0] > 0)),
        Claim("closed_book_cites_nonexistent_authorities",
              "Closed-book answers cite authorities that do not exist; retrieval-grounded answers do not.",
              "closed-book LLMs fabricate case citations (Magesh et al. Sec. 2; Dahl et al. 2024)",
              f"nonexistent citations: closed-book ({short['closed_book']}) {nonexist['closed_book']}, naive RAG "
              f"({short['naive_rag']}) {nonexist['naive_rag']}, verified RAG ({short['verified_rag']}) {nonexist['verified_rag']}",
              bool(nonexist["closed_book"] > 0 and nonexist["naive_rag"] == 0 and nonexist["verified_rag"] == 0)),
    ]
    paired = {"naive_minus_closed_hallucinated": d_rag, "verified_minus_naive_hallucinated": d_ver_h,
              "verified_minus_naive_incomplete": d_ver_i}
    return claims, paired


def _ablation(idx, queries: list[dict], out: Path, auth, seed: int) -> dict:
    """Full mode only: the RAG systems again with BM25-only and dense-only retrieval (shares of all queries)."""
    from rizzearch.audit.runner import run_audit
    from rizzearch.rag.systems import make_system

    extra_runs = {}
    for alt in ("bm25", "dense"):
        alt_sys = {s: make_system(s, idx, "extractive", mode=alt, seed=seed) for s in SYSTEMS if s != "closed_book"}
        r2 = run_audit(alt_sys, queries, out / f"audit_{alt}", resume=False, progress=True, authorities=auth, seed=seed)
        extra_runs[alt] = {s: {k: e["overall"][k]["rate"] for k in ("accurate", "incomplete", "hallucinated")}
                           for s, e in r2["metrics"]["systems"].items()}
    return extra_runs


def _claims_md(claims: list[Claim], metrics: dict, gen: dict) -> str:
    """The claims table and run facts that open the report, right under its title."""
    lines = ["## Claims", "", claims_table(claims)]
    lines += ["", f"Mode {metrics['mode']}, retrieval {metrics['retrieval_mode']}, {metrics['n_queries']} queries, "
              f"{metrics['n_passages']} passages; index {metrics['seconds']['index']} s, audit {metrics['seconds']['audit']} s. "
              f"Labels identical on relabelling: {metrics['labels_deterministic']}."]
    lines += ["", "Generators (no language model is audited here): " + "; ".join(f"{s}: {g}" for s, g in gen.items()) + "."]
    if metrics["retrieval_ablation"]:
        lines += ["", "Retrieval ablation (share of all queries, accurate/incomplete/hallucinated):", "```",
                  json.dumps(metrics["retrieval_ablation"], indent=1), "```"]
    return "\n".join(lines)


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Audit closed-book, naive RAG and verified RAG; write results.json, report.md/html and the chart."""
    from rizzearch.audit.queries import load_queries
    from rizzearch.audit.runner import run_audit
    from rizzearch.legal.citations import build_authorities
    from rizzearch.rag.systems import make_system

    r = StudyRun.start(STUDY, out_dir, MODES, full=full, tiny=tiny, device=device, seed=seed)
    size = r.size
    queries = load_queries(limit=size.queries_per_category)
    idx = _index(r.out, size)
    t_index = r.budget.elapsed()
    auth = build_authorities(idx.passages)
    systems = {s: make_system(s, idx, "extractive", mode=size.retrieval, seed=seed, device=device) for s in SYSTEMS}
    t1 = time.perf_counter()
    res = run_audit(systems, queries, r.out / "audit", resume=False, progress=not tiny, authorities=auth,
                    n_boot=size.n_boot, seed=seed)
    t_audit = time.perf_counter() - t1
    rows, m = res["rows"], res["metrics"]
    gen = {s: systems[s].generator_label for s in SYSTEMS}
    claims, paired = _claims(rows, m, {s: g.split(" (")[0] for s, g in gen.items()}, seed)  # "simulated closed-book", "extractive"
    metrics = _metrics(r, m, queries, idx, gen, paired)
    metrics |= {"labels_deterministic": _deterministic(rows, queries, auth),
                "retrieval_ablation": _ablation(idx, queries, r.out, auth, seed) if size.ablation else {},
                "seconds": {"index": round(t_index, 2), "audit": round(t_audit, 2), "total": round(r.budget.elapsed(), 2)}}
    _report(r.out, m, rows, queries, claims, metrics, gen)
    return r.finish(claims, metrics)


def _metrics(r: StudyRun[Size], m: dict, queries: list[dict], idx, gen: dict, paired: dict) -> dict:
    """Metrics step: per system its generator, rates with intervals, citations and hallucination by category."""
    o = {s: m["systems"][s]["overall"] for s in SYSTEMS}
    return {
        "mode": r.mode,
        "retrieval_mode": r.size.retrieval,
        "n_queries": len(queries),
        "n_passages": len(idx),
        "systems": {s: {"generator": gen[s]}
                    | {k: o[s][k] for k in ("accurate", "incomplete", "hallucinated", "hallucinated_among_answered")}
                    | {"citations": o[s]["citations"], "by_category": {c: v["hallucinated"] for c, v in
                                                                         m["systems"][s]["by_category"].items()}}
                    for s in SYSTEMS},
        "paired": paired,
    }


def _report(out: Path, m: dict, rows: list[dict], queries: list[dict], claims: list[Claim], metrics: dict, gen: dict) -> None:
    """Report step: the audit report (tables, chart, examples) opened by the study's claims."""
    from rizzearch.audit.report import write_report

    write_report(out, {**m, "n_queries": len(queries)}, rows, title="Legal RAG hallucination audit (Magesh et al. 2024)",
                 intro_md=_claims_md(claims, metrics, gen))
