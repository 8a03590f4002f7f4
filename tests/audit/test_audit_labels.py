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
    strict = label_response(q, weak, config=LabelConfig(support_threshold=0.99, semantic=False))
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


# --- issue 17: six answers written the way an LLM writes them, each mislabelled before the fix ----------------

def _q(qid):
    from rizzearch.audit.queries import load_queries

    return next(q for q in load_queries() if q["id"] == qid)


def test_justice_named_in_other_words_is_grounded():
    r = label_response(_q("author-376us254"), "Justice William J. Brennan Jr. wrote the majority opinion. "
                                               "New York Times Co. v. Sullivan, 376 U.S. 254 (1964).")
    assert (r["correctness"], r["groundedness"]) == ("correct", "grounded")  # was misgrounded (support 0.59)


def test_false_premise_correction_citing_the_right_case_is_grounded():
    r = label_response(_q("wrong_author-405us438"), "The question rests on a mistaken premise: Justice Brennan, not "
                       "Justice Holmes, authored the Court's opinion in Eisenstadt v. Baird, 405 U.S. 438 (1972).")
    assert (r["correctness"], r["groundedness"]) == ("correct", "grounded")  # was misgrounded ("Holmes", "premise")
    went_along = label_response(_q("wrong_author-405us438"), "Justice Holmes wrote it to protect unmarried persons' "
                                "access to contraceptives. Eisenstadt v. Baird, 405 U.S. 438 (1972).")
    assert went_along["hallucinated"]


def test_statute_citation_forms_match_the_gold():
    r = label_response(_q("rule_qa-036"), "The enablement requirement is codified at 35 U.S.C. § 112(a).")
    assert r["correctness"] == "correct"  # gold "35 USC 112"; was incorrect
    assert not gold_match("It is codified at 35 U.S.C. § 113.", "35 USC 112")[0]
    assert not gold_match("See 28 U.S.C. § 1331.", "28 USC § 1332")[0]


def test_citation_only_answer_is_grounded():
    r = label_response(_q("citation-274us037"), "It is reported at 274 U.S. 37 (1927).")
    assert (r["correctness"], r["groundedness"]) == ("correct", "grounded")  # was misgrounded (support 0.0)
    assert r["citations"][0]["citation_only"] is True
    wrong = label_response(_q("citation-274us037"), "It is reported at 275 U.S. 37 (1927).")
    assert wrong["correctness"] == "incorrect"


@pytest.mark.parametrize("answer", [
    "I'm not able to determine who wrote the opinion in Lathrop v. Donohue from the available sources.",
    "The provided passages do not say which Justice wrote the opinion.",
    "I do not have that information.",
    "Who delivered the opinion is not stated in the retrieved documents.",
])
def test_refusal_phrasings(answer):
    r = label_response(_q("author-367us820"), answer)
    assert r["correctness"] == "refusal" and r["label"] == "incomplete"  # the first was labelled incorrect


def test_faithful_paraphrase_of_constitutional_text_is_correct():
    pytest.importorskip("sentence_transformers")
    q = _q("const_text-const_amend3")
    r = label_response(q, "The Third Amendment says that in peacetime no soldier may be housed in a private home unless "
                          "the owner agrees, and in wartime only in a way the law prescribes. U.S. Const. amend. III.")
    assert (r["correctness"], r["groundedness"]) == ("correct", "grounded")  # was incorrect (word recall 0.43)
    assert label_response(q, "The Third Amendment protects the right to bear arms. U.S. Const. amend. III.")["hallucinated"]


def test_semantic_off_is_words_only():
    pytest.importorskip("sentence_transformers")
    q = _q("const_text-const_amend3")
    ans = ("The Third Amendment says that in peacetime no soldier may be housed in a private home unless the owner "
           "agrees, and in wartime only in a way the law prescribes.")
    assert label_response(q, ans)["correctness"] == "correct"
    assert label_response(q, ans, config=LabelConfig(semantic=False))["correctness"] == "incorrect"


def test_gold_numbers_must_match():
    gold = ("Diversity jurisdiction exists when the amount in controversy exceeds $75,000 and the plaintiffs and "
            "defendants are completely diverse")
    assert not gold_match("Diversity jurisdiction exists when the amount in controversy exceeds $50,000 and the "
                          "plaintiffs and defendants are completely diverse.", gold)[0]
    assert gold_match("It exists when the amount in controversy exceeds $75,000 and plaintiffs and defendants are "
                      "completely diverse.", gold)[0]


def test_statute_citations_are_labelled_like_case_citations():
    q = _q("rule_qa-002")  # gold "28 USC § 1332"
    ok = label_response(q, "Diversity jurisdiction is codified at 28 U.S.C. § 1332(a).")
    assert (ok["correctness"], ok["groundedness"]) == ("correct", "grounded")
    assert ok["citations"][0]["kind"] == "statute" and ok["citations"][0]["existence"] == "exists"
    fake = label_response(q, "Diversity jurisdiction is codified at 28 USC § 1332, as amended by 77 U.S.C. § 12.")
    assert fake["groundedness"] == "misgrounded" and fake["hallucinated"]  # the U.S. Code has 54 titles
    outside = label_response(q, "It is codified at 28 USC § 1332. See also 28 U.S.C. § 9999.")
    assert [c["existence"] for c in outside["citations"]] == ["exists", "unverifiable"]


def test_extractive_statute_answer_stays_grounded():
    # the naive RAG answer to rule_qa-035 in the legal-rag study; the statute citation must not misground it
    r = label_response(_q("rule_qa-035"), "35 USC 103 [ruleqa/035].")
    assert (r["correctness"], r["groundedness"]) == ("correct", "grounded")
    assert [c["existence"] for c in r["citations"]] == ["exists", "exists"]
