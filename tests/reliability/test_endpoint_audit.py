"""Whole audits (``rizz audit --generator endpoint``) against a misbehaving local server: a failed
request becomes an error row of its answer and never aborts the audit, an audit where every request
fails still writes its report (saying so) and exits with one line, ``--resume`` retries the errors,
the key never reaches another port, and answers that look like spreadsheet formulas are escaped in
the label sheet and read back."""

from __future__ import annotations

import csv
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rizzearch.audit.human import COLUMNS
from rizzearch.cli import main

KEY = "sk-audit-do-not-leak"
FORMULAS = ["=HYPERLINK(\"http://evil.example\",\"click\") [ruleqa/001]", "+1+1", "-2+3", "@SUM(1,2)"]


class Switch(BaseHTTPRequestHandler):
    """Behaviour set by the test: ``mode`` for the first ``bad`` requests, then ``after``."""

    mode, bad, after = "ok", 10**9, "ok"
    log: list = []
    other_port = 0
    stop = threading.Event()

    def log_message(self, *a):
        pass

    def do_GET(self):
        Switch.log.append({"port": self.server.server_address[1], "method": "GET", "auth": self.headers.get("Authorization")})
        self._send(200, b'{"choices": [{"message": {"content": "a GET"}}]}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Switch.log.append({"port": self.server.server_address[1], "method": "POST", "auth": self.headers.get("Authorization")})
        n = sum(e["port"] == self.server.server_address[1] for e in Switch.log)
        mode = Switch.mode if n <= Switch.bad else Switch.after
        try:
            getattr(self, "m_" + mode)(body, n)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, code, data, headers=None):
        self.send_response(code)
        for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, text):
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

    def m_ok(self, body, n):
        self._answer("Hearsay is an out-of-court statement offered for its truth [ruleqa/001].")

    def m_formula(self, body, n):
        self._answer(FORMULAS[(n - 1) % len(FORMULAS)])

    def m_drip(self, body, n):
        data = b'{"choices": [{"message": {"content": "' + b"x" * 300 + b'"}}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for b in data:
            if Switch.stop.wait(0.05):
                return
            self.wfile.write(bytes([b]))
            self.wfile.flush()

    def m_truncate(self, body, n):
        self.send_response(200)
        self.send_header("Content-Length", "400")
        self.end_headers()
        self.wfile.write(b'{"choices": [')

    def m_nothttp(self, body, n):
        self.wfile.write(b"220 smtp.example ESMTP\r\n")

    def m_redirect(self, body, n):
        self._send(302, b"", {"Location": f"http://127.0.0.1:{Switch.other_port}/v1/chat/completions"})

    def m_big(self, body, n):
        self._answer("z" * (5 << 20))


def _serve():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Switch)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server():
    Switch.stop.clear()
    a, b = _serve(), _serve()
    Switch.other_port = b.server_address[1]
    yield f"http://127.0.0.1:{a.server_address[1]}/v1"
    Switch.stop.set()
    for s in (a, b):
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    from rizzearch.rag.index import open_or_build

    path = tmp_path_factory.mktemp("idx") / "bm25.sqlite"
    open_or_build(path, dense=False).close()
    return path


@pytest.fixture(autouse=True)
def _switch(monkeypatch):
    Switch.mode, Switch.bad, Switch.after = "ok", 10**9, "ok"
    Switch.log.clear()
    monkeypatch.setenv("RIZZ_LLM_API_KEY", KEY)


def queries(tmp_path):
    """Two queries whose ids a spreadsheet would take for formulas."""
    path = tmp_path / "q.jsonl"
    rows = [{"id": "-q1", "category": "general", "question": "What is hearsay?", "gold_answer": "an out-of-court statement",
             "false_premise": False},
            {"id": "=q2", "category": "general", "question": "What is a tort?", "gold_answer": "a civil wrong",
             "false_premise": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def audit_args(server, index_path, tmp_path, *extra):
    return ["audit", "--generator", "endpoint", "--base_url", server, "--model", "m", "--index", str(index_path),
            "--queries", str(queries(tmp_path)), "--out", str(tmp_path / "run"), "--system", "closed_book,naive_rag",
            "--mode", "bm25", "--dense", "false", "--n_boot", "20", "--progress", "false", "--timeout", "0.5",
            "--retries", "0", *extra]


def answers(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]


def test_endpoint_audit_where_every_request_fails_writes_its_report_then_resume_retries(server, index_path, tmp_path, capsys):
    Switch.mode = "drip"  # one byte every 50 ms: each request runs into its 0.5 s deadline
    t0 = time.monotonic()
    assert main(audit_args(server, index_path, tmp_path)) == 2
    assert time.monotonic() - t0 < 15  # 4 answers x 0.5 s, plus start-up; before: minutes, then a traceback
    err = capsys.readouterr().err
    assert "every one of the 4 answers failed" in err and "timed out" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    rows = answers(tmp_path)
    assert len(rows) == 4 and all(r["status"] == "error" and "deadline" in r["error"] for r in rows)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Every request failed" in md and (tmp_path / "run" / "audit_chart.png").is_file()
    Switch.mode = "ok"  # the server recovers: --resume (the default) retries exactly the errors
    assert main(audit_args(server, index_path, tmp_path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_answers"] == 4 and out["reused_answers"] == 0
    assert {r["status"] for r in answers(tmp_path)[4:]} <= {"answered", "abstained"}


@pytest.mark.parametrize("mode, match", [("truncate", "truncated response"), ("nothttp", "not an HTTP reply"),
                                         ("redirect", "redirect to .* not followed"), ("big", "byte limit")])
def test_endpoint_audit_one_broken_reply_is_one_error_row(server, index_path, tmp_path, capsys, mode, match):
    import re

    Switch.mode, Switch.bad = mode, 1
    assert main(audit_args(server, index_path, tmp_path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_answers"] == 4
    rows = answers(tmp_path)
    errs = [r for r in rows if r["status"] == "error"]
    assert len(errs) == 1 and re.search(match, errs[0]["error"]) and KEY not in errs[0]["error"]
    assert all(len(r["answer"]) < 1000 for r in rows)  # the 5 MB reply was never stored
    assert "1 of 4 answers failed" in (tmp_path / "run" / "report.md").read_text()
    assert [e for e in Switch.log if e["port"] == Switch.other_port] == []  # the key never went elsewhere
    assert all(e["method"] == "POST" and e["auth"] == f"Bearer {KEY}" for e in Switch.log)


def test_endpoint_audit_formula_answers_are_escaped_in_the_label_sheet_and_read_back(server, index_path, tmp_path, capsys):
    Switch.mode = "formula"
    assert main(audit_args(server, index_path, tmp_path)) == 0
    capsys.readouterr()
    sheet = tmp_path / "run" / "label_sheet.csv"
    with open(sheet, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cells = [v for r in rows for v in r.values()]
    assert not [v for v in cells if v[:1] in ("=", "+", "-", "@")]  # nothing a spreadsheet would run
    assert {r["answer"] for r in rows} == {"'" + f for f in FORMULAS} and {r["query_id"] for r in rows} == {"'-q1", "'=q2"}
    labels = {(r["system"], r["query_id"]): r for r in map(json.loads, (tmp_path / "run" / "labels.jsonl").read_text().splitlines())}
    for r in rows:  # a human agrees with every automatic label; the reader must map "'-q1" back to "-q1"
        lab = labels[(r["system"], r["query_id"][1:])]
        r["human_correctness"], r["human_groundedness"] = lab["correctness"], lab["groundedness"] or ""
    human = tmp_path / "human.csv"
    with open(human, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    assert main(audit_args(server, index_path, tmp_path, "--human_sheet", str(human))) == 0
    capsys.readouterr()
    ag = json.loads((tmp_path / "run" / "metrics.json").read_text())["human_agreement"]["auto_vs_human"]
    assert ag["n"] == 4 and ag["agreement_label"] == 1.0
