from collections import Counter

import pytest

from rizzearch.audit import load_queries
from rizzearch.audit.build_queries import DATA, build_queries, to_jsonl
from rizzearch.audit.labels import gold_match
from rizzearch.errors import DataError
from rizzearch.legal.corpus import load_corpus


def test_bundled_set_shape():
    qs = load_queries()
    cats = Counter(q["category"] for q in qs)
    assert len(qs) >= 150 and set(cats) == {"general", "jurisdiction_time", "false_premise", "factual_recall"}
    assert cats["false_premise"] >= 20 and cats["factual_recall"] >= 25
    assert all(q["false_premise"] == (q["category"] == "false_premise") for q in qs)
    fams = Counter(q["family"] for q in qs if q["false_premise"])
    assert set(fams) == {"wrong_author", "wrong_dissent", "wrong_amendment", "fake_judge", "fake_case"}


def test_bundled_file_is_what_the_builder_makes():
    assert DATA.read_text(encoding="utf-8") == to_jsonl(build_queries())


def test_gold_answers_are_stated_by_gold_passages():
    by = {p.id: p for p in load_corpus()}
    for q in load_queries():
        assert all(pid in by for pid in q["gold_passages"]), q["id"]
        if q["false_premise"]:
            continue
        text = " ".join(by[pid].text for pid in q["gold_passages"])
        assert q["gold_passages"] and gold_match(text, q["gold_answer"])[0], q["id"]


def test_filters_and_bad_files(tmp_path):
    assert {q["category"] for q in load_queries(categories=["false_premise"])} == {"false_premise"}
    assert len(load_queries(limit=2)) == 8
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "a", "category": "general", "question": "q?", "gold_answer": "x"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:1: missing field\(s\) \['false_premise'\]"):
        load_queries(bad)
    bad.write_text('{"id": "a", "category": "trivia", "question": "q?", "gold_answer": "x", "false_premise": false}\n')
    with pytest.raises(DataError, match="trivia"):
        load_queries(bad)
    with pytest.raises(DataError, match="unknown categories"):
        load_queries(categories=["x"])


def test_mistyped_fields_are_named_with_file_and_line(tmp_path):
    """A string ``aliases`` used to become one alias per character (closed-book hallucination 83% -> 17%)."""
    import json

    good = {"id": "a", "category": "general", "question": "q?", "gold_answer": "x", "false_premise": False}
    bad = tmp_path / "q.jsonl"
    for field, value, words in [("aliases", "see gold", "aliases must be a list of strings"),
                                ("question", 123, "question must be a non-empty string, got the number 123"),
                                ("gold_answer", None, "gold_answer must be a non-empty string, got null"),
                                ("id", ["a"], "id must be a non-empty string, got a list")]:
        bad.write_text(json.dumps(good | {"id": "z"}) + "\n" + json.dumps(good | {field: value}) + "\n")
        with pytest.raises(DataError, match=rf"q.jsonl:2: {words}"):
            load_queries(bad)
