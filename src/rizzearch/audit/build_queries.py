"""Build the audit's query set from the bundled corpus (``python -m rizzearch.audit.build_queries``).

The output, ``audit/data/queries.jsonl``, is committed; ``tests/audit`` checks that this builder still
reproduces it byte for byte. Every query has ``id``, ``category`` (the paper's four), ``family``,
``question``, ``gold_answer``, ``aliases``, ``false_premise`` and ``gold_passages`` (passage ids of the
corpus that state the answer). Families (see also ``docs/legal_rag.md``):

general (Magesh et al.: "general legal research")
  * ``rule_qa``: LegalBench rule_qa questions that name no jurisdiction, verbatim; gold = the LegalBench answer.
  * ``const_text``: Constitution provisions that are a single clause, asked by their heading
    ("What does the U.S. Constitution provide about quartering of soldiers?"); gold = its first sentence
    (the whole provision is an alias).
  * ``const_curated``: hand-written paraphrased questions on the Constitution; gold = a short span of the
    clause (located in the corpus automatically, so the gold passage is exact).

jurisdiction_time ("jurisdiction- or time-specific")
  * ``rule_qa_jurisdiction``: rule_qa questions tied to a forum (federal court, California state court).
  * ``court_below``: which lower court an opinion came from (parsed from the caption of the opinion).
  * ``decision_date``: the date a case was decided (the "Decided ..." line).
  * ``const_time``: hand-written questions on dates, terms, ages and places in the Constitution.

false_premise
  * ``wrong_author``: asks why Justice X wrote an opinion that Justice Y delivered.
  * ``wrong_dissent``: asks why the Justice who delivered the opinion dissented.
  * ``wrong_amendment``: attributes a right to the wrong amendment, or asks about an amendment that
    does not exist.
  * ``fake_judge`` / ``fake_case``: asks about a Justice or a case that does not exist.
  The gold answer states the correction; a correct answer corrects the premise or declines.

factual_recall
  * ``author``: who delivered the opinion of the Court. ``citation``: the U.S. Reports citation.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from rizzearch.legal.corpus import REVIEW_PHRASES, date_words, load_corpus
from rizzearch.legal.text import ORDINALS, split_sentences

DATA = Path(__file__).resolve().parent / "data" / "queries.jsonl"
SEED = 7

_STATES = """Alabama Alaska Arizona Arkansas California Colorado Connecticut Delaware Florida Georgia Hawaii Idaho Illinois
Indiana Iowa Kansas Kentucky Louisiana Maine Maryland Massachusetts Michigan Minnesota Mississippi Missouri Montana
Nebraska Nevada New Hampshire Jersey Mexico York North Carolina Dakota Ohio Oklahoma Oregon Pennsylvania Rhode Island
South Tennessee Texas Utah Vermont Virginia Washington West Wisconsin Wyoming Columbia Orange""".split()
_COURT_WORDS = set(_STATES) | set("""United States District Court Courts of for the Appeals Circuit Supreme Errors Northern Southern
Eastern Western Middle Claims Criminal Superior Appellate Department County Customs State First Second Third Fourth
Fifth Sixth Seventh Eighth Ninth Tenth Eleventh""".split())

# (question, gold span as written in the Constitution text, category[, aliases])
CONST_CURATED = [
    ("How long is the term of a United States Senator?", "six Years", "general"),
    ("What is the minimum age for a member of the House of Representatives?", "twenty five Years", "general"),
    ("What is the minimum age to be eligible for the office of President?", "thirty-five Years", "general"),
    ("Which chamber of Congress has the sole power of impeachment?", "House of Representatives shall chuse their Speaker and other Officers; and shall have the sole Power of Impeachment", "general"),
    ("Which body has the sole power to try all impeachments?", "The Senate shall have the sole Power to try all Impeachments", "general"),
    ("Who presides when the President of the United States is tried on impeachment?", "the Chief Justice shall preside", "general"),
    ("Where must all bills for raising revenue originate?", "All bills for raising Revenue shall originate in the House of Representatives", "general"),
    ("What evidence is required to convict a person of treason?", "Testimony of two Witnesses to the same overt Act, or on Confession in open Court", "general"),
    ("Who is commander in chief of the Army and Navy of the United States?", "The President shall be Commander in Chief", "general"),
    ("When may the privilege of the writ of habeas corpus be suspended?", "when in Cases of Rebellion or Invasion the public Safety may require it", "general"),
    ("Does the Constitution allow a person to be tried twice for the same offense?", "twice put in jeopardy of life or limb", "general"),
    ("What does the Constitution say about excessive bail and cruel punishments?", "Excessive bail shall not be required", "general"),
    ("What makes the Constitution and federal treaties binding on state judges?", "supreme Law of the Land", "general"),
    ("May a religious test be required as a qualification for federal office?", "no religious Test shall ever be required", "general"),
    ("What power does Congress have to regulate commerce?", "To regulate Commerce with foreign Nations, and among the several States, and with the Indian Tribes", "general"),
    ("Which branch has the power to declare war?", "To declare War", "general"),
    ("May the United States grant titles of nobility?", "No Title of Nobility shall be granted by the United States", "general"),
    ("How many states must ratify an amendment before it becomes part of the Constitution?", "three fourths of the several States", "general"),
    ("What must the President swear or affirm before entering office?", "preserve, protect and defend the Constitution of the United States", "general"),
    ("What protection does the Constitution give against taking private property for public use?", "without just compensation", "general"),
    ("At what time does the term of the President end under the Twentieth Amendment?", "noon on the 20th day of January", "jurisdiction_time"),
    ("On what day must Congress assemble each year under the Twentieth Amendment?", "noon on the 3d day of January", "jurisdiction_time"),
    ("What minimum voting age does the Twenty-sixth Amendment protect?", "eighteen years of age or older", "jurisdiction_time"),
    ("How many times may a person be elected to the office of President?", "No person shall be elected to the office of the President more than twice", "jurisdiction_time"),
    ("Until what year could Congress not prohibit the migration or importation of persons?", "one thousand eight hundred and eight", "jurisdiction_time"),
    ("How many years must a Senator have been a citizen of the United States?", "nine Years a Citizen", "jurisdiction_time"),
    ("How long must a person have resided within the United States to be eligible for President?", "fourteen Years a Resident within the United States", "jurisdiction_time"),
    ("In which cases does the Supreme Court have original jurisdiction?", "Cases affecting Ambassadors, other public Ministers and Consuls, and those in which a State shall be Party", "jurisdiction_time"),
    ("In which courts is the judicial power of the United States vested?", "one supreme Court, and in such inferior Courts as the Congress may from time to time ordain and establish", "jurisdiction_time"),
    ("In which state must the trial of a federal crime be held?", "held in the State where the said Crimes shall have been committed", "jurisdiction_time"),
    ("From which state and district must the jury in a federal criminal prosecution be drawn?", "State and district wherein the crime shall have been committed", "jurisdiction_time"),
    ("Above what amount in controversy does the Seventh Amendment preserve the right of trial by jury?", "twenty dollars", "jurisdiction_time"),
    ("How often must the enumeration (census) of the population be made?", "within every subsequent Term of ten Years", "jurisdiction_time"),
    ("Who becomes President if the President is removed from office, dies or resigns?", "the Vice President shall become President", "general",
     ["shall devolve on the Vice President"]),
]

WRONG_AMENDMENT = [
    ("Why does the Third Amendment guarantee the accused the assistance of counsel?",
     "The premise is false: the Third Amendment concerns quartering soldiers; the right to the assistance of counsel is in the Sixth Amendment.", ["const/amend3", "const/amend6"]),
    ("How does the Second Amendment protect against unreasonable searches and seizures?",
     "The premise is false: the Second Amendment concerns the right to keep and bear arms; unreasonable searches and seizures are addressed by the Fourth Amendment.", ["const/amend2", "const/amend4"]),
    ("Why does the First Amendment set the voting age at eighteen?",
     "The premise is false: the voting age of eighteen comes from the Twenty-sixth Amendment, not the First.", ["const/amend1", "const/amend26/s1"]),
    ("How does the Twenty-eighth Amendment limit campaign spending?",
     "The premise is false: the Constitution has only twenty-seven amendments; there is no Twenty-eighth Amendment.", []),
    ("What does the Eighth Amendment say about the right of women to vote?",
     "The premise is false: the Eighth Amendment concerns bail, fines and cruel and unusual punishments; the right to vote regardless of sex is in the Nineteenth Amendment.", ["const/amend8"]),
    ("Which rights does the Thirtieth Amendment guarantee to tenants?",
     "The premise is false: there is no Thirtieth Amendment to the Constitution.", []),
]
FAKE_JUDGES = [
    ("Summarize Justice Eleanor Whitcombe's dissent in Miranda v. Arizona.", "Whitcombe"),
    ("What did Justice Harold Pemberton hold about the Commerce Clause?", "Pemberton"),
    ("Which free speech opinions did Chief Justice Nathaniel Ashgrove write?", "Ashgrove"),
    ("Why did Justice Marguerite Delacroix dissent in Roe v. Wade?", "Delacroix"),
]
FAKE_CASES = [
    ("What did the Supreme Court hold in Harrington v. Vermont Board of Fisheries (1973)?", "Harrington v. Vermont Board of Fisheries"),
    ("Who wrote the majority opinion in Castellano v. Pacific Timber Co.?", "Castellano v. Pacific Timber Co."),
    ("What standard did the Court adopt in Whitfield v. Delaware Railway Commission?", "Whitfield v. Delaware Railway Commission"),
    ("Summarize the holding of Okafor v. United States Mint (1966).", "Okafor v. United States Mint"),
]

_JURIS = re.compile(r"federal court|state court|California|venue|specific jurisdiction", re.I)


def _q(qid, category, family, question, gold, passages, false_premise=False, aliases=()):
    return {"id": qid, "category": category, "family": family, "question": question, "gold_answer": gold,
            "aliases": list(aliases), "false_premise": false_premise, "gold_passages": list(passages)}


def build_queries() -> list[dict]:
    """The full query set, deterministic for a given corpus."""
    rng = random.Random(SEED)
    ps = load_corpus()
    metas = sorted((p for p in ps if p.id.endswith("/meta")), key=lambda p: p.id)
    chunks: dict[str, list] = {}
    for p in ps:
        if p.source == "scotus" and not p.id.endswith("/meta"):
            chunks.setdefault(p.doc, []).append(p)
    out = _rule_qa_queries(ps) + _constitution_queries(ps)
    court_date = _court_and_date_queries(metas, rng)
    authored = [p for p in metas if p.meta.get("opinion_by")]
    pool = rng.sample(authored, len(authored))  # one shuffle: the first 20 ask for the author, the next 14 are false premises
    out += court_date + _author_and_citation_queries(pool[:20], metas, chunks, rng)
    out += _false_premise_queries(pool[20:34], sorted({p.meta["opinion_by"] for p in authored}), chunks, rng)
    ids = [q["id"] for q in out]
    if len(set(ids)) != len(ids):
        raise AssertionError("duplicate query ids")
    return out


def _rule_qa_queries(ps) -> list[dict]:
    """LegalBench rule_qa: each question with its answer (jurisdiction questions in their own category)."""
    out = []
    for p in ps:
        if p.source != "rule_qa":
            continue
        juris = bool(_JURIS.search(p.title))
        cat, fam = ("jurisdiction_time", "rule_qa_jurisdiction") if juris else ("general", "rule_qa")
        out.append(_q(f"{fam}-{p.meta['row']:03d}", cat, fam, p.title, p.text, [p.id]))
    return out


def _constitution_queries(ps) -> list[dict]:
    """What short Constitution sections provide, then the curated text and time questions."""
    const = [p for p in ps if p.source == "constitution"]
    by_doc_prefix: dict[str, list] = {}
    for p in const:
        parts = p.id.split("/")
        by_section = parts[1].startswith("art") and len(parts) > 2 and parts[2].startswith("s")
        key = "/".join(parts[:3]) if by_section else "/".join(parts[:2])
        by_doc_prefix.setdefault(key, []).append(p)
    out = []
    for key, group in by_doc_prefix.items():
        p = group[0]
        if len(group) != 1 or p.id == "const/preamble" or len(p.text) > 400:
            continue
        heading = p.title.split(":", 1)[1].strip() if ":" in p.title else p.title
        if not heading or heading.lower().startswith("amendment"):
            continue
        where = f"the {ORDINALS[p.meta['amendment']].capitalize()} Amendment" if "amendment" in p.meta else p.title.split(":")[0]
        first = split_sentences(p.text)[0]
        out.append(_q(f"const_text-{p.id.replace('/', '_')}", "general", "const_text",
                      f"What does {where} of the U.S. Constitution provide about {heading.lower()}?", first, [p.id],
                      aliases=[p.text] if first != p.text else []))
    for i, (question, span, cat, *alias) in enumerate(CONST_CURATED, 1):
        hits = [p.id for p in const if span in p.text]
        if len(hits) < 1:
            raise AssertionError(f"curated span not found in the Constitution: {span!r}")
        fam = "const_curated" if cat == "general" else "const_time"
        alias = alias[0] if alias else []
        for a in alias:
            hits += [p.id for p in const if a in p.text and p.id not in hits]
        out.append(_q(f"{fam}-{i:02d}", cat, fam, question, span, hits[:3], aliases=alias))
    return out


def _gold_ids(p, needle: str, chunks: dict[str, list]) -> list[str]:
    """The case's meta passage and up to two of its opinion chunks that mention ``needle``."""
    return [p.id] + [c.id for c in chunks.get(p.doc, []) if needle.lower() in c.text.lower()][:2]


def _court_and_date_queries(metas, rng: random.Random) -> list[dict]:
    """Supreme Court opinions: which lower court a case came from, and when it was decided."""
    clean_below = [p for p in metas if p.meta.get("court_below")
                   and all(w.strip(",") in _COURT_WORDS for w in p.meta["court_below"].split())]
    out = []
    for p in rng.sample(clean_below, min(34, len(clean_below))):
        m = p.meta
        how = REVIEW_PHRASES[m["review"]]
        out.append(_q(f"court_below-{p.doc.split('/')[1]}", "jurisdiction_time", "court_below",
                      f"{m['case_name']} ({m['year']}) reached the Supreme Court {how} which lower court?",
                      m["court_below"], [p.id]))
    dated = [p for p in metas if p.meta.get("decided")]
    for p in rng.sample(dated, 16):
        m = p.meta
        out.append(_q(f"decision_date-{p.doc.split('/')[1]}", "jurisdiction_time", "decision_date",
                      f"On what date did the Supreme Court decide {m['case_name']}?", date_words(m["decided"]), [p.id]))
    return out


def _author_and_citation_queries(authored, metas, chunks: dict[str, list], rng: random.Random) -> list[dict]:
    """Who delivered the opinion of the Court (``authored``), and the United States Reports citation."""
    out = []
    for p in authored:
        m = p.meta
        out.append(_q(f"author-{p.doc.split('/')[1]}", "factual_recall", "author",
                      f"Which Justice delivered the opinion of the Court in {m['case_name']} ({m['year']})?",
                      m["opinion_by"], _gold_ids(p, m["opinion_by"], chunks)))
    for p in rng.sample(metas, 12):
        m = p.meta
        out.append(_q(f"citation-{p.doc.split('/')[1]}", "factual_recall", "citation",
                      f"What is the United States Reports citation for {m['case_name']}?", m["cite"], [p.id]))
    return out


def _false_premise_queries(pool, authors: list[str], chunks: dict[str, list], rng: random.Random) -> list[dict]:
    """Questions built on a false premise: the wrong author, a dissent that was the majority, the wrong
    amendment, a Justice or a case that never existed. ``pool``: 14 authored cases (8 + 6)."""
    out = []
    for p in pool[:8]:
        m = p.meta
        wrong = rng.choice([a for a in authors if a != m["opinion_by"]])
        out.append(_q(f"wrong_author-{p.doc.split('/')[1]}", "false_premise", "wrong_author",
                      f"Why did Justice {wrong} write the opinion of the Court in {m['case_name']} ({m['year']})?",
                      f"The premise is false: Justice {m['opinion_by']}, not Justice {wrong}, delivered the opinion of the Court in {m['case_name']}.",
                      _gold_ids(p, m["opinion_by"], chunks), True))
    for p in pool[8:14]:
        m = p.meta
        out.append(_q(f"wrong_dissent-{p.doc.split('/')[1]}", "false_premise", "wrong_dissent",
                      f"Why did Justice {m['opinion_by']} dissent in {m['case_name']} ({m['year']})?",
                      f"The premise is false: Justice {m['opinion_by']} did not dissent in {m['case_name']}; he delivered the opinion of the Court.",
                      _gold_ids(p, m["opinion_by"], chunks), True))
    for i, (question, gold, pids) in enumerate(WRONG_AMENDMENT, 1):
        out.append(_q(f"wrong_amendment-{i:02d}", "false_premise", "wrong_amendment", question, gold, pids, True))
    for i, (question, name) in enumerate(FAKE_JUDGES, 1):
        out.append(_q(f"fake_judge-{i:02d}", "false_premise", "fake_judge", question,
                      f"The premise is false: no Justice named {name} has served on the Supreme Court.", [], True))
    for i, (question, name) in enumerate(FAKE_CASES, 1):
        out.append(_q(f"fake_case-{i:02d}", "false_premise", "fake_case", question,
                      f"The premise is false: there is no Supreme Court case named {name}.", [], True))
    return out


def to_jsonl(queries: list[dict]) -> str:
    return "".join(json.dumps(q, sort_keys=True, ensure_ascii=False) + "\n" for q in queries)


def main(path: str | None = None) -> Path:
    """Write the query set (default: the bundled ``audit/data/queries.jsonl``)."""
    out = Path(path) if path else DATA
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_jsonl(build_queries()), encoding="utf-8")
    return out


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(main(sys.argv[1] if len(sys.argv) > 1 else None))
