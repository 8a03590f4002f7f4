import json

from rizzearch.cli import main


def test_rag_index_and_ask(tmp_path, capsys):
    path = tmp_path / "idx.sqlite"
    assert main(["rag", "index", "--out", str(path), "--dense", "false", "--progress", "false"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["passages"] > 1000 and info["dense"] is False and path.is_file()
    assert main(["rag", "ask", "Which Justice delivered the opinion of the Court in Brown v. Board of Education?",
                 "--index", str(path), "--mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert "Warren" in out and "347 U.S. 483: exists" in out and "Passages used:" in out
    assert main(["rag", "ask", "--question", "Why did Justice Pemberton dissent in Roe v. Wade?", "--index", str(path),
                 "--mode", "bm25", "--system", "verified_rag", "--as_json", "true"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["status"] == "abstained" and rec["system"] == "verified_rag"


def test_rag_ask_bad_input(tmp_path, capsys):
    assert main(["rag", "ask", "", "--index", str(tmp_path / "x.sqlite"), "--mode", "bm25"]) == 2
    assert "non-empty" in capsys.readouterr().err
    bad = tmp_path / "corrupt.sqlite"
    bad.write_bytes(b"\x00garbage" * 50)
    assert main(["rag", "ask", "What is hearsay?", "--index", str(bad), "--mode", "bm25"]) == 2
    err = capsys.readouterr().err
    assert "corrupt.sqlite" in err and "not a rizzearch index" in err
    assert bad.read_bytes() == b"\x00garbage" * 50  # left alone
