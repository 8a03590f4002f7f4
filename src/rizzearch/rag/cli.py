"""``rizz rag index`` and ``rizz rag ask``."""

from __future__ import annotations

import json
import sys
import time


def index(out: str | None = None, dense: bool = True, chunk_chars: int = 700, progress: bool = True) -> dict:
    """Build the legal RAG index (SQLite FTS5 + dense vectors) over the bundled corpus.

    Args:
        out: index file to write (default $RIZZ_CACHE/legal_rag_index.sqlite, i.e. ~/.cache/rizzearch/...).
        dense: also compute MiniLM vectors (all-MiniLM-L6-v2, offline) for dense and hybrid retrieval.
        chunk_chars: characters per opinion chunk.
        progress: show a progress bar while embedding.
    """
    from rizzearch.legal.corpus import load_corpus
    from rizzearch.rag.index import Index, default_index_path

    path = out or str(default_index_path())
    t0 = time.perf_counter()
    passages = load_corpus(chunk_chars=chunk_chars)
    idx = Index.build(path, passages, dense=dense, progress=progress)
    info = {"index": str(idx.path), "passages": len(idx), "dense": idx.has_dense,
            "sources": {s: sum(p.source == s for p in passages) for s in ("constitution", "scotus", "rule_qa")},
            "seconds": round(time.perf_counter() - t0, 2)}
    idx.close()
    print(json.dumps(info, indent=1))
    return info


def ask(question: str, index: str | None = None, system: str = "naive_rag", generator: str = "extractive", k: int = 4,
        mode: str = "hybrid", base_url: str | None = None, model: str | None = None, timeout: float = 60.0,
        retries: int = 2, label: bool = True, as_json: bool = False) -> dict:
    """Answer a legal question with citations and the passages used.

    Args:
        question: the question, in quotes.
        index: index file (default $RIZZ_CACHE/legal_rag_index.sqlite; built on first use).
        system: closed_book, naive_rag or verified_rag.
        generator: extractive (deterministic), memory, endpoint (OpenAI-compatible; see base_url) or checkpoint:PATH.
        k: passages to retrieve (at least 1).
        mode: retrieval mode: hybrid, bm25 or dense.
        base_url: endpoint URL for generator=endpoint (or RIZZ_LLM_BASE_URL / OPENAI_BASE_URL).
        model: model name at the endpoint (or RIZZ_LLM_MODEL).
        timeout: deadline in seconds for each endpoint request as a whole (connect, headers and body).
        retries: endpoint retries.
        label: also check every citation of the answer (existence, and support by the verifier's own check, rag.support).
        as_json: print the whole answer record as JSON instead of text.
    """
    from rizzearch.rag.index import open_or_build
    from rizzearch.rag.systems import check_question, make_system

    from rizzearch.errors import ConfigError

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--k: the number of passages to retrieve must be at least 1, got {k!r}")
    question = check_question(question)
    idx = open_or_build(index, dense=mode != "bm25")
    sysm = make_system(system, idx, generator, k=k, mode=mode, base_url=base_url, model=model, timeout=timeout, retries=retries)
    ans = sysm.answer(question)
    rec = ans.to_dict()
    if label and ans.status == "answered":
        from rizzearch.legal.citations import build_authorities, check_existence, propositions
        from rizzearch.rag.support import SupportCheck

        auth = build_authorities(idx.passages)
        support = SupportCheck()
        checks = []
        for prop in propositions(ans.text):
            for c in prop["citations"]:
                verdict, detail, pids = check_existence(c, auth)
                sc = support.score(prop["claim"], [auth.by_id[p] for p in pids]) if pids else None
                checks.append({"citation": c.normalized, "existence": verdict, "detail": detail,
                               "support_score": None if sc is None else round(sc, 3)})
        rec["citation_checks"] = checks
    if as_json:
        print(json.dumps(rec, indent=1))
        return rec
    w = sys.stdout.write
    w(f"\n[{ans.system} · {ans.generator} · {ans.status} · {ans.latency_s * 1000:.0f} ms]\n\n{ans.text}\n")
    if rec.get("citation_checks"):
        w("\nCitations:\n")
        for c in rec["citation_checks"]:
            w(f"  - {c['citation']}: {c['existence']} ({c['detail']})" +
              ("" if c["support_score"] is None else f", support {c['support_score']}") + "\n")
    if ans.passages:
        w("\nPassages used:\n")
        for i, p in enumerate(ans.passages, 1):
            w(f"  {i}. [{p['id']}] {p['ref']} (score {p['score']:.4f})\n     {p['text'][:240]}...\n")
    return rec

