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
