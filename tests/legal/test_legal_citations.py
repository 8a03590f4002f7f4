import pytest

from rizzearch.legal.citations import check_existence, extract_citations


def one(text):
    cs = extract_citations(text)
    assert len(cs) == 1, cs
    return cs[0]


@pytest.mark.parametrize("text,kind,norm", [
    ("347 U.S. 483", "case", "347 U.S. 483"),
    ("Brown v. Board of Education, 347 U.S. 483 (1954)", "case", "347 U.S. 483"),
    ("Plessy v. Ferguson, 163 U. S. 537", "case", "163 U.S. 537"),
    ("U.S. Const. art. I, § 3, cl. 3", "constitution", "U.S. Const. art. I, § 3, cl. 3"),
    ("U.S. Const. amend. XIX", "constitution", "U.S. Const. amend. XIX"),
    ("U.S. Const. amend. XIV, § 1", "constitution", "U.S. Const. amend. XIV, § 1"),
    ("U.S. Const. art. 2, sec. 1", "constitution", "U.S. Const. art. II, § 1"),
    ("see [ruleqa/002]", "internal", "ruleqa/002"),
])
def test_lawyer_forms(text, kind, norm):
    c = one(text)
    assert (c.kind, c.normalized) == (kind, norm)


def test_case_name_and_year_are_read():
    c = one("As the Court held in Brown v. Board of Education, 347 U.S. 483 (1954), separate is unequal.")
    assert c.case_name == "Brown v. Board of Education" and c.year == 1954
    assert c.text == "Brown v. Board of Education, 347 U.S. 483 (1954)"


@pytest.mark.parametrize("text,verdict,detail", [
    ("Brown v. Board of Education, 347 U.S. 483 (1954)", "exists", "in the corpus"),
    ("Roe v. Wade, 347 U.S. 483 (1954)", "nonexistent", "is Brown v. Board of Education, not Roe v. Wade"),
    # "United States" is no evidence that two names agree (it once was: the stop words were not stemmed)
    ("United States v. Lopez, 418 U.S. 683 (1974)", "nonexistent", "is United States v. Nixon, not United States v. Lopez"),
    ("Miranda v. Arizona, 384 U.S. 436 (1970)", "nonexistent", "decided in 1966"),
    ("Brown v. Board of Education, 348 U.S. 12 (1955)", "nonexistent", "reported at 347 U.S. 483"),
    ("Smith v. Jones, 999 U.S. 1 (2030)", "nonexistent", "no volume 999"),
    ("Smith v. Jones, 300 U.S. 1 (1990)", "nonexistent", "from about 19"),
    ("Plessy v. Ferguson, 163 U.S. 537 (1896)", "unverifiable", "not in our corpus"),
    ("Acme v. Roe, 40 F.4th 1 (1990)", "nonexistent", "not published in 1990"),
    ("Acme v. Roe, 12 F.4th 55 (2021)", "unverifiable", "real reporter"),
    ("U.S. Const. amend. XXIX", "nonexistent", "27 amendments"),
    ("U.S. Const. art. I, § 11", "nonexistent", "does not exist"),
    ("U.S. Const. amend. XIX", "exists", "Constitution"),
    ("[scotus/347us483/meta]", "exists", "passage id"),
    ("[scotus/347us483]", "exists", "document id"),
    ("[ruleqa/999]", "nonexistent", "no passage"),
])
def test_existence(text, verdict, detail):
    v, d, pids = check_existence(one(text))
    assert v == verdict and detail in d
    assert bool(pids) == (verdict == "exists")


def test_constitution_citation_maps_to_passages():
    _, _, pids = check_existence(one("U.S. Const. amend. V"))
    assert pids == ["const/amend5/cl1", "const/amend5/cl2", "const/amend5/cl3", "const/amend5/cl4"]
    _, _, pids = check_existence(one("U.S. Const. art. I, § 3, cl. 3"))
    assert pids == ["const/art1/s3/cl3"]


def test_multiple_citations_in_order():
    cs = extract_citations("Cf. U.S. Const. amend. IV; Katz v. United States, 389 U.S. 347 (1967); [ruleqa/010].")
    assert [c.kind for c in cs] == ["constitution", "case", "internal"]
    assert extract_citations("") == [] and extract_citations("no citations here.") == []


def test_propositions_attach_a_citation_only_sentence_to_the_claim_before():
    from rizzearch.legal.citations import propositions

    (p,) = propositions("Justice Warren delivered the opinion. Brown v. Board of Education, 347 U.S. 483 (1954).")
    assert p["claim"] == "Justice Warren delivered the opinion." and [c.normalized for c in p["citations"]] == ["347 U.S. 483"]
    only = propositions("Dennis v. United States, 341 U.S. 494 (1951).")
    assert len(only) == 1 and only[0]["claim"].startswith("Dennis v. United States, 341 U.S. 494")  # its own claim
    assert [p["citations"] for p in propositions("No citation here. None here either.")] == [[], []]


def test_authority_table_tokenises_and_weighs_once():
    from rizzearch.legal.citations import default_authorities

    auth = default_authorities()
    idf, dflt = auth.idf_table()
    assert auth.idf_table()[0] is idf and dflt == max(idf.values())
    toks = auth.passage_tokens("scotus/347us483/meta")
    assert {"warren", "brown"} <= toks and auth.passage_tokens("scotus/347us483/meta") is toks
    assert auth.passage_tokens("no/such/passage") is None


# --- statutes and regulations (U.S. Code, C.F.R.) ---------------------------------------------------------------

def test_statute_citations_are_extracted_in_every_spelling():
    from rizzearch.legal.citations import extract_citations

    got = [(c.kind, c.normalized, c.path) for c in extract_citations(
        "Codified at 35 U.S.C. § 112(a); see also 28 USC § 1332, 28 U.S.C. 1367 and 40 C.F.R. § 1.2.")]
    assert got == [("statute", "35 U.S.C. § 112", ["usc", 35, "112"]), ("statute", "28 U.S.C. § 1332", ["usc", 28, "1332"]),
                   ("statute", "28 U.S.C. § 1367", ["usc", 28, "1367"]), ("statute", "40 C.F.R. § 1.2", ["cfr", 40, "1.2"])]


def test_statute_existence_against_the_index():
    from rizzearch.legal.citations import EXISTS, NONEXISTENT, UNVERIFIABLE, check_existence, default_authorities, extract_citations

    auth = default_authorities()

    def verdict(text):
        (c,) = extract_citations(text)
        return check_existence(c, auth)

    v, _, pids = verdict("35 U.S.C. § 112(a)")
    assert v == EXISTS and "ruleqa/036" in pids  # the rule_qa passage quotes "35 USC 112"
    assert verdict("99 U.S.C. § 1")[0] == NONEXISTENT and "54 titles" in verdict("99 U.S.C. § 1")[1]
    assert verdict("60 C.F.R. § 5.1")[0] == NONEXISTENT
    assert verdict("35 U.S.C. § 9999")[0] == UNVERIFIABLE


def test_statute_passages_of_a_users_corpus():
    from rizzearch.legal.citations import EXISTS, build_authorities, check_existence, extract_citations
    from rizzearch.legal.corpus import Passage

    p = Passage("mine/usc17-107", "user", "17 U.S.C. § 107", "Fair use",
                "The fair use of a copyrighted work for purposes such as criticism or teaching is not an infringement.")
    auth = build_authorities([p])
    (c,) = extract_citations("Fair use is a defence, 17 U.S.C. § 107(1).")
    assert check_existence(c, auth)[0] == EXISTS and check_existence(c, auth)[2] == ["mine/usc17-107"]


def test_a_statute_answer_with_its_passage_id_claims_the_statute():
    from rizzearch.legal.citations import propositions

    (prop,) = propositions("35 USC 103 [ruleqa/035].")
    assert [c.kind for c in prop["citations"]] == ["statute", "internal"]
    assert prop["claim"].strip(" .[]") == "35 USC 103"  # not "[ruleqa/035]", which no passage text holds
