"""Audit answers are reused only under the settings that made them: ``rizz audit`` records them in
``OUT/audit_settings.json``, a resume under another generator, k or query file is refused naming
what differs (and touches nothing), ``--resume false`` sets the old answers aside (never replacing a
file), and settings that cannot change an answer (timeout, retries) do not block a resume."""

from __future__ import annotations

import json

import pytest

from rizzearch.audit.runner import SETTINGS_FILE, _set_aside, settings_diff
from rizzearch.cli import main

QUERIES = [{"id": "q1", "category": "general", "question": "What is hearsay?", "gold_answer": "an out-of-court statement",
            "false_premise": False},
           {"id": "q2", "category": "factual_recall", "question": "Who wrote the majority opinion in Miranda v. Arizona?",
            "gold_answer": "Earl Warren", "false_premise": False}]


@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    from rizzearch.rag.index import open_or_build

    path = tmp_path_factory.mktemp("idx") / "bm25.sqlite"
    open_or_build(path, dense=False).close()
    return path


@pytest.fixture
def run(tmp_path, index_path, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    out = tmp_path / "run"

    def go(*extra) -> tuple[int, str, str]:
        rc = main(["audit", "--index", str(index_path), "--queries", str(qfile), "--out", str(out), "--mode", "bm25",
                   "--dense", "false", "--system", "closed_book,naive_rag", "--n_boot", "20", "--progress", "false", *extra])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    go.out, go.qfile = out, qfile
    return go


def snapshot(out) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name in ("answers.jsonl", SETTINGS_FILE)}


def test_audit_resume_under_other_settings_is_refused_naming_them(run):
    rc, out, _ = run()
    assert rc == 0 and json.loads(out)["new_answers"] == 4
    saved = json.loads((run.out / SETTINGS_FILE).read_text())
    assert saved["systems"]["naive_rag"]["k"] == 4 and saved["systems"]["naive_rag"]["mode"] == "bm25"
    before = snapshot(run.out)
    for extra, named in [(("--k", "2"), "systems.naive_rag.k: 4 -> 2"),
                         (("--generator", "memory"), 'generator: "extractive" -> "memory"'),
                         (("--seed", "1"), "systems.closed_book.generator.seed: 0 -> 1"),
                         (("--system", "naive_rag"), "systems.closed_book.kind")]:
        rc, _, err = run(*extra)
        assert rc == 2 and named in err and "--resume false" in err, (extra, err)
        assert snapshot(run.out) == before  # nothing already audited was touched
    run.qfile.write_text(run.qfile.read_text().replace("Earl Warren", "Warren"))
    rc, _, err = run()
    assert rc == 2 and "queries_sha256" in err
    run.qfile.write_text(run.qfile.read_text().replace('"Warren"', '"Earl Warren"'))
    rc, out, _ = run("--timeout", "5", "--retries", "0")  # cannot change an answer: the resume goes ahead
    assert rc == 0 and json.loads(out)["reused_answers"] == 4 and json.loads(out)["new_answers"] == 0


def test_audit_resume_false_sets_the_old_answers_aside(run):
    assert run()[0] == 0
    before = snapshot(run.out)
    rc, out, _ = run("--k", "2", "--resume", "false")
    assert rc == 0 and json.loads(out)["new_answers"] == 4
    kept = {p.name: p.read_bytes() for p in run.out.iterdir() if p.name.startswith(("answers.2", "audit_settings.2"))}
    assert sorted(kept.values()) == sorted(before.values())  # the old answers and their settings, renamed
    assert json.loads((run.out / SETTINGS_FILE).read_text())["systems"]["naive_rag"]["k"] == 2
    assert run("--k", "2")[0] == 0  # and the new ones resume under the new settings


def test_audit_answers_without_recorded_settings_are_not_reused(run):
    assert run()[0] == 0
    (run.out / SETTINGS_FILE).unlink()  # a folder written before settings were recorded
    rc, _, err = run()
    assert rc == 2 and "settings were not recorded" in err
    (run.out / SETTINGS_FILE).write_text("{not json")
    rc, _, err = run()
    assert rc == 2 and f"{SETTINGS_FILE}: unreadable" in err


def test_audit_set_aside_never_replaces_a_file(tmp_path):
    """Two --resume false runs within one second used to rename onto the same name, losing the first."""
    f = tmp_path / "answers.jsonl"
    for i in range(3):
        f.write_text(f"run {i}\n")
        _set_aside(f)
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["run 0\n", "run 1\n", "run 2\n"]


def test_audit_settings_name_the_endpoint_but_never_its_key(monkeypatch):
    from rizzearch.commands.audit import _system_settings
    from rizzearch.rag.endpoint import EndpointGenerator
    from rizzearch.rag.systems import ClosedBook

    monkeypatch.setenv("RIZZ_LLM_API_KEY", "sk-secret")
    s = _system_settings(ClosedBook(EndpointGenerator("http://127.0.0.1:9/v1", model="llama", timeout=3)))
    assert s["generator"] == {"name": "endpoint:llama", "url": "http://127.0.0.1:9/v1/chat/completions", "model": "llama",
                              "temperature": 0.0, "max_tokens": 512}
    assert "sk-secret" not in json.dumps(s)
    assert settings_diff({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 3}) == ["a.b: 1 -> 2", "c: 2 -> (absent)",
                                                                                "d: (absent) -> 3"]
