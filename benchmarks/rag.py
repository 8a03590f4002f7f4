"""Legal RAG speed: the audit with a real language model against a plain transformers loop; indexing the
bundled corpus, a full deterministic audit, and retrieval latency.

``--what llm`` (default; issue 17): answers per second of our audit path (``audit.runner.run_audit``: chunks of
drafts, one batched greedy generation per chunk through our Llama's KV cache, prefill of the last position's
logits only, early stop at eos, identical prompts once) against a straightforward loop over transformers'
``generate`` (the same SmolLM2-135M-Instruct weights through ``models.convert.to_hf_llama``, the same prompts
rendered with its chat template, greedy, the same ``max_new_tokens``; retrieval, verification and labelling the
same code in both), on a stratified subset of the queries, in one process, interleaved, median of ``--repeats``.
Target: >= 2x. Prints our time split (retrieval, prefill, decode, verification, labelling).

``--what deterministic`` (issue 7) targets, on 2 CPU cores:
  * build the index (SQLite FTS5 + MiniLM vectors of all 1,069 passages) and audit the full query set
    (210 queries x closed-book / naive RAG / verified RAG, answers + labels + metrics) in <= 120 s;
  * retrieval latency p50 <= 20 ms per question (hybrid: BM25 + a fresh MiniLM query embedding +
    fusion; the query-vector cache is cleared before every question so each one pays for its embedding).

Retrieval modes are timed interleaved (bm25, dense, hybrid, one question each in turn) in one process
after warm-up; index build and audit are timed ``--repeats`` times each (median reported). Also
reported: the audit with query vectors batch-primed (what ``run_audit`` does) and the load average.

    python benchmarks/rag.py [--what llm|deterministic|all] [--per_category 2] [--max_new_tokens 64] [--repeats 1]
    python benchmarks/rag.py --what deterministic [--repeats 2] [--latency_queries 210]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, load_average, print_header, print_table  # noqa: E402

from rizzearch.audit import load_queries  # noqa: E402
from rizzearch.audit.runner import run_audit  # noqa: E402
from rizzearch.legal.citations import build_authorities  # noqa: E402
from rizzearch.legal.corpus import load_corpus  # noqa: E402
from rizzearch.rag.embed import Embedder  # noqa: E402
from rizzearch.rag.index import Index  # noqa: E402
from rizzearch.rag.systems import make_system  # noqa: E402

TARGET_INDEX_AUDIT_S = 120.0
TARGET_LLM_SPEEDUP = 2.0
SYSTEMS = ("closed_book", "naive_rag", "verified_rag")
TARGET_P50_MS = 20.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def hf_loop_audit(systems: dict, hf, gen, queries: list[dict], auth, max_new_tokens: int) -> dict:
    """The baseline: every (system, query) in turn, ``hf.generate`` on the prompt one at a time, then the same
    verification and labelling. Returns ``{"rows", "seconds", "answers"}``."""
    import torch

    from rizzearch.audit.labels import label_response

    t0 = time.perf_counter()
    rows = []
    for q in queries:
        for s, system in systems.items():
            got = system.prepare(q["question"])
            if hasattr(got, "request"):
                ids = torch.tensor([gen.prompt_ids(got.request)])  # (1, T)
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=gen.tokenizer.eos_id, pad_token_id=gen.tokenizer.eos_id)
                got = system.complete(got, gen.answer_text(out[0, ids.shape[1]:].tolist()))
            lab = label_response(q, got.text, authorities=auth)
            rows.append({"system": s, "query_id": q["id"], "answer": got.text, "label": lab["label"]})
    return {"rows": rows, "seconds": time.perf_counter() - t0, "answers": len(rows)}


def llm(a) -> dict:
    """Our batched audit vs. a transformers ``generate`` loop, same model, prompts and greedy decoding."""
    from rizzearch.models.convert import to_hf_llama
    from rizzearch.models.pretrained import load_pretrained
    from rizzearch.rag.generators import PretrainedGenerator
    from rizzearch.rag.index import default_index_path, open_or_build
    from rizzearch.reproduce.legal_rag import stratified

    load0 = load_average()
    pre = load_pretrained("smollm2")
    hf = to_hf_llama(pre.model).eval()
    idx = open_or_build(default_index_path(), dense=True, progress=False)
    auth = build_authorities(idx.passages)
    queries = stratified(load_queries(), a.per_category, 0)
    tmp = Path(tempfile.mkdtemp(prefix="rizz-rag-llm-bench-"))

    def systems():
        gen = PretrainedGenerator("smollm2", max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, pretrained=pre)
        return gen, {s: make_system(s, idx, gen, mode="hybrid") for s in SYSTEMS}

    ours_s, hf_s, splits, agree = [], [], [], []
    for r in range(a.repeats):  # interleaved: ours, then the baseline, each repeat
        gen, sy = systems()
        t0 = time.perf_counter()
        res = run_audit(sy, queries, tmp / f"ours{r}", resume=False, progress=False, authorities=auth,
                        n_boot=100, chunk_size=3 * a.batch_size)
        ours_s.append(time.perf_counter() - t0)
        splits.append(res["timing"])
        gen, sy = systems()
        base = hf_loop_audit(sy, hf, gen, queries, auth, a.max_new_tokens)
        hf_s.append(base["seconds"])
        mine = {(x["system"], x["query_id"]): x["answer"] for x in res["rows"]}
        agree.append(sum(mine[(x["system"], x["query_id"])] == x["answer"] for x in base["rows"]) / len(base["rows"]))
        print(f"  repeat {r}: ours {ours_s[-1]:.1f} s, transformers loop {hf_s[-1]:.1f} s", flush=True)
    n = len(queries) * len(SYSTEMS)
    ours_aps, hf_aps = n / statistics.median(ours_s), n / statistics.median(hf_s)
    t = splits[-1]
    print_table([{"what": f"audit {n} answers, answers/s", "baseline": hf_aps, "ours": ours_aps, "speedup": ours_aps / hf_aps,
                  "target": TARGET_LLM_SPEEDUP, "ok": ours_aps / hf_aps >= TARGET_LLM_SPEEDUP}],
                ["what", "baseline", "ours", "speedup", "target", "ok"])
    keys = ("retrieval_s", "prefill_s", "decode_s", "generation_s", "verification_s", "labelling_s", "wall_s")
    print("  our time split (last repeat): " + ", ".join(f"{k[:-2]} {t[k]:.1f} s" for k in keys)
          + f"; {t['prompt_tokens']} prompt tokens, {t['new_tokens']} new tokens")
    print(f"  same answer text as the transformers loop: {100 * statistics.median(agree):.0f}% of answers")
    load1 = load_average()
    print(f"  load average (1 min) before/after: {load0} / {load1} on {os.cpu_count()} cores")
    return {"llm_queries": len(queries), "llm_answers": n, "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size,
            "ours_s": ours_s, "hf_loop_s": hf_s, "ours_answers_per_s": ours_aps, "hf_loop_answers_per_s": hf_aps,
            "speedup": ours_aps / hf_aps, "target_speedup": TARGET_LLM_SPEEDUP, "speedup_ok": ours_aps / hf_aps >= TARGET_LLM_SPEEDUP,
            "time_split": t, "same_answer_share": statistics.median(agree), "llm_load_before": load0, "llm_load_after": load1}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("llm", "deterministic", "all"), default="llm")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 1 for llm, 2 for deterministic)")
    p.add_argument("--latency_queries", type=int, default=210, help="questions timed per retrieval mode")
    p.add_argument("--per_category", type=int, default=2, help="llm: queries per category (seeded subset)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="llm: answer length limit")
    p.add_argument("--batch_size", type=int, default=8, help="llm: prompts per generation batch (ours)")
    a = p.parse_args(argv)
    payload: dict = {"benchmark": "rag"}
    if a.what in ("llm", "all"):
        print_header("Legal RAG audit with SmolLM2-135M-Instruct: ours (batched) vs a transformers generate loop",
                     ("transformers", "torch"))
        payload |= llm(argparse.Namespace(**{**vars(a), "repeats": a.repeats or 1}))
    if a.what in ("deterministic", "all"):
        payload |= deterministic(argparse.Namespace(**{**vars(a), "repeats": a.repeats or 2}))
    emit_json(payload)
    return payload


def deterministic(a) -> dict:
    """Index build, the full deterministic audit and retrieval latency (issue 7)."""
    info = print_header("Legal RAG: index build, full audit, retrieval latency",
                        ("sentence-transformers", "eyecite", "reporters-db", "numpy"))
    load0 = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="rizz-rag-bench-"))
    queries = load_queries()
    passages = load_corpus()
    emb = Embedder()
    emb.encode(["warm up the encoder"])  # model load is not part of indexing

    build_s, audit_s, build_cpu, audit_cpu, idx = [], [], [], [], None
    for r in range(a.repeats):
        t, c = time.perf_counter(), time.process_time()
        idx = Index.build(tmp / f"index{r}.sqlite", passages, dense=True, embedder=Embedder())
        build_s.append(time.perf_counter() - t)
        build_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        auth = build_authorities(idx.passages)
        systems = {s: make_system(s, idx, "extractive", mode="hybrid") for s in ("closed_book", "naive_rag", "verified_rag")}
        res = run_audit(systems, queries, tmp / f"audit{r}", resume=False, progress=False, authorities=auth)
        audit_s.append(time.perf_counter() - t)
        audit_cpu.append(time.process_time() - c)
    assert idx is not None
    n_answers = len(res["rows"])

    # retrieval latency, interleaved over modes, query cache cleared so each question is embedded
    qs = [q["question"] for q in queries][: a.latency_queries]
    for q in qs[:5]:
        for m in ("bm25", "dense", "hybrid"):
            idx.search(q, 4, m)
    lat: dict[str, list[float]] = {m: [] for m in ("bm25", "dense", "hybrid")}
    cpu: dict[str, list[float]] = {m: [] for m in lat}
    for q in qs:
        for m in lat:
            idx.embedder._cache.clear()
            t, c = time.perf_counter(), time.process_time()
            idx.search(q, 4, m)
            lat[m].append(1000 * (time.perf_counter() - t))
            cpu[m].append(1000 * (time.process_time() - c))

    total = statistics.median(build_s) + statistics.median(audit_s)
    rows = [
        {"what": "index build (1069 passages, dense)", "median": statistics.median(build_s), "min": min(build_s),
         "cpu": statistics.median(build_cpu), "unit": "s"},
        {"what": f"full audit ({n_answers} answers)", "median": statistics.median(audit_s), "min": min(audit_s),
         "cpu": statistics.median(audit_cpu), "unit": "s"},
        {"what": "index + audit", "median": total, "cpu": statistics.median(build_cpu) + statistics.median(audit_cpu),
         "target": TARGET_INDEX_AUDIT_S, "ok": total <= TARGET_INDEX_AUDIT_S, "unit": "s"},
    ]
    for m, xs in lat.items():
        ok = None if m != "hybrid" else pct(xs, 0.5) <= TARGET_P50_MS
        rows.append({"what": f"retrieval {m} p50 (p90 {pct(xs, 0.9):.1f})", "median": pct(xs, 0.5), "min": min(xs),
                     "cpu": pct(cpu[m], 0.5), "target": TARGET_P50_MS if m == "hybrid" else None, "ok": ok, "unit": "ms"})
    print_table(rows, ["what", "median", "min", "cpu", "target", "ok", "unit"])
    print("  cpu = process CPU time (all threads); wall >> cpu means the cores were shared with other work")
    load1 = load_average()
    loads = " / ".join("n/a" if x is None else f"{x:.2f}" for x in (load0, load1))
    print(f"  load average (1 min) before/after: {loads} on {os.cpu_count()} cores")
    return {
        "machine": info, "load_before": load0, "load_after": load1,
        "index_build_s": statistics.median(build_s), "audit_s": statistics.median(audit_s), "n_answers": n_answers,
        "index_build_cpu_s": statistics.median(build_cpu), "audit_cpu_s": statistics.median(audit_cpu),
        "retrieval_p50_cpu_ms": {m: pct(xs, 0.5) for m, xs in cpu.items()},
        "index_plus_audit_s": total, "target_index_plus_audit_s": TARGET_INDEX_AUDIT_S,
        "index_plus_audit_ok": total <= TARGET_INDEX_AUDIT_S,
        "retrieval_p50_ms": {m: pct(xs, 0.5) for m, xs in lat.items()},
        "retrieval_p90_ms": {m: pct(xs, 0.9) for m, xs in lat.items()},
        "target_p50_ms": TARGET_P50_MS, "retrieval_ok": pct(lat["hybrid"], 0.5) <= TARGET_P50_MS,
    }


if __name__ == "__main__":
    main()
