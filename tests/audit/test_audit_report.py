"""Reports name what produced every system's answers: the simulated generators are labelled as such."""

import json

from rizzearch.audit import load_queries
from rizzearch.audit.report import chart_labels, generator_short, write_report
from rizzearch.audit.runner import run_audit
from rizzearch.rag.systems import make_system


def test_every_row_and_bar_names_its_generator(bm25_index, tmp_path):
    qs = load_queries(limit=1)
    systems = {s: make_system(s, bm25_index, mode="bm25") for s in ("closed_book", "naive_rag", "verified_rag")}
    res = run_audit(systems, qs, tmp_path, progress=False, n_boot=50)
    saved = json.loads((tmp_path / "metrics.json").read_text())["systems"]
    assert saved["closed_book"]["generator"].startswith("simulated closed-book (MemoryGenerator")
    assert saved["naive_rag"]["generator"] == saved["verified_rag"]["generator"] == "extractive (ExtractiveGenerator)"
    assert {s: generator_short(e) for s, e in saved.items()} == {
        "closed_book": "simulated closed-book", "naive_rag": "extractive", "verified_rag": "extractive"}

    write_report(tmp_path, res["metrics"], res["rows"])
    md = (tmp_path / "report.md").read_text()
    assert "| closed_book | simulated closed-book |" in md and "| naive_rag | extractive |" in md
    assert md.count("| verified_rag | extractive |") == 3  # overall, by category, primary labels
    html = (tmp_path / "report.html").read_text()
    assert "<td>closed_book</td><td>simulated closed-book</td>" in html and "<td>naive_rag</td><td>extractive</td>" in html
    bars = chart_labels(res["metrics"])
    assert bars[:3] == ["closed_book (ours, simulated closed-book)", "naive_rag (ours, extractive)",
                        "verified_rag (ours, extractive)"]
    assert bars[3:] and all(b.endswith("(paper)") for b in bars[3:])


def test_unrecorded_generator_is_a_dash():
    m = {"systems": {"x": {"overall": {}}}}
    assert generator_short(m["systems"]["x"]) == "-" and chart_labels(m, include_paper=False) == ["x (ours)"]


def test_retrieval_quality_in_metrics_and_report(bm25_index, tmp_path):
    qs = load_queries(limit=2)
    systems = {s: make_system(s, bm25_index, mode="bm25") for s in ("closed_book", "naive_rag")}
    res = run_audit(systems, qs, tmp_path, progress=False, n_boot=50)
    saved = json.loads((tmp_path / "metrics.json").read_text())["systems"]
    assert saved["closed_book"]["retrieval"] is None  # retrieves nothing
    r = saved["naive_rag"]["retrieval"]
    with_gold = [q for q in qs if q["gold_passages"]]
    assert r["n"] == len(with_gold) and r["k"] == 4
    rows = [x for x in res["rows"] if x["system"] == "naive_rag" and x["gold_passages"]]
    hits = sum(bool(set(x["gold_passages"]) & set(x["retrieved"])) for x in rows)
    assert r["hit_at_k"]["rate"] == round(hits / len(rows), 4)
    assert set(saved["naive_rag"]["by_category"]["general"]["retrieval"]) >= {"recall_at_k", "hit_at_k", "mrr"}
    write_report(tmp_path, res["metrics"], res["rows"])
    md = (tmp_path / "report.md").read_text()
    assert "## Retrieval quality" in md and "| naive_rag | 4 |" in md and "| closed_book | 4 |" not in md
