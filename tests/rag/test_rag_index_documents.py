"""`rizz rag index --documents PATH`: a user's own corpus (folder or JSONL), then `rag ask --index` and
`audit --index --queries` on it. The small corpus is written here, for the test."""

import json

import pytest

from rizzearch.cli import main
from rizzearch.errors import DataError
from rizzearch.legal.documents import load_documents

LEASE = ("A residential landlord must return the security deposit within fourteen days after the tenant moves out. "
         "The landlord may deduct the cost of repairing damage beyond ordinary wear and tear. ") * 4
DOCS = [
    {"id": "smith-v-jones", "title": "Smith v. Jones", "citation": "Smith v. Jones, 123 F.3d 456 (1999)",
     "text": "In Smith v. Jones the court of appeals held that a landlord who keeps a security deposit without an "
             "itemized statement forfeits the right to withhold any part of it."},
    {"id": "fair-use", "title": "Fair use", "citation": "17 U.S.C. § 107",
     "text": "The fair use of a copyrighted work for purposes such as criticism, comment, news reporting or teaching "
             "is not an infringement of copyright."},
]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "lease.txt").write_text(LEASE)
    (d / "notes.md").write_text("# Notice periods\n\nA month-to-month tenancy ends on thirty days written notice.\n")
    (d / "sub" / "page.html").write_text("<html><head><title>Pets policy</title><script>var x = 1;</script></head>"
                                         "<body><p>Tenants may keep one cat with the landlord's written consent.</p></body></html>")
    (d / "image.png").write_bytes(b"\x89PNG\0\0")  # not a document suffix: ignored
    return d


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return p


def test_folder_documents_are_chunked_like_the_corpus(folder):
    ps = load_documents(folder, chunk_chars=200)
    docs = sorted({p.doc for p in ps})
    assert docs == ["doc/lease", "doc/notes", "doc/sub/page"]
    lease = [p for p in ps if p.doc == "doc/lease"]
    assert len(lease) > 1 and all(len(p.text) <= 200 for p in lease) and lease[0].id == "doc/lease/c00"
    assert " ".join(p.text for p in lease) == " ".join(LEASE.split())  # chunks cut at sentence ends, nothing lost
    page = next(p for p in ps if p.doc == "doc/sub/page")
    assert page.title == "Pets policy" and "var x" not in page.text and page.text.startswith("Tenants may keep")
    assert next(p for p in ps if p.doc == "doc/notes").title == "Notice periods"


def test_bad_documents(tmp_path, folder):
    (folder / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"empty.txt: empty document"):
        load_documents(folder)
    (folder / "empty.txt").unlink()
    (folder / "blob.txt").write_bytes(b"abc\0def")
    with pytest.raises(DataError, match=r"blob.txt: binary file"):
        load_documents(folder)
    (folder / "blob.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"blob.txt: not UTF-8"):
        load_documents(folder)
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(DOCS[0]) + "\n\n" + json.dumps({"id": "x", "title": "No text"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:3: document without 'text'"):
        load_documents(p)
    p.write_text(json.dumps(DOCS[0]) + "\n" + json.dumps(DOCS[0]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: duplicate document id 'smith-v-jones'"):
        load_documents(p)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no .txt/.md/.html/.htm documents"):
        load_documents(tmp_path / "none")


def test_index_ask_and_audit_on_own_documents(tmp_path, jsonl, capsys):
    idx = tmp_path / "mine.sqlite"
    assert main(["rag", "index", "--documents", str(jsonl), "--out", str(idx), "--dense", "false"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sources"] == {"documents": 2} and info["passages"] == 2
    assert main(["rag", "ask", "Must a landlord give an itemized statement to withhold a security deposit?",
                 "--index", str(idx), "--mode", "bm25", "--as_json", "true"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["passages"][0]["id"] == "doc/smith-v-jones/c00"  # the index was not rebuilt from the bundled corpus
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "m1", "category": "general", "false_premise": False, "gold_answer": "fair use",
                             "question": "Is the fair use of a copyrighted work for teaching an infringement of copyright?",
                             "gold_passages": ["doc/fair-use/c00"]}) + "\n")
    out = tmp_path / "audit"
    assert main(["audit", "--index", str(idx), "--queries", str(q), "--mode", "bm25", "--system", "naive_rag",
                 "--out", str(out), "--progress", "false", "--n_boot", "50"]) == 0
    (row,) = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert row["retrieved"][0] == "doc/fair-use/c00" and row["label"] == "accurate"
    assert json.loads((out / "metrics.json").read_text())["systems"]["naive_rag"]["retrieval"]["mrr"]["rate"] == 1.0


def test_existence_is_checked_against_the_documents_index(jsonl):
    from rizzearch.audit import label_response
    from rizzearch.legal.citations import build_authorities

    auth = build_authorities(load_documents(jsonl))
    q = {"id": "x", "category": "general", "false_premise": False, "question": "What did Smith v. Jones hold?",
         "gold_answer": "forfeits"}
    ok = label_response(q, "A landlord who keeps a deposit without an itemized statement forfeits the right to withhold "
                           "any part of it. Smith v. Jones, 123 F.3d 456 (1999).", authorities=auth)
    assert ok["citations"][0]["existence"] == "exists" and ok["label"] == "accurate"
    wrong_page = label_response(q, "The landlord forfeits it. Smith v. Jones, 123 F.3d 465 (1999).", authorities=auth)
    assert wrong_page["citations"][0]["existence"] == "nonexistent" and wrong_page["hallucinated"]
    outside = label_response(q, "The landlord forfeits it. Brown v. Board of Education, 347 U.S. 483 (1954).",
                             authorities=auth)
    assert outside["citations"][0]["existence"] == "unverifiable"  # real, but not in this index
    statute = label_response({**q, "gold_answer": "not an infringement"},
                             "Fair use for teaching is not an infringement, 17 U.S.C. § 107(1).", authorities=auth)
    assert statute["citations"][0]["existence"] == "exists" and statute["label"] == "accurate"


def test_documents_need_out_and_bad_input_exits_2(tmp_path, jsonl, capsys):
    assert main(["rag", "index", "--documents", str(jsonl), "--dense", "false"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "t"}\n')
    assert main(["rag", "index", "--documents", str(bad), "--out", str(tmp_path / "i.sqlite"), "--dense", "false"]) == 2
    assert "bad.jsonl:1: document without 'text'" in capsys.readouterr().err


def test_a_documents_index_is_never_replaced_by_the_bundled_corpus(tmp_path, jsonl):
    from rizzearch.errors import ConfigError
    from rizzearch.rag.index import Index, open_or_build

    path = tmp_path / "mine.sqlite"
    Index.build(path, load_documents(jsonl), dense=False, corpus="documents").close()
    before = path.read_bytes()
    idx = open_or_build(path, dense=False)
    assert [p.doc for p in idx.passages] == ["doc/smith-v-jones", "doc/fair-use"] and idx.meta["corpus"] == "documents"
    idx.close()
    with pytest.raises(ConfigError, match="without dense vectors.*--mode bm25"):
        open_or_build(path, dense=True)
    with pytest.raises(ConfigError, match="indexes your own documents: rebuild it with `rizz rag index --documents"):
        open_or_build(path, dense=False, rebuild=True)
    assert path.read_bytes() == before
