from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory):
    from rizzearch.legal.corpus import load_corpus
    from rizzearch.rag.index import Index

    idx = Index.build(tmp_path_factory.mktemp("audit") / "bm25.sqlite", load_corpus(), dense=False)
    yield idx
    idx.close()
