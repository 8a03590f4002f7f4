import json

from rizzearch.audit import load_queries
from rizzearch.audit.judge import LLMJudge
from rizzearch.audit.labels import label_response
from rizzearch.audit.report import write_report
from rizzearch.audit.runner import run_audit
from rizzearch.rag.generators import EndpointError
from rizzearch.rag.systems import make_system


class Flaky:
    """Wraps a system; raises an endpoint error on its first ``n`` calls."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0
        self.index = inner.index

    def answer(self, q):
        self.calls += 1
        if self.calls <= self.n:
            raise EndpointError("http://127.0.0.1:9/v1/chat/completions: unreachable")
        return self.inner.answer(q)


def test_interrupted_audit_resumes_without_redoing(bm25_index, tmp_path):
    qs = load_queries(limit=2)
    systems = {"naive_rag": make_system("naive_rag", bm25_index, mode="bm25"),
               "verified_rag": make_system("verified_rag", bm25_index, mode="bm25")}
    first = run_audit(systems, qs, tmp_path, progress=False, max_new=5, n_boot=100)
    assert first["new_answers"] == 5 and not first["metrics"]["complete"]
    path = tmp_path / "answers.jsonl"
    with open(path, "a") as fh:  # a kill in the middle of writing a line
        fh.write('{"system": "naive_rag", "query_id": "half')
    before = path.read_text().splitlines()[:5]
    second = run_audit(systems, qs, tmp_path, progress=False, n_boot=100)
    assert second["reused_answers"] == 5 and second["new_answers"] == 2 * len(qs) - 5
    lines = path.read_text().splitlines()
    assert lines[:5] == before and len(lines) == 2 * len(qs)  # finished answers kept verbatim, none duplicated
    third = run_audit(systems, qs, tmp_path, progress=False, n_boot=100)
    assert third["new_answers"] == 0 and third["metrics"] == second["metrics"]


def test_error_rows_are_labelled_and_retried(bm25_index, tmp_path):
    qs = load_queries(limit=1)
    flaky = Flaky(make_system("naive_rag", bm25_index, mode="bm25"), n=2)
    r1 = run_audit({"naive_rag": flaky}, qs, tmp_path, progress=False, n_boot=50)
    errs = [r for r in r1["rows"] if r["status"] == "error"]
    assert len(errs) == 2 and errs[0]["label"] == "error" and "unreachable" in errs[0]["error"]
    assert r1["metrics"]["systems"]["naive_rag"]["errors"] == 2
    r2 = run_audit({"naive_rag": flaky}, qs, tmp_path, progress=False, n_boot=50)
    assert r2["new_answers"] == 2 and r2["metrics"]["systems"]["naive_rag"]["errors"] == 0


def test_report_files(bm25_index, tmp_path):
    qs = load_queries(limit=2)
    systems = {s: make_system(s, bm25_index, mode="bm25") for s in ("closed_book", "naive_rag", "verified_rag")}
    res = run_audit(systems, qs, tmp_path, progress=False, n_boot=100)
    paths = write_report(tmp_path, {**res["metrics"], "n_queries": len(qs)}, res["rows"])
    md = (tmp_path / "report.md").read_text()
    assert "| closed_book |" in md and "Example failures" in md and "Lexis+ AI" in md
    assert (tmp_path / "audit_chart.png").stat().st_size > 5000
    assert "<img src='audit_chart.png'" in (tmp_path / "report.html").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["n_queries"] == len(qs)
    assert set(paths) == {"markdown", "html", "chart"}


class Votes:
    """A fake endpoint client: scripted judge replies."""

    def __init__(self, replies):
        self.replies, self.i = replies, 0

    def chat(self, messages, temperature=None, seed=None):
        r = self.replies[self.i % len(self.replies)]
        self.i += 1
        return r


def test_llm_judge_reports_spread():
    j = LLMJudge(Votes(["YES", "no.", "Yes, it does"]), runs=3)
    v = j.judge("claim", "source")
    assert v["supported"] and v["mean"] == round(2 / 3, 4) and v["spread"] == 1.0 and v["valid"] == 3
    v = LLMJudge(Votes(["maybe"]), runs=2).judge("c", "s")
    assert v["supported"] is False and v["valid"] == 0
    q = {"id": "x", "category": "general", "false_premise": False, "question": "Who?", "gold_answer": "Warren"}
    lab = label_response(q, "Justice Warren delivered the opinion. Brown v. Board of Education, 347 U.S. 483 (1954).",
                         judge=LLMJudge(Votes(["NO"]), runs=3))
    assert lab["groundedness"] == "misgrounded" and lab["citations"][0]["judge"]["spread"] == 0.0
    from rizzearch.audit.metrics import summarize

    row = {**lab, "system": "s", "status": "answered"}
    row2 = {**row, "citations": [{**row["citations"][0], "judge": v | {"valid": 2, "spread": 1.0, "stdev": 0.5}}]}
    j = summarize([row, row2], n_boot=10)["judge"]
    assert j == {"citations": 2, "mean_stdev": 0.25, "share_runs_disagree": 0.5, "invalid_replies": 0}


def test_all_failed_audit_still_writes_a_report(bm25_index, tmp_path):
    """The chart used to crash on systems with no answers (rates None) after the answers were kept."""
    qs = load_queries(limit=1)
    res = run_audit({"naive_rag": Flaky(make_system("naive_rag", bm25_index, mode="bm25"), n=100)}, qs, tmp_path,
                    progress=False, n_boot=20)
    assert res["metrics"]["systems"]["naive_rag"]["errors"] == len(qs)
    write_report(tmp_path, res["metrics"], res["rows"])
    assert (tmp_path / "audit_chart.png").is_file() and "| naive_rag |" in (tmp_path / "report.md").read_text()


def test_settings_keyed_resume(bm25_index, tmp_path):
    import pytest

    from rizzearch.errors import DataError

    qs = load_queries(limit=1)
    systems = {"naive_rag": make_system("naive_rag", bm25_index, mode="bm25")}
    run_audit(systems, qs, tmp_path, progress=False, n_boot=20, settings={"k": 4, "gen": {"name": "x"}})
    before = (tmp_path / "answers.jsonl").read_bytes()
    with pytest.raises(DataError, match=r"other settings \(gen.name: \"x\" -> \"y\"; k: 4 -> 8\)"):
        run_audit(systems, qs, tmp_path, progress=False, n_boot=20, settings={"k": 8, "gen": {"name": "y"}})
    assert (tmp_path / "answers.jsonl").read_bytes() == before
    again = run_audit(systems, qs, tmp_path, progress=False, n_boot=20, settings={"k": 4, "gen": {"name": "x"}})
    assert again["new_answers"] == 0 and again["reused_answers"] == len(qs)
