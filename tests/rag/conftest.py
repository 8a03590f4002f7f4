"""Shared indexes for the RAG tests: a BM25-only index of the whole corpus (fast) and one small
dense index (MiniLM over a corpus subset), both built once per session."""

from __future__ import annotations

import pytest

from rizzearch.legal.corpus import load_corpus

DENSE_DOCS = ("scotus/347us483", "scotus/384us436")


def small_corpus():
    """About 80 passages: the amendments, two opinions, ten rule_qa items (embedding cost is per passage)."""
    keep = []
    for p in load_corpus():
        if (p.source == "constitution" and p.id.startswith("const/amend")) or p.doc in DENSE_DOCS \
                or (p.source == "rule_qa" and p.meta["row"] <= 10):
            keep.append(p)
    return keep


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory):
    from rizzearch.rag.index import Index

    idx = Index.build(tmp_path_factory.mktemp("rag") / "bm25.sqlite", load_corpus(), dense=False)
    yield idx
    idx.close()


@pytest.fixture(scope="session")
def dense_index(tmp_path_factory):
    from rizzearch.rag.index import Index

    idx = Index.build(tmp_path_factory.mktemp("rag") / "dense.sqlite", small_corpus(), dense=True)
    yield idx
    idx.close()
