import sqlite3

import numpy as np
import pytest

from rizzearch.errors import DataError
from rizzearch.rag.index import RRF_K, Index, fts_query, open_or_build


def test_fts_query_drops_stopwords_and_quotes():
    assert fts_query('Who wrote "the" opinion in Brown v. Board?') == '"wrote" OR "opinion" OR "brown" OR "v" OR "board"'
    assert fts_query("the of and") == ""


def test_bm25_finds_the_case(bm25_index):
    hits = bm25_index.search("Which Justice delivered the opinion of the Court in Brown v. Board of Education?", 4, "bm25")
    assert hits[0].passage.doc == "scotus/347us483"
    assert [h.bm25_rank for h in hits] == [1, 2, 3, 4]
    again = bm25_index.search("Which Justice delivered the opinion of the Court in Brown v. Board of Education?", 4, "bm25")
    assert [h.passage.id for h in again] == [h.passage.id for h in hits]


def test_bm25_only_index_falls_back_from_hybrid(bm25_index):
    hits = bm25_index.search("Where is diversity jurisdiction codified?", 3, "hybrid")
    assert hits[0].passage.id == "ruleqa/002" and hits[0].dense_rank is None
    with pytest.raises(DataError, match="without dense vectors"):
        bm25_index.search("anything legal", 3, "dense")


def test_dense_and_hybrid(dense_index):
    q = "Can the police question a suspect in custody without warning him of his rights?"
    dense = dense_index.search(q, 5, "dense")
    assert any(h.passage.doc == "scotus/384us436" for h in dense[:3])
    v = dense_index.vectors
    assert v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    hyb = dense_index.search(q, 5, "hybrid")
    for h in hyb:  # reciprocal rank fusion, by hand
        want = sum(1.0 / (RRF_K + r) for r in (h.bm25_rank, h.dense_rank) if r is not None)
        assert h.score == pytest.approx(want)
    assert [h.score for h in hyb] == sorted((h.score for h in hyb), reverse=True)


def test_bad_queries(bm25_index):
    with pytest.raises(DataError, match="empty question"):
        bm25_index.search("   ", 3)
    with pytest.raises(DataError, match="unknown retrieval mode"):
        bm25_index.search("court", 3, "magic")


def test_corrupt_index_files(tmp_path, bm25_index):
    bad = tmp_path / "garbage.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(DataError, match="garbage.sqlite.*rebuild"):
        Index.open(bad)
    with pytest.raises(DataError, match="no index file"):
        Index.open(tmp_path / "missing.sqlite")
    # a real SQLite file without our tables
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(DataError, match="other.sqlite"):
        Index.open(other)
    # truncated copy of a real index
    data = bm25_index.path.read_bytes()
    trunc = tmp_path / "trunc.sqlite"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="trunc.sqlite"):
        Index.open(trunc)


def test_schema_mismatch_and_rebuild(tmp_path, bm25_index):
    from rizzearch.legal.corpus import load_corpus

    path = tmp_path / "idx.sqlite"
    Index.build(path, load_corpus()[:30], dense=False).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="schema_version"):
        Index.open(path)
    idx = open_or_build(path, dense=False)  # stale / wrong version: rebuilt over the full corpus
    assert len(idx) == len(bm25_index)
    idx.close()


def test_never_overwrites_a_file_that_is_not_an_index(tmp_path):
    precious = tmp_path / "notes.db"
    precious.write_bytes(b"my own data, not an index" * 10)
    with pytest.raises(DataError, match="not a rizzearch index"):
        open_or_build(precious, dense=False)
    with pytest.raises(DataError, match="refusing to overwrite"):
        from rizzearch.legal.corpus import load_corpus

        Index.build(precious, load_corpus()[:5], dense=False)
    assert precious.read_bytes() == b"my own data, not an index" * 10
