"""Study: Magesh et al. (2024), "Hallucination-Free? Assessing the Reliability of Leading AI Legal Research Tools".

A real language model answers: SmolLM2-135M-Instruct through our own Llama (``rag.generators.PretrainedGenerator``),
prompted with its chat template, the retrieved passages and an instruction to cite them, greedy (reruns are
identical), batched through the KV cache. It is audited as a closed-book model, inside naive RAG and inside
verified RAG, on our bundled corpus (U.S. Constitution, 101 Supreme Court opinion prefixes, LegalBench rule_qa).
Claims, stated as the paper states them, each with ``model=`` and 95% intervals:

1. Retrieval lowers hallucination against closed-book (paper: GPT-4 closed-book 43% vs. Lexis+ AI 17%, Westlaw 33%).
2. ... but does not remove it (paper: 17-33% for the RAG tools).
3. Verifying before answering trades hallucinations for refusals (paper: Ask Practical Law AI, 17% hallucinated
   but 63% incomplete).
4. Closed-book answers cite authorities that do not exist; retrieval-grounded answers do so less.

The deterministic stand-ins (``MemoryGenerator``, a *simulated* closed-book model that misremembers citations by
construction, and the extractive answerer) run on the same queries as a labelled ablation ("simulated"), never as
a claim. Tiers: this module is the quick tier (``make demo``: a stratified subset, every category, fixed seed,
<= 5 min on 2 cores); ``legal_rag_real`` is the real tier (all 210 queries) and shares everything here through
``run_study``. Tiny mode: a random tiny llama with SmolLM2's tokenizer and template (``real_model``), seconds.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rizzearch.reproduce.common import Claim, Modes, StudyRun, claims_table, fmt_ci, md_table, rate_ci, real_model

STUDY = "legal-rag"
SYSTEMS = ("closed_book", "naive_rag", "verified_rag")
SIMULATED = "simulated"
# Three answers of SmolLM2 per query on 2 quiet cores, estimated from the quiet-machine forward cost (8 x 128 tokens in
# ~1.4 s, ~730 tokens/s): ~1.3 RAG prompts of ~800 tokens to prefill (verified RAG's usually equals naive RAG's and is
# generated once) plus 64 greedy steps in batches of 8. Not yet checked on a quiet machine (see docs/legal_rag.md).
EST_S_PER_QUERY = 2.6


@dataclass(frozen=True)
class Size:
    """Sizes of one study mode.

    Args:
        queries_per_category: audit this many queries of each category, drawn with the run's seed (None: all 210).
        retrieval: "bm25" (a fresh BM25-only index in the run folder) or "hybrid" (the cached BM25 + MiniLM index).
        n_boot: bootstrap resamples of the paired differences.
        max_new_tokens: answer length limit of the language model.
        batch_size: prompts per generation batch.
        retrieval_ablation: also audit the RAG systems with BM25-only and dense-only retrieval (simulated generators).
        simulated_ablation: also audit the systems with the simulated generators on the same queries.
    """

    queries_per_category: int | None = None
    retrieval: str = "hybrid"
    n_boot: int = 2000
    max_new_tokens: int = 64
    batch_size: int = 8
    retrieval_ablation: bool = False
    simulated_ablation: bool = True


MODES = Modes(tiny=Size(queries_per_category=2, retrieval="bm25", n_boot=200, max_new_tokens=8),
              quick=Size(queries_per_category=12), full=Size(queries_per_category=None, retrieval_ablation=True),
              budget_s={"tiny": 120.0, "quick": 300.0, "full": 1200.0})


def stratified(queries: list[dict], per_category: int | None, seed: int) -> list[dict]:
    """``per_category`` queries of every category drawn with ``seed`` (all when None or fewer exist), in file order."""
    if per_category is None:
        return list(queries)
    by: dict[str, list[dict]] = {}
    for q in queries:
        by.setdefault(q["category"], []).append(q)
    rng = random.Random(seed)
    keep = {q["id"] for cat in sorted(by) for q in rng.sample(by[cat], min(per_category, len(by[cat])))}
    return [q for q in queries if q["id"] in keep]


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


# -- rates with Wilson intervals ------------------------------------------------------------------


def _has_nonexistent(r: dict) -> bool:
    return any(c.get("existence") == "nonexistent" for c in r.get("citations") or [])


RATES = {
    "hallucinated": lambda r: r["label"] == "hallucinated",
    "incomplete": lambda r: r["label"] == "incomplete",
    "accurate": lambda r: r["label"] == "accurate",
    "misgrounded": lambda r: r.get("groundedness") == "misgrounded",
    "nonexistent_citation": _has_nonexistent,
}


def wilson_rates(rows: list[dict]) -> dict:
    """Per system, overall and per category: ``rate_ci`` (Wilson 95%) of every ``RATES`` entry over its labelled
    rows (error rows left out), plus the count of nonexistent citations."""
    out: dict = {}
    for s in sorted({r["system"] for r in rows}, key=lambda s: (SYSTEMS + (s,)).index(s)):
        ok = [r for r in rows if r["system"] == s and r.get("status") != "error"]
        groups = {"overall": ok} | {c: [r for r in ok if r["category"] == c] for c in sorted({r["category"] for r in ok})}
        out[s] = {g: {k: rate_ci(sum(map(f, rs)), len(rs)) for k, f in RATES.items()}
                  | {"nonexistent_citations": sum(c.get("existence") == "nonexistent" for r in rs for c in r.get("citations") or [])}
                  for g, rs in groups.items()}
    return out


# -- claims ---------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _diff(d: dict | None) -> str:
    return "n/a (no query answered by both)" if d is None else f"{_pct(d['diff'])} [{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}]"


def _below(d: dict | None) -> bool:
    return d is not None and d["ci95"][1] < 0


def _above(d: dict | None) -> bool:
    return d is not None and d["ci95"][0] > 0


def study_claims(w: dict, paired: dict, model: str) -> list[Claim]:
    """The four claims from the Wilson rates ``w`` (``wilson_rates(...)``) and the paired differences; ``holds`` is
    computed from the numbers (an interval that excludes zero in the paper's direction)."""
    o = {s: w[s]["overall"] for s in SYSTEMS}
    h = {s: o[s]["hallucinated"] for s in SYSTEMS}
    ne = {s: o[s]["nonexistent_citation"] for s in SYSTEMS}
    d_rag, d_h, d_i = paired["naive_minus_closed_hallucinated"], paired["verified_minus_naive_hallucinated"], \
        paired["verified_minus_naive_incomplete"]
    return [
        Claim("retrieval_lowers_hallucination", "Retrieval-augmented generation hallucinates less than a closed-book model.",
              "GPT-4 closed-book 43% vs. Lexis+ AI 17% / Westlaw 33% hallucinated",
              f"closed-book {fmt_ci(h['closed_book'], pct=True)} vs. naive RAG {fmt_ci(h['naive_rag'], pct=True)}; "
              f"paired difference {_diff(d_rag)}", _below(d_rag), model),
        Claim("retrieval_does_not_remove_hallucination", "Even with retrieval, a substantial share of answers is hallucinated.",
              "17-33% of all queries (Lexis+ AI, Westlaw)",
              f"naive RAG {fmt_ci(h['naive_rag'], pct=True)}; verified RAG {fmt_ci(h['verified_rag'], pct=True)}",
              bool(h["naive_rag"]["ci95"][0] > 0), model),
        Claim("verification_trades_hallucinations_for_refusals",
              "Checking citations and support before answering lowers hallucination but raises incomplete answers.",
              "Ask Practical Law AI: 17% hallucinated, 63% incomplete (vs. Westlaw 33% / 25%)",
              f"verified minus naive RAG: hallucinated {_diff(d_h)}, incomplete {_diff(d_i)}",
              _below(d_h) and _above(d_i), model),
        Claim("closed_book_cites_nonexistent_authorities",
              "Closed-book answers cite authorities that do not exist; retrieval-grounded answers do so less.",
              "closed-book LLMs fabricate case citations (Magesh et al. Sec. 2; Dahl et al. 2024)",
              f"answers citing a nonexistent authority: closed-book {fmt_ci(ne['closed_book'], pct=True)} "
              f"({w['closed_book']['overall']['nonexistent_citations']} citations), naive RAG {fmt_ci(ne['naive_rag'], pct=True)}, "
              f"verified RAG {fmt_ci(ne['verified_rag'], pct=True)}",
              bool(ne["closed_book"]["ci95"][0] > 0 and ne["closed_book"]["rate"] > ne["naive_rag"]["rate"]), model),
    ]


def paired_differences(rows: list[dict], n_boot: int, seed: int) -> dict:
    """Paired bootstrap differences (same queries) behind claims 1 and 3."""
    from rizzearch.audit.metrics import paired_difference

    return {"naive_minus_closed_hallucinated": paired_difference(rows, "closed_book", "naive_rag", "hallucinated", n_boot, seed),
            "verified_minus_naive_hallucinated": paired_difference(rows, "naive_rag", "verified_rag", "hallucinated", n_boot, seed),
            "verified_minus_naive_incomplete": paired_difference(rows, "naive_rag", "verified_rag", "incomplete", n_boot, seed)}


# -- the study --------------------------------------------------------------------------------------


def _audit_real(run: StudyRun[Size], idx, queries: list[dict], auth) -> tuple[dict, str, dict]:
    """The real-model audit: the three systems around one greedy, batched language model."""
    from rizzearch.audit.runner import run_audit
    from rizzearch.rag.generators import PretrainedGenerator
    from rizzearch.rag.systems import make_system

    t0 = time.perf_counter()
    pre, model_name = real_model(run)
    load_s = time.perf_counter() - t0
    gen = PretrainedGenerator(model_name, max_new_tokens=run.size.max_new_tokens, device=run.device,
                              batch_size=run.size.batch_size, pretrained=pre)
    gen.label = f"{model_name} (real LM, greedy)"
    systems = {s: make_system(s, idx, gen, mode=run.size.retrieval) for s in SYSTEMS}
    est = EST_S_PER_QUERY * len(queries)
    print(f"[legal-rag] {model_name}: {len(queries)} queries x {len(SYSTEMS)} systems, max_new_tokens "
          f"{run.size.max_new_tokens}; estimate {est / 60:.1f} min on 2 quiet cores (load {os.getloadavg()[0]:.1f})",
          file=sys.stderr, flush=True)
    res = run_audit(systems, queries, run.out / "audit", resume=False, progress=run.mode != "tiny", authorities=auth,
                    n_boot=run.size.n_boot, seed=run.seed, chunk_size=3 * run.size.batch_size)
    for system in SYSTEMS:  # a system with no answer to measure: say why instead of reporting empty rates
        rows = [r for r in res["rows"] if r["system"] == system]
        failed = [r for r in rows if r.get("status") == "error"]
        if failed and len(failed) == len(rows):
            raise RuntimeError(f"legal-rag: all {len(failed)} answers of {system} with {model_name} failed; the first: {failed[0].get('error')}")
    res["timing"]["model_load_s"] = round(load_s, 2)
    return res, model_name, {s: systems[s].generator_label for s in SYSTEMS}


def _audit_simulated(run: StudyRun[Size], idx, queries: list[dict], auth) -> dict:
    """The ablation: the same systems with the deterministic stand-ins (simulated closed-book, extractive RAG),
    and in full mode the RAG systems again with BM25-only and dense-only retrieval. Rates of all queries."""
    from rizzearch.audit.runner import run_audit
    from rizzearch.rag.systems import make_system

    def rates(mode: str, names, folder: str) -> dict:
        systems = {s: make_system(s, idx, "extractive", mode=mode, seed=run.seed) for s in names}
        r = run_audit(systems, queries, run.out / folder, resume=False, progress=False, authorities=auth,
                      n_boot=200, seed=run.seed)
        w = wilson_rates(r["rows"])
        return {s: {"generator": f"{SIMULATED}: {systems[s].generator_label}"}
                | {k: w[s]["overall"][k] for k in ("accurate", "incomplete", "hallucinated", "nonexistent_citation")}
                for s in names}

    out = {run.size.retrieval: rates(run.size.retrieval, SYSTEMS, "audit_simulated")}
    if run.size.retrieval_ablation:
        for alt in ("bm25", "dense"):
            out[alt] = rates(alt, SYSTEMS[1:], f"audit_simulated_{alt}")
    return out


def run_study(modes: Modes[Size], out_dir: str, *, full: bool, tiny: bool, device: str, seed: int) -> dict:
    """Audit closed-book, naive RAG and verified RAG with the real model (and the simulated ablation); write
    results.json, report.md/html and the chart. Shared by the quick tier (here) and the real tier (``legal_rag_real``)."""
    from rizzearch.audit.queries import load_queries
    from rizzearch.legal.citations import build_authorities

    run = StudyRun.start(STUDY, out_dir, modes, full=full, tiny=tiny, device=device, seed=seed)
    load0 = os.getloadavg()
    queries = stratified(load_queries(), run.size.queries_per_category, seed)
    idx = _index(run.out, run.size)
    t_index = run.budget.elapsed()
    auth = build_authorities(idx.passages)
    res, model_name, gen = _audit_real(run, idx, queries, auth)
    t_sim = time.perf_counter()
    simulated = _audit_simulated(run, idx, queries, auth) if run.size.simulated_ablation else {}
    t_sim = time.perf_counter() - t_sim
    rows, m = res["rows"], res["metrics"]
    w = wilson_rates(rows)
    paired = paired_differences(rows, run.size.n_boot, seed)
    claims = study_claims(w, paired, model_name)
    metrics = {"mode": run.mode, "tier": run.tier, "model": model_name, "retrieval_mode": run.size.retrieval,
               "n_queries": len(queries), "queries_per_category": run.size.queries_per_category,
               "categories": sorted({q["category"] for q in queries}), "n_passages": len(idx),
               "max_new_tokens": run.size.max_new_tokens, "batch_size": run.size.batch_size,
               "systems": {s: {"generator": gen[s], "rates": w[s], "citations": m["systems"][s]["overall"]["citations"],
                               "retrieval": m["systems"][s].get("retrieval")} for s in SYSTEMS},
               "paired": paired, "timing": res["timing"], "simulated_ablation": simulated,
               "labels_deterministic": _deterministic(rows, queries, auth),
               "seconds": {"index": round(t_index, 2), "audit": res["timing"]["wall_s"], "simulated_ablation": round(t_sim, 2),
                           "total": round(run.budget.elapsed(), 2), "process_cpu": round(run.budget.cpu_elapsed(), 2)},
               "load_average": {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]}}
    _report(run.out, m, rows, queries, claims, metrics)
    return run.finish(claims, metrics)


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """The quick tier: a stratified subset of the queries (``MODES``)."""
    return run_study(MODES, out_dir, full=full, tiny=tiny, device=device, seed=seed)


# -- report ---------------------------------------------------------------------------------------


def _rates_md(metrics: dict) -> str:
    """Per system and category: hallucinated / incomplete / accurate / misgrounded with Wilson 95% intervals."""
    rows = []
    for s, e in metrics["systems"].items():
        for g, r in e["rates"].items():
            rows.append([s, g] + [fmt_ci(r[k], pct=True) for k in RATES] + [str(r["nonexistent_citations"]), str(r["hallucinated"]["n"])])
    return md_table(["system", "category", *RATES, "nonexistent citations", "n"], rows)


def _timing_md(t: dict) -> str:
    keys = ("retrieval_s", "prefill_s", "decode_s", "generation_s", "verification_s", "labelling_s", "wall_s")
    return (md_table(["phase", "seconds"], [[k, f"{t[k]:.1f}"] for k in keys])
            + f"\n\n{t['new_answers']} answers, {t['answers_per_s']:.3f} answers/s; {t['prompt_tokens']} prompt tokens, "
            f"{t['new_tokens']} new tokens (identical prompts generated once); model load {t['model_load_s']} s.")


def _simulated_md(sim: dict) -> str:
    rows = [[mode, s, e["generator"]] + [fmt_ci(e[k], pct=True) for k in ("accurate", "incomplete", "hallucinated",
                                                                            "nonexistent_citation")]
            for mode, systems in sim.items() for s, e in systems.items()]
    return md_table(["retrieval", "system", "generator (simulated)", "accurate", "incomplete", "hallucinated",
                     "answers citing nonexistent"], rows)


def _report(out: Path, m: dict, rows: list[dict], queries: list[dict], claims: list[Claim], metrics: dict) -> None:
    """Report step: claims, Wilson rates, time split, the audit report (chart beside the paper's tools), the ablation."""
    from rizzearch.audit.report import write_report

    la = metrics["load_average"]
    intro = "\n\n".join([
        "## Claims", f"Model: **{metrics['model']}** (greedy, max {metrics['max_new_tokens']} new tokens, its chat template).",
        claims_table(claims),
        f"Mode {metrics['mode']} ({metrics['tier']} tier), retrieval {metrics['retrieval_mode']}, {metrics['n_queries']} queries "
        f"({metrics['queries_per_category'] or 'all'} per category, seed-drawn), {metrics['n_passages']} passages; seconds: "
        f"{metrics['seconds']}; load average (1/5/15 min) at start {la['start']}, at end {la['end']}. "
        f"Labels identical on relabelling: {metrics['labels_deterministic']}.",
        "## Rates with Wilson 95% intervals (share of all queries)", _rates_md(metrics),
        "## Time split of the real-model audit", _timing_md(metrics["timing"])])
    extra = "" if not metrics["simulated_ablation"] else "\n\n".join(["## Ablation: simulated generators (not a language model; never a claim)",
                         "The deterministic stand-ins on the same queries: a *simulated* closed-book model "
                         "(MemoryGenerator, which misremembers citations by construction) and the extractive answerer.",
                         _simulated_md(metrics["simulated_ablation"])])
    write_report(out, {**m, "n_queries": len(queries)}, rows,
                 title=f"Legal RAG hallucination audit (Magesh et al. 2024) with {metrics['model']}", intro_md=intro,
                 extra_md=extra)
