"""Audit inputs are validated up front: every field of a queries file mistyped in turn is a one-line
``file:line`` error naming the field, raised before any answer is generated (no request reaches the
endpoint, nothing is written); ``--k`` below 1 is refused by ``rizz audit`` and ``rizz rag ask``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rizzearch.audit.queries import load_queries
from rizzearch.cli import main
from rizzearch.errors import DataError

GOOD = {"id": "q1", "category": "general", "question": "What is hearsay?", "gold_answer": "an out-of-court statement",
        "false_premise": False, "aliases": ["hearsay"], "gold_passages": ["ruleqa/001"], "family": "rule_qa"}

# (field, bad value or DROP, words the error must contain)
DROP = object()
MISTYPED = [
    ("question", 123, "question must be a non-empty string, got the number 123"),
    ("question", "  ", "question must be a non-empty string, got an empty string"),
    ("question", None, "question must be a non-empty string, got null"),
    ("question", DROP, "missing field(s) ['question']"),
    ("gold_answer", None, "gold_answer must be a non-empty string, got null"),
    ("gold_answer", 42, "gold_answer must be a non-empty string, got the number 42"),
    ("gold_answer", "", "gold_answer must be a non-empty string, got an empty string"),
    ("gold_answer", ["x"], "gold_answer must be a non-empty string, got a list"),
    ("aliases", "see gold", 'aliases must be a list of strings, got a string (write ["..."] for one)'),
    ("aliases", [1], "aliases[0] must be a non-empty string, got the number 1"),
    ("aliases", ["ok", ""], "aliases[1] must be a non-empty string, got an empty string"),
    ("aliases", None, "aliases must be a list of strings, got null"),
    ("id", ["a", "b"], "id must be a non-empty string, got a list"),
    ("id", 7, "id must be a non-empty string, got the number 7"),
    ("id", "", "id must be a non-empty string, got an empty string"),
    ("category", "trivia", "category 'trivia' is not one of"),
    ("category", 3, "category 3 is not one of"),
    ("category", ["general"], "category ['general'] is not one of"),
    ("false_premise", "yes", "false_premise must be true or false, got 'yes'"),
    ("false_premise", 0, "false_premise must be true or false, got 0"),
    ("false_premise", None, "false_premise must be true or false, got None"),
    ("gold_passages", "ruleqa/001", "gold_passages must be a list of strings, got a string"),
    ("gold_passages", [{"id": 1}], "gold_passages[0] must be a non-empty string, got an object"),
    ("family", 5, "family must be a non-empty string, got the number 5"),
    ("alias", ["typo"], "unknown field(s) ['alias']"),
]


def write(tmp_path, bad_field, bad_value) -> str:
    """A two-line queries file whose second line has ``bad_field`` mistyped."""
    second = {**GOOD, "id": "q2"}
    if bad_value is DROP:
        del second[bad_field]
    else:
        second[bad_field] = bad_value
    path = tmp_path / "queries.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(second) + "\n")
    return str(path)


@pytest.mark.parametrize("field, value, words", MISTYPED, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(MISTYPED)])
def test_audit_queries_every_mistyped_field_is_a_file_line_error(tmp_path, field, value, words):
    path = write(tmp_path, field, value)
    with pytest.raises(DataError) as e:
        load_queries(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and words in msg and "\n" not in msg


def test_audit_queries_duplicate_and_empty_files(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl:2: duplicate query id 'q1' \(first on line 1\)"):
        load_queries(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no queries"):
        load_queries(path)
    path.write_text(json.dumps(GOOD) + "\n")
    assert load_queries(path)[0]["aliases"] == ["hearsay"]
    with pytest.raises(DataError, match="limit must be a positive"):
        load_queries(path, limit=0)


class Counter(BaseHTTPRequestHandler):
    hits = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        Counter.hits += 1
        data = b'{"choices": [{"message": {"content": "an answer"}}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("field, value", [("gold_answer", None), ("aliases", "see gold"), ("id", ["a"]), ("question", 123)])
def test_audit_bad_queries_fail_before_any_answer(tmp_path, capsys, endpoint, field, value):
    """Before: a null gold_answer was found only after every answer had been generated."""
    Counter.hits = 0
    path = write(tmp_path, field, value)
    out = tmp_path / "run"
    rc = main(["audit", "--generator", "endpoint", "--base_url", endpoint, "--queries", path, "--out", str(out),
               "--index", str(tmp_path / "never-built.sqlite"), "--mode", "bm25", "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:2: {field}" in err and "Traceback" not in err
    assert Counter.hits == 0 and not out.exists() and not (tmp_path / "never-built.sqlite").exists()


@pytest.mark.parametrize("k", ["-3", "0"])
def test_audit_and_rag_ask_refuse_k_below_one(tmp_path, capsys, k):
    """Before: --k -3 retrieved 47 passages (a negative slice), --k 0 answered 'cannot find'."""
    idx = tmp_path / "never-built.sqlite"
    assert main(["rag", "ask", "What is hearsay?", "--k", k, "--index", str(idx)]) == 2
    assert f"--k: the number of passages to retrieve must be at least 1, got {k}" in capsys.readouterr().err
    assert main(["audit", "--k", k, "--index", str(idx), "--out", str(tmp_path / "run"), "--progress", "false"]) == 2
    assert f"got {k}" in capsys.readouterr().err
    assert not idx.exists() and not (tmp_path / "run").exists()
