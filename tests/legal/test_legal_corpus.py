import json

import pytest

from rizzearch.errors import DataError
from rizzearch.legal.corpus import court_below, load_constitution, load_corpus, load_rule_qa, load_scotus
from rizzearch.legal.text import from_roman, roman, split_sentences


def test_ids_unique_stable_and_sources():
    a, b = load_corpus(), load_scotus() + load_rule_qa()
    ids = [p.id for p in a]
    assert len(ids) == len(set(ids))
    assert {p.source for p in a} == {"constitution", "scotus", "rule_qa"}
    assert [p.id for p in b] == [p.id for p in a if p.source != "constitution"]  # same ids on reload


def test_constitution_refs_are_bluebook():
    by = {p.id: p for p in load_constitution()}
    assert by["const/art1/s3/cl3"].ref == "U.S. Const. art. I, § 3, cl. 3"
    assert "thirty Years" in by["const/art1/s3/cl3"].text
    assert by["const/amend19/cl1"].ref.startswith("U.S. Const. amend. XIX")
    assert by["const/amend14/s1"].ref == "U.S. Const. amend. XIV, § 1"
    assert by["const/amend4"].ref == "U.S. Const. amend. IV" and "unreasonable searches" in by["const/amend4"].text
    assert len([p for p in by if p.startswith("const/amend")]) >= 27


def test_scotus_meta_states_what_the_text_says():
    ps = {p.id: p for p in load_scotus()}
    brown = ps["scotus/347us483/meta"]
    assert brown.ref == "Brown v. Board of Education, 347 U.S. 483 (1954)"
    assert brown.meta["opinion_by"] == "Warren" and brown.meta["decided"] == "1954-05-17"
    assert "District of Kansas" in brown.meta["court_below"]
    assert "Justice Warren delivered the opinion" in brown.text
    chunks = [p for p in ps.values() if p.doc == "scotus/347us483" and p is not brown]
    assert len(chunks) >= 3 and all(c.ref == brown.ref for c in chunks)
    assert all(len(c.text) <= 1400 for c in chunks)


def test_court_below_from_caption():
    raw = "MIRANDA v. ARIZONA.\n\nCERTIORARI TO THE SUPREME COURT OF ARIZONA.\nNo. 759. Argued"
    assert court_below(raw) == ("certiorari", "Supreme Court of Arizona")
    raw2 = "APPEAL FROM THE UNITED STATES DISTRICT COURT FOR THE\n\nNORTHERN DISTRICT OF TEXAS\nNo. 70-18."
    assert court_below(raw2) == ("appeal", "United States District Court for the Northern District of Texas")
    assert court_below("no caption here") is None


def test_sentence_splitter_keeps_citations_whole():
    s = split_sentences("See Brown v. Board of Education, 347 U. S. 483. Mr. Justice Black dissented. Why? Because.")
    assert s == ["See Brown v. Board of Education, 347 U. S. 483.", "Mr. Justice Black dissented.", "Why?", "Because."]


def test_roman_roundtrip():
    for n in range(1, 60):
        assert from_roman(roman(n)) == n
    assert from_roman("XIIII") is None and from_roman("abc") is None


def test_bad_scotus_index_is_a_clear_error(tmp_path):
    (tmp_path / "index.jsonl").write_text(json.dumps({"cite": "1 U.S. 1", "file": "missing.txt", "case_name": "X v. Y"}) + "\n")
    with pytest.raises(DataError, match="missing.txt"):
        load_scotus(tmp_path)
    (tmp_path / "index.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="index.jsonl:1"):
        load_scotus(tmp_path)


def test_unknown_source():
    with pytest.raises(DataError, match="unknown corpus source"):
        load_corpus(["nope"])
