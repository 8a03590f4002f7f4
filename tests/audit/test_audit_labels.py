import pytest

from rizzearch.audit import label_response
from rizzearch.audit.labels import LabelConfig, derived_label, gold_match
from rizzearch.errors import DataError

Q = {"id": "u1", "category": "factual_recall", "false_premise": False,
     "question": "Which Justice delivered the opinion of the Court in Brown v. Board of Education?", "gold_answer": "Warren"}
FP = {"id": "u2", "category": "false_premise", "false_premise": True,
      "question": "Why did Justice Black write the opinion of the Court in Brown v. Board of Education?",
      "gold_answer": "The premise is false: Justice Warren delivered the opinion."}
GOOD = "In Brown v. Board of Education, Justice Warren delivered the opinion of the Court. Brown v. Board of Education, 347 U.S. 483 (1954)."


def test_minimal_query_dict_works():
    r = label_response({k: Q[k] for k in ("id", "category", "question", "gold_answer", "false_premise")}, GOOD)
    assert (r["correctness"], r["groundedness"], r["hallucinated"], r["label"]) == ("correct", "grounded", False, "accurate")
    (c,) = r["citations"]
    assert c["existence"] == "exists" and c["supported"] is True and c["support_score"] == 1.0
    assert c["claim"].startswith("In Brown v. Board of Education, Justice Warren")


@pytest.mark.parametrize("answer,correctness,groundedness,label", [
    (GOOD, "correct", "grounded", "accurate"),
    ("Justice Warren delivered the opinion of the Court (Brown v. Board of Education, 348 U.S. 12 (1955)).", "correct", "misgrounded", "hallucinated"),
    ("Justice Warren delivered it. Korematsu v. United States, 323 U.S. 214 (1944).", "correct", "misgrounded", "hallucinated"),
    ("Justice Warren wrote the opinion.", "correct", "ungrounded", "incomplete"),
    ("Justice Warren wrote it. Plessy v. Ferguson, 163 U.S. 537 (1896).", "correct", "ungrounded", "incomplete"),
    ("Justice Black delivered the opinion of the Court. Brown v. Board of Education, 347 U.S. 483 (1954).", "incorrect", None, "hallucinated"),
    ("I cannot answer this question from the sources I found.", "refusal", None, "incomplete"),
    ("", "refusal", None, "incomplete"),
])
def test_paper_labels(answer, correctness, groundedness, label):
    r = label_response(Q, answer)
    assert (r["correctness"], r["groundedness"], r["label"]) == (correctness, groundedness, label)
    assert r["hallucinated"] == (label == "hallucinated")


def test_false_premise():
    acc = label_response(FP, "Justice Black did not write it. Justice Warren delivered the opinion of the Court. "
                             "Brown v. Board of Education, 347 U.S. 483 (1954).")
    assert acc["correctness"] == "correct" and acc["premise_flagged"] and acc["label"] == "accurate"
    declined = label_response(FP, "I cannot answer this reliably from the sources I found.")
    assert declined["correctness"] == "correct" and declined["label"] == "incomplete"  # correct but ungrounded
    went_along = label_response(FP, "Justice Black wrote it to end segregation. Brown v. Board of Education, 347 U.S. 483 (1954).")
    assert went_along["correctness"] == "incorrect" and went_along["hallucinated"]


def test_derived_label_table():
    assert derived_label("correct", "grounded") == "accurate"
    assert derived_label("correct", "ungrounded") == "incomplete"
    assert derived_label("correct", "misgrounded") == "hallucinated"
    assert derived_label("incorrect", None) == "hallucinated"
    assert derived_label("refusal", None) == "incomplete"


def test_gold_match_needs_the_rarest_word():
    gold = "United States District Court for the District of Kansas"
    assert gold_match("It came on appeal from the United States District Court for the District of Kansas.", gold)[0]
    assert not gold_match("It came from the United States District Court for the District of Columbia.", gold)[0]
    assert gold_match("The answer is twenty five Years.", "twenty five Years")[0]
    assert not gold_match("The answer is thirty Years.", "twenty five Years")[0]


def test_thresholds_matter():
    q = {**Q, "gold_answer": "Warren"}
    weak = "Warren. Brown v. Board of Education, 347 U.S. 483 (1954) says the schools were segregated by Justice Warren long ago in Topeka."
    strict = label_response(q, weak, config=LabelConfig(support_threshold=0.99))
    lax = label_response(q, weak, config=LabelConfig(support_threshold=0.05))
    assert strict["groundedness"] == "misgrounded" and lax["groundedness"] == "grounded"


def test_bad_query():
    with pytest.raises(DataError, match="gold_answer"):
        label_response({"question": "q"}, "a")
    with pytest.raises(DataError, match="category"):
        label_response({**Q, "category": "trivia"}, "a")


def test_an_answer_that_is_only_a_citation_is_its_own_proposition():
    q = {"id": "c", "category": "factual_recall", "false_premise": False,
         "question": "What is the United States Reports citation for Dennis v. United States?", "gold_answer": "341 U.S. 494"}
    r = label_response(q, "Dennis v. United States, 341 U.S. 494 (1951).")
    assert (r["correctness"], r["groundedness"]) == ("correct", "grounded")
    r = label_response(q, "Dennis v. United States, 341 U.S. 495 (1951).")
    assert r["correctness"] == "incorrect" and r["citations"][0]["existence"] == "nonexistent"
