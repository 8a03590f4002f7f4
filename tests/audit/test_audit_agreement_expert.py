"""`rizz audit agreement`: our labeller against expert labels, on CSVs in the shape of reglab/legal_rag_hallucinations.

The fixture text is written here for the test (the released dataset cannot be fetched, and we commit no text we
did not write): three questions on our corpus, two tools, one response each, expert labels by hand. One expert
label is deliberately one our labeller does not share (ToolB's "twenty-five" answer, marked correct).
"""

import csv
import json

import pytest

from rizzearch.audit.agreement import expert_agreement, load_expert, our_category
from rizzearch.cli import main
from rizzearch.errors import DataError

QUESTIONS = [
    {"Question ID": "q1", "Question": "Which Justice delivered the opinion of the Court in Mills v. Alabama?",
     "Question Category": "Factual recall", "Answer": "Black"},
    {"Question ID": "q2", "Question": "Why did Justice Roberts write the opinion of the Court in Mills v. Alabama?",
     "Question Category": "False premise", "Answer": "The premise is false: Justice Black delivered the opinion."},
    {"Question ID": "q3", "Question": "What is the minimum age to be a Senator?",
     "Question Category": "General legal research", "Answer": "thirty Years"},
]
RESPONSES = [
    ("q1", "ToolA", "Justice Black delivered the opinion of the Court. Mills v. Alabama, 384 U.S. 214 (1966).", "Correct", "Grounded"),
    ("q2", "ToolA", "Justice Roberts wrote it to protect newspaper editorials published on election day.", "Incorrect", ""),
    ("q3", "ToolA", "No person may be a Senator before reaching the age of thirty years. U.S. Const. art. I, § 3, cl. 3.",
     "Correct", "Grounded"),
    ("q1", "ToolB", "Justice Douglas delivered the opinion of the Court.", "Incorrect", ""),
    ("q2", "ToolB", "Justice Roberts did not write it; Justice Black delivered the opinion of the Court. "
                    "Mills v. Alabama, 384 U.S. 214 (1966).", "Correct", "Grounded"),
    ("q3", "ToolB", "A Senator must be at least twenty-five years old.", "Correct", "Ungrounded"),
]


def _write(tmp_path, qcols=None, dcols=None, rows=None):
    qcols = qcols or list(QUESTIONS[0])
    dcols = dcols or ["Question ID", "Model", "Response", "Correctness", "Groundedness"]
    qp, dp = tmp_path / "questions.csv", tmp_path / "dataset.csv"
    with open(qp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(qcols)
        for q in QUESTIONS:
            w.writerow(list(q.values()))
    with open(dp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(dcols)
        w.writerows(rows or RESPONSES)
    return dp, qp


def test_kappa_and_confusion_by_hand(tmp_path):
    dp, qp = _write(tmp_path)
    res = expert_agreement(dp, qp)
    h = res["overall"]["hallucinated"]
    # expert T: ToolA q2, ToolB q1; ours adds ToolB q3 (wrong age). p_o = 5/6, p_e = (2*3 + 4*3)/36 = 1/2
    assert h["confusion"] == {"False|False": 3, "False|True": 1, "True|True": 2}
    assert h["kappa"] == round((5 / 6 - 0.5) / 0.5, 4) and h["accuracy"] == round(5 / 6, 4)
    assert res["by_system"]["ToolA"]["hallucinated"]["kappa"] == 1.0
    # ToolB: expert T,F,F; ours T,F,T: p_o = 2/3, p_e = (1*2 + 2*1)/9 -> kappa 0.4
    assert res["by_system"]["ToolB"]["hallucinated"]["kappa"] == 0.4
    assert set(res["by_category"]) == {"Factual recall", "False premise", "General legal research"}
    assert res["paper_inter_annotator_kappa"] == 0.77


def test_columns_by_name_any_case_and_order(tmp_path):
    dp, qp = _write(tmp_path, qcols=["question id", "QUESTION", "question_category", "answer"],
                    dcols=["QUESTION ID", "model", "RESPONSE", "correctness", "GROUNDEDNESS"])
    rows = load_expert(dp, qp)
    assert len(rows) == 6 and rows[1]["query"]["false_premise"] and rows[0]["system"] == "ToolA"


def test_missing_column_lists_the_columns_found(tmp_path):
    dp, qp = _write(tmp_path, dcols=["Question ID", "Model", "Response", "Correctness", "Grade"])
    with pytest.raises(DataError, match=r"dataset.csv: missing column\(s\) groundedness .*columns found: \['Question ID', "
                                        r"'Model', 'Response', 'Correctness', 'Grade'\]"):
        load_expert(dp, qp)


def test_bad_rows_name_file_and_line(tmp_path):
    dp, qp = _write(tmp_path, rows=RESPONSES[:2] + [("q3", "ToolA", "x", "Mostly right", "")])
    with pytest.raises(DataError, match=r"dataset.csv:4: correctness 'Mostly right'"):
        load_expert(dp, qp)
    dp, qp = _write(tmp_path, rows=[("q9", "ToolA", "x", "Correct", "Grounded")])
    with pytest.raises(DataError, match=r"dataset.csv:2: question id 'q9' is not in"):
        load_expert(dp, qp)
    dp, qp = _write(tmp_path, rows=[("q1", "ToolA", "Black.", "Correct", "")])
    with pytest.raises(DataError, match=r"dataset.csv:2: a correct response needs groundedness"):
        load_expert(dp, qp)


def test_category_names():
    assert [our_category(c) for c in ("General legal research", "Jurisdiction or time-specific", "False premise",
                                      "Factual recall", "something else")] == [
        "general", "jurisdiction_time", "false_premise", "factual_recall", "general"]


def test_cli(tmp_path, capsys):
    dp, qp = _write(tmp_path)
    out = tmp_path / "agree"
    assert main(["audit", "agreement", "--expert", str(dp), "--questions", str(qp), "--out", str(out)]) == 0
    res = json.loads((out / "agreement.json").read_text())
    assert res["n"] == 6 and "0.77" in (out / "agreement.md").read_text()
    assert "| system: ToolB | 3 | 0.4 |" in capsys.readouterr().out
    dp2, _ = _write(tmp_path, dcols=["Question ID", "Model", "Text", "Correctness", "Groundedness"])
    assert main(["audit", "agreement", "--expert", str(dp2), "--questions", str(qp)]) == 2
    assert "columns found" in capsys.readouterr().err
