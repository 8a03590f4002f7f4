import json

from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.legal_rag import run


def test_legal_rag_tiny(tmp_path):
    res = run(str(tmp_path), tiny=True)
    data = read_results(tmp_path / "results.json")
    assert data == res and data["study"] == "legal-rag"
    ids = {c["id"] for c in data["claims"]}
    assert ids == {"retrieval_lowers_hallucination", "retrieval_does_not_remove_hallucination",
                   "verification_trades_hallucinations_for_refusals", "closed_book_cites_nonexistent_authorities"}
    m = data["metrics"]
    assert m["mode"] == "tiny" and m["labels_deterministic"] is True and m["n_queries"] == 24
    assert set(m["systems"]) == {"closed_book", "naive_rag", "verified_rag"}
    # what produced each system's answers is recorded and named in every claim, table row and chart bar
    assert m["systems"]["closed_book"]["generator"].startswith("simulated closed-book (MemoryGenerator")
    assert m["systems"]["naive_rag"]["generator"].startswith("extractive (ExtractiveGenerator")
    assert m["systems"]["verified_rag"]["generator"].startswith("extractive (ExtractiveGenerator")
    assert all("simulated closed-book" in c["our_value"] or "extractive" in c["our_value"] for c in data["claims"])
    md = (tmp_path / "report.md").read_text()
    assert "| closed_book | simulated closed-book |" in md and "| naive_rag | extractive |" in md
    for f in ("report.md", "report.html", "audit_chart.png", "audit/answers.jsonl"):
        assert (tmp_path / f).is_file()
    assert (tmp_path / "report.md").read_text().count("## Claims") == 1
    again = run(str(tmp_path / "again"), tiny=True)
    assert json.dumps(again["metrics"]["systems"], sort_keys=True) == json.dumps(m["systems"], sort_keys=True)
