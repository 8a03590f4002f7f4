import numpy as np
import pytest

from rizzearch.audit.human import COLUMNS, agreement, cohen_kappa, export_sheet, import_sheet
from rizzearch.audit.metrics import bootstrap_ci, compute_metrics, paired_difference
from rizzearch.errors import DataError


def rows_for(system, labels, cat="general"):
    out = []
    for i, lab in enumerate(labels):
        corr = {"accurate": "correct", "incomplete": "refusal", "hallucinated": "incorrect"}[lab]
        out.append({"system": system, "query_id": f"q{i}", "category": cat, "label": lab, "correctness": corr,
                    "groundedness": "grounded" if lab == "accurate" else None, "hallucinated": lab == "hallucinated",
                    "status": "answered", "citations": []})
    return out


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    x = np.r_[np.ones(30), np.zeros(70)]
    a, b = bootstrap_ci(x, 1000, 0, "k"), bootstrap_ci(x, 1000, 0, "k")
    assert a == b and a[0] == pytest.approx(0.3) and a[1] < 0.3 < a[2]
    assert 0.19 < a[1] < 0.23 and 0.37 < a[2] < 0.41  # ~ 0.3 +- 1.96 sqrt(.21/100)
    assert bootstrap_ci(np.ones(10), 100)[1:] == (1.0, 1.0)


def test_rates_by_hand():
    rows = rows_for("naive_rag", ["accurate"] * 6 + ["incomplete"] * 2 + ["hallucinated"] * 2)
    rows += rows_for("closed_book", ["accurate"] * 4 + ["hallucinated"] * 6)
    m = compute_metrics(rows, n_boot=200)
    o = m["systems"]["naive_rag"]["overall"]
    assert (o["accurate"]["rate"], o["incomplete"]["rate"], o["hallucinated"]["rate"]) == (0.6, 0.2, 0.2)
    assert o["answered"] == 8 and o["hallucinated_among_answered"]["rate"] == 0.25
    assert list(m["systems"]) == ["closed_book", "naive_rag"]
    d = paired_difference(rows, "closed_book", "naive_rag")
    assert d["diff"] == pytest.approx(-0.4) and d["n"] == 10
    assert compute_metrics(rows, n_boot=200) == m


def test_kappa_by_hand():
    # Cohen's textbook table: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> p_o=.7, p_e=.5, kappa=.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0 and cohen_kappa(["x"] * 3, ["x"] * 3) == 1.0
    with pytest.raises(DataError):
        cohen_kappa(["a"], [])


def _fill(path, edits):
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["human_correctness"], r["human_groundedness"] = edits(r)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_sheet_roundtrip_kappa_and_bad_sheets(tmp_path):
    rows = rows_for("naive_rag", ["accurate", "hallucinated", "incomplete", "accurate"])
    for r in rows:
        r.update(question="q?", gold_answer="g", answer="a")
    p = export_sheet(rows, tmp_path / "sheet.csv")
    keys = [(r["system"], r["query_id"]) for r in rows]
    with pytest.raises(DataError, match="4 row\\(s\\) have no human_correctness"):
        import_sheet(p, keys)
    _fill(p, lambda r: ("correct", "grounded") if r["query_id"] in ("q0", "q3") else ("incorrect", ""))
    human = import_sheet(p, keys)
    assert human[("naive_rag", "q0")] == {"correctness": "correct", "groundedness": "grounded", "label": "accurate"}
    auto = {(r["system"], r["query_id"]): r for r in rows}
    ag = agreement(auto, human)
    assert ag["n"] == 4 and ag["agreement_label"] == 0.75
    _fill(p, lambda r: ("maybe", ""))
    with pytest.raises(DataError, match="row 2: human_correctness 'maybe'"):
        import_sheet(p)
    _fill(p, lambda r: ("correct", ""))
    with pytest.raises(DataError, match="needs human_groundedness"):
        import_sheet(p)
    _fill(p, lambda r: ("refusal", ""))
    with pytest.raises(DataError, match="expected row\\(s\\) missing"):
        import_sheet(p, keys + [("naive_rag", "q99")])
    with pytest.raises(DataError, match="not found"):
        import_sheet(tmp_path / "nope.csv")
    # re-exporting never overwrites a sheet that holds human labels
    filled = p.read_text()
    again = export_sheet(rows, p)
    assert again.name == "sheet.new.csv" and p.read_text() == filled


def test_sheet_escapes_formula_cells_and_reads_them_back(tmp_path):
    import csv

    from rizzearch.audit.human import escape_cell, unescape_cell

    risky = ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "'=quoted", "'plain", "plain", "", "a=b"]
    for v in risky:
        assert unescape_cell(escape_cell(v)) == v
        assert escape_cell(v)[:1] not in ("=", "+", "-", "@", "\t", "\r")
    assert escape_cell("plain") == "plain" and escape_cell("=1") == "'=1" and escape_cell(None) == ""
    assert unescape_cell("=1") == "=1"  # a spreadsheet may save the text without its quote: kept as is
    rows = [{"system": "-sys", "query_id": f"={i}", "category": "general", "question": "q", "gold_answer": "g",
             "answer": v, "citations": [], "correctness": "correct", "groundedness": "grounded"} for i, v in enumerate(risky)]
    path = export_sheet(rows, tmp_path / "s.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert [unescape_cell(r["answer"]) for r in got] == risky and got[0]["query_id"] == "'=0"
    for r in got:
        r["human_correctness"], r["human_groundedness"] = "correct", "grounded"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(got)
    back = import_sheet(path, expected=[("-sys", f"={i}") for i in range(len(risky))])
    assert sorted(back) == sorted(("-sys", f"={i}") for i in range(len(risky)))


def test_retrieval_quality_by_hand():
    from rizzearch.audit.metrics import retrieval_quality

    rows = [{"gold_passages": ["a", "b"], "retrieved": ["x", "a", "y", "z"]},  # recall 1/2, hit, 1/rank 1/2
            {"gold_passages": ["c"], "retrieved": ["c", "x"]},  # recall 1, hit, 1/rank 1
            {"gold_passages": ["d"], "retrieved": ["x", "y"]},  # recall 0, miss, 0
            {"gold_passages": [], "retrieved": ["a"]},  # no gold passages (fake case): left out
            {"gold_passages": ["a"], "retrieved": []}]  # nothing retrieved (closed-book): left out
    r = retrieval_quality(rows, n_boot=200)
    assert (r["n"], r["k"]) == (3, 4)
    assert r["recall_at_k"]["rate"] == 0.5 and r["hit_at_k"]["rate"] == round(2 / 3, 4) and r["mrr"]["rate"] == 0.5
    lo, hi = r["mrr"]["ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert retrieval_quality([{"gold_passages": ["a"], "retrieved": []}]) is None
