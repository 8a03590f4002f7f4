"""rizz reproduce: the orchestrator (failure isolation, resume) and the report builder."""

from __future__ import annotations

import json
import textwrap

import pytest

from rizzearch.errors import ConfigError, DataError
from rizzearch.reproduce import run as rr
from rizzearch.reproduce.common import Claim, read_results, study_mode, validate_results, write_results
from rizzearch.reproduce.report import build_report

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000" "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")

OK_STUDY = textwrap.dedent('''
    from pathlib import Path
    from rizzearch.reproduce.common import Claim, write_results

    def run(out_dir, *, full=False, tiny=False, device="cpu", seed=0):
        counter = Path(out_dir) / "runs.txt"
        counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
        (Path(out_dir) / "plot.png").write_bytes(bytes.fromhex("{png}"))
        return write_results(out_dir, "fake_ok", [Claim("c1", "X beats Y", 0.9, 0.95, True), Claim("c2", "Z is small", "<5%", "7%", False)],
                             {{"accuracy": 0.95, "nested": {{"loss": 1.5}}}})
''').format(png=PNG.hex())
BAD_STUDY = "def run(out_dir, **kw):\n    raise RuntimeError('the model diverged at step 7')\n"
LATE_FAILURE = textwrap.dedent('''
    from pathlib import Path
    from rizzearch.reproduce.common import Claim, write_results

    def run(out_dir, **kw):
        counter = Path(out_dir) / "runs.txt"
        counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
        write_results(out_dir, "late", [Claim("c", "s", 1, 1, True)], {})
        raise RuntimeError("the plot failed after results.json was written")
''')


@pytest.fixture
def fake_studies(tmp_path, monkeypatch):
    pkg = tmp_path / "fakestudies"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(OK_STUDY)
    (pkg / "bad.py").write_text(BAD_STUDY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + ":" + __import__("os").environ.get("PYTHONPATH", ""))
    studies = {"good": rr.Study("good", "fakestudies.good", "Good paper (2024)", 1), "bad": rr.Study("bad", "fakestudies.bad", "Bad paper (2024)", 1)}
    monkeypatch.setattr(rr, "STUDIES", studies)
    return studies


def test_failed_study_is_reported_and_others_run_then_resume(fake_studies, tmp_path):
    out = tmp_path / "run"
    combined = rr.reproduce(out=str(out), parity=False)
    assert [c["id"] for c in combined["claims"]] == ["good/c1", "good/c2"]
    assert combined["metrics"]["studies"]["bad"]["status"] == "failed"
    assert "diverged at step 7" in combined["metrics"]["studies"]["bad"]["error"]
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for text in (html, md):
        assert "Good paper (2024)" in text and "Bad paper (2024)" in text
        assert "diverged at step 7" in text
        assert "rizz reproduce good --out runs/good" in text
    assert "data:image/png;base64," in html
    assert "![plot](good/plot.png)" in md
    validate_results(json.loads((out / "results.json").read_text()))
    # resume: the finished study is not rerun, the failed one is retried
    rr.reproduce(out=str(out), parity=False)
    assert (out / "good" / "runs.txt").read_text() == "1"
    rr.reproduce(out=str(out), parity=False, force=True)
    assert (out / "good" / "runs.txt").read_text() == "2"


def test_study_failing_after_writing_results_is_rerun_on_resume(fake_studies, tmp_path, monkeypatch):
    (tmp_path / "fakestudies" / "late.py").write_text(LATE_FAILURE)
    monkeypatch.setattr(rr, "STUDIES", {"late": rr.Study("late", "fakestudies.late", "Late paper (2024)", 1)})
    out = tmp_path / "run"
    combined = rr.reproduce(out=str(out), parity=False)
    assert combined["metrics"]["studies"]["late"]["status"] == "failed" and combined["claims"] == []
    rr.reproduce(out=str(out), parity=False)
    assert (out / "late" / "runs.txt").read_text() == "2"


def test_single_study_writes_into_out(fake_studies, tmp_path):
    rr.reproduce(study="good", out=str(tmp_path / "one"), parity=False)
    assert read_results(tmp_path / "one" / "results.json")["study"] == "fake_ok"
    with pytest.raises(ConfigError, match="unknown study"):
        rr.reproduce(study="nope", out=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="at most one"):
        rr.reproduce(study="good", out=str(tmp_path / "x"), full=True, tiny=True)


def test_report_from_stored_results(tmp_path):
    for name, holds in (("xlstm", True), ("rwkv", False)):
        write_results(tmp_path / name, name, [Claim("a", f"{name} claim", 1, 2, holds)], {"m": 1.0})
        (tmp_path / name / "fig.png").write_bytes(PNG)
    statuses = [{"study": "xlstm", "status": "ok", "seconds": 12.0}, {"study": "rwkv", "status": "ok", "seconds": 30.0}]
    data = build_report(tmp_path, statuses, {"status": "ok", "passed": 3, "total": 3, "tests": [{"test": "t::x", "outcome": "passed", "seconds": 1}]}, 42.0)
    assert {c["study"] for c in data["claims"]} == {"xlstm", "rwkv"}
    md = (tmp_path / "report.md").read_text()
    assert "| xlstm claim | 1 | 2 | yes |" in md and "| rwkv claim | 1 | 2 | **no** |" in md
    assert "3/3 parity tests passed" in md
    assert "rizz reproduce rwkv --out runs/rwkv" in md
    assert read_results(tmp_path / "results.json") == data and all(c["study"] in c["id"] for c in data["claims"])
    build_report(tmp_path, statuses, None, 42.0, full=True)
    assert "rizz reproduce rwkv --out runs/rwkv --full true" in (tmp_path / "report.md").read_text()


def test_results_schema_is_enforced(tmp_path):
    with pytest.raises(DataError, match="holds"):
        validate_results({"study": "s", "claims": [{"id": 1, "statement": "", "paper_value": 1, "our_value": 1, "holds": "yes"}], "metrics": {}, "environment": {}})
    with pytest.raises(DataError, match="missing field 'metrics'"):
        validate_results({"study": "s", "claims": [], "environment": {}})
    (tmp_path / "results.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        read_results(tmp_path / "results.json")


def test_study_mode():
    assert [study_mode(False, False), study_mode(True, False), study_mode(False, True)] == ["quick", "full", "tiny"]
    with pytest.raises(ConfigError, match="at most one"):
        study_mode(True, True)


def test_both_tiers_share_a_folder_and_the_report_shows_them_side_by_side(fake_studies, tmp_path, monkeypatch, capsys):
    real = {"good": rr.Study("good", "fakestudies.good", "Good paper (2024)", 2, "real")}
    monkeypatch.setattr(rr, "REAL_STUDIES", real)
    out = tmp_path / "run"
    rr.reproduce(out=str(out), parity=False)  # quick tier: good + bad
    combined = rr.reproduce(out=str(out), parity=False, tier="real")
    assert "estimated at most 2 min" in capsys.readouterr().err
    assert (out / "real" / "good" / "results.json").is_file() and (out / "good" / "results.json").is_file()
    ids = [(c["id"], c["tier"]) for c in combined["claims"]]
    assert ids == [("good/c1", "quick"), ("good/c2", "quick"), ("good/real/c1", "real"), ("good/real/c2", "real")]
    assert set(combined["metrics"]["studies"]) == {"good", "bad", "good/real"}
    assert set(combined["metrics"]["tier_seconds"]) == {"quick", "real"}
    md = (out / "report.md").read_text()
    assert "quick tier: status | claims holding | wall time | real tier: status" in md
    assert "### Quick tier: models trained from scratch" in md and "### Real tier: SmolLM2-135M-Instruct (pretrained)" in md
    assert "rizz reproduce good --tier real --out runs/good-real" in md and "![plot](real/good/plot.png)" in md
    html = (out / "report.html").read_text()
    assert "<th colspan='3'>real tier</th>" in html and "id='good/real'" in html
    # the real tier alone does not rerun the quick studies, and a rerun resumes
    rr.reproduce(out=str(out), parity=False, tier="real")
    assert (out / "real" / "good" / "runs.txt").read_text() == "1" and (out / "good" / "runs.txt").read_text() == "1"


def test_unknown_tier_and_study_of_another_tier_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown tier 'huge'"):
        rr.reproduce(out=str(tmp_path / "x"), tier="huge")
    with pytest.raises(ConfigError, match="unknown study 'xlstm' in the real tier"):
        rr.reproduce(study="xlstm", out=str(tmp_path / "y"), tier="real")
    assert set(rr.REAL_STUDIES) == {"orpo", "goldfish", "legal-rag"}
    assert all(s.module.endswith("_real") and s.tier == "real" for s in rr.REAL_STUDIES.values())
    for s in rr.REAL_STUDIES.values():  # each names an importable study of the real tier, with that study's name
        mod = __import__("importlib").import_module(s.module)
        assert callable(mod.run) and mod.MODES.tier == "real" and mod.STUDY == s.name
    assert sum(s.budget_min for s in rr.REAL_STUDIES.values()) + rr.PARITY_MIN <= rr.REAL_TIER_BUDGET_MIN


def test_claim_model_field_is_checked():
    ok = {"study": "s", "claims": [{"id": "a", "statement": "", "paper_value": 1, "our_value": 1, "holds": True, "model": "SmolLM2"}],
          "metrics": {}, "environment": {}}
    validate_results(ok)
    ok["claims"][0]["model"] = 3
    with pytest.raises(DataError, match=r"claims\[0\].model must be a string"):
        validate_results(ok)
