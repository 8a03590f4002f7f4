"""run_parity runs the package's own parity tests, never the current directory's tests/ or conftest.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rizzearch
from rizzearch.reproduce import run as rr

HOSTILE = "import pathlib\npathlib.Path({marker!r}).write_text('loaded')\nraise SystemExit('hostile conftest.py was loaded')\n"


def test_parity_runs_the_package_tests_from_a_hostile_directory(tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"
    (cwd / "tests").mkdir(parents=True)
    marker = tmp_path / "hostile-was-loaded"
    for conftest in (cwd / "conftest.py", cwd / "tests" / "conftest.py"):
        conftest.write_text(HOSTILE.format(marker=str(marker)))
    (cwd / "tests" / "test_hostile.py").write_text("import pytest\n\n@pytest.mark.anchors\ndef test_hostile():\n    assert False\n")
    (cwd / "pyproject.toml").write_text("[tool.pytest.ini_options]\naddopts = '--no-such-option'\n")
    (cwd / "pytest.ini").write_text("[pytest]\naddopts = --no-such-option\n")
    monkeypatch.chdir(cwd)
    out = Path("out")  # relative to the hostile directory, as a user's --out would be
    out.mkdir()
    res = rr.run_parity(out, select=("tests/models/test_rwkv_parity.py::test_other_rwkv_versions_are_named",))
    log = (cwd / "out" / "parity-log.txt").read_text()
    assert not marker.exists(), log
    assert res["status"] == "ok", log
    assert res["passed"] == res["total"] == 1, log
    assert res["tests"][0]["test"].endswith("test_rwkv_parity::test_other_rwkv_versions_are_named")
    assert (cwd / "out" / "parity-junit.xml").is_file()


def test_parity_suite_is_found_from_the_package_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, reason = rr.parity_suite()
    assert reason is None and root == Path(rizzearch.__file__).resolve().parent.parent.parent
    assert (root / "tests" / "reproduce" / Path(__file__).name).is_file()


def test_parity_is_skipped_with_a_reason_for_an_install_without_tests(tmp_path):
    site = tmp_path / "lib" / "python3.11" / "site-packages" / "rizzearch"  # a wheel install
    site.mkdir(parents=True)
    res = rr.run_parity(tmp_path, package_dir=site)
    assert res["status"] == "skipped"
    assert "ship with the source repository" in res["reason"] and str(site) in res["reason"]
    # a src layout without the tests folder is no checkout either
    fake = tmp_path / "checkout"
    (fake / "src" / "rizzearch").mkdir(parents=True)
    (fake / "pyproject.toml").write_text("")
    assert rr.parity_suite(fake / "src" / "rizzearch")[0] is None
    (fake / "tests").mkdir()
    (fake / "tests" / "conftest.py").write_text("")
    assert rr.parity_suite(fake / "src" / "rizzearch") == (fake.resolve(), None)


@pytest.mark.parametrize("module", ["report", "common"])
def test_report_and_common_do_not_import_the_orchestrator(module):
    """report.py is built from results.json alone; run.py imports it, never the other way round."""
    src = (Path(rr.__file__).parent / f"{module}.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not any(m.startswith("rizzearch.reproduce.run") for m in imported), imported


def test_reproduce_says_why_parity_was_skipped(tmp_path, monkeypatch, capsys):
    from rizzearch.reproduce.common import Claim, write_results

    def child(study, study_dir, *args):  # stands in for the study's process
        write_results(study_dir, study.name, [Claim("c", "s", 1, 1, True)], {})
        return {"study": study.name, "status": "ok", "seconds": 0.0}

    monkeypatch.setattr(rr, "STUDIES", {"fake": rr.Study("fake", "unused", "Fake paper", 1)})
    monkeypatch.setattr(rr, "_run_child", child)
    monkeypatch.setattr(rr, "parity_suite", lambda package_dir=None: (None, "the parity tests ship with the source repository"))
    combined = rr.reproduce(out=str(tmp_path / "run"))
    assert "parity tests skipped: the parity tests ship with the source repository" in capsys.readouterr().err
    assert combined["metrics"]["parity"] == {"status": "skipped", "reason": "the parity tests ship with the source repository"}
    assert "Skipped: the parity tests ship with the source repository" in (tmp_path / "run" / "report.md").read_text()
