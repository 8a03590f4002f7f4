import json

import pytest

from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.legal_rag import RATES, SYSTEMS, paired_differences, stratified, study_claims, wilson_rates

CLAIMS = {"retrieval_lowers_hallucination", "retrieval_does_not_remove_hallucination",
          "verification_trades_hallucinations_for_refusals", "closed_book_cites_nonexistent_authorities"}


def _check_results(tmp_path, res, tier, simulated=True):
    data = read_results(tmp_path / "results.json")
    assert data == res and data["study"] == "legal-rag"
    assert {c["id"] for c in data["claims"]} == CLAIMS
    m = data["metrics"]
    assert m["mode"] == "tiny" and m["tier"] == tier and m["labels_deterministic"] is True
    assert m["n_queries"] == 8 and len(m["categories"]) == 4
    assert all(c["model"] == m["model"] and "random tiny llama" in c["model"] for c in data["claims"])
    assert set(m["systems"]) == set(SYSTEMS)
    for s in SYSTEMS:  # a real (here: tiny random) LM produced the headline answers, named as such
        assert m["systems"][s]["generator"].startswith("random tiny llama") and "simulated" not in m["systems"][s]["generator"]
        for k in RATES:
            r = m["systems"][s]["rates"]["overall"][k]
            assert r["n"] == 8 and 0 <= r["ci95"][0] <= r["ci95"][1] <= 1
        assert set(m["systems"][s]["rates"]) == {"overall", *m["categories"]}
    t = m["timing"]
    assert t["new_answers"] == 24 and t["answers_per_s"] > 0 and t["prefill_s"] > 0 and t["decode_s"] > 0
    md = (tmp_path / "report.md").read_text()
    assert md.count("## Claims") == 1 and "answers/s" in md and ("## Ablation: simulated generators" in md) == simulated
    if simulated:
        sim = m["simulated_ablation"]["bm25"]
        assert sim["closed_book"]["generator"].startswith("simulated: simulated closed-book (MemoryGenerator")
        assert all(e["generator"].startswith("simulated") for e in sim.values())
    for f in ("report.md", "report.html", "audit_chart.png", "audit/answers.jsonl", "audit/timing.json"):
        assert (tmp_path / f).is_file()
    return data


def test_legal_rag_tiny(tmp_path):
    from rizzearch.reproduce.legal_rag import run

    data = _check_results(tmp_path, run(str(tmp_path), tiny=True), "quick")
    rows = [json.loads(line) for line in (tmp_path / "audit" / "answers.jsonl").read_text().splitlines()]
    assert all(r["status"] == "answered" and r["generator"].startswith("pretrained:") for r in rows
               if r["system"] == "closed_book")  # the LM's own text (a random model's: often empty), not a canned answer
    assert data["metrics"]["max_new_tokens"] == 8


def test_legal_rag_real_tiny(tmp_path):
    from rizzearch.reproduce.legal_rag_real import MODES, run

    assert MODES.tier == "real" and MODES.quick.queries_per_category is None  # the real tier audits all 210 queries
    _check_results(tmp_path, run(str(tmp_path), tiny=True), "real", simulated=False)


def test_stratified_subset_is_seeded_and_covers_every_category():
    from rizzearch.audit.queries import load_queries

    qs = load_queries()
    a, b, c = stratified(qs, 3, 0), stratified(qs, 3, 0), stratified(qs, 3, 1)
    assert a == b and a != c and len(a) == 12
    assert {q["category"] for q in a} == {q["category"] for q in qs}
    assert stratified(qs, None, 0) == qs


def _rows(system, labels, nonexistent=0):
    out = []
    for i, lab in enumerate(labels):
        cites = [{"existence": "nonexistent"}] if i < nonexistent else []
        out.append({"system": system, "query_id": f"q{i}", "category": "general", "label": lab, "status": "answered",
                    "groundedness": "misgrounded" if lab == "hallucinated" else "grounded", "hallucinated": lab == "hallucinated",
                    "citations": cites})
    return out


def _claims(closed, naive, verified, ne_closed, ne_naive=0):
    rows = _rows("closed_book", closed, ne_closed) + _rows("naive_rag", naive, ne_naive) + _rows("verified_rag", verified)
    return {c.id: c for c in study_claims(wilson_rates(rows), paired_differences(rows, 500, 0), "m")}


def test_claims_hold_or_fail_with_the_numbers():
    n = 40
    paper_like = _claims(["hallucinated"] * 25 + ["accurate"] * 15, ["hallucinated"] * 8 + ["accurate"] * 32,
                         ["hallucinated"] * 1 + ["incomplete"] * 30 + ["accurate"] * 9, ne_closed=12)
    assert all(c.holds for c in paper_like.values()) and all(c.model == "m" for c in paper_like.values())
    flat = _claims(["accurate"] * n, ["accurate"] * n, ["accurate"] * n, ne_closed=0)
    assert not any(c.holds for c in flat.values())
    worse = _claims(["accurate"] * n, ["hallucinated"] * n, ["hallucinated"] * n, ne_closed=2, ne_naive=10)
    assert not worse["retrieval_lowers_hallucination"].holds and worse["retrieval_does_not_remove_hallucination"].holds
    assert not worse["closed_book_cites_nonexistent_authorities"].holds


@pytest.mark.slow
def test_legal_rag_quick_real_model(tmp_path):
    from rizzearch.reproduce.legal_rag import run

    res = run(str(tmp_path))
    assert res["metrics"]["model"].startswith("SmolLM2-135M-Instruct") and res["metrics"]["n_queries"] == 48


def test_a_study_whose_every_answer_failed_says_why(tmp_path, monkeypatch):
    """Regression: every answer failing (a generator that cannot run) used to crash in formatting empty rates."""
    from rizzearch.rag.generators import PretrainedGenerator

    def broken(self, requests):
        raise RuntimeError("the model cannot run here")

    monkeypatch.setattr(PretrainedGenerator, "_batch", broken)
    with pytest.raises(RuntimeError, match=r"all \d+ answers of closed_book with .* failed; the first: .*the model cannot run here"):
        __import__("rizzearch.reproduce.legal_rag", fromlist=["run"]).run(str(tmp_path / "study"), tiny=True)
