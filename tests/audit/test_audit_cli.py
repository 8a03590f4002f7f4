import csv
import json

from rizzearch.audit.human import COLUMNS
from rizzearch.cli import main


def test_rizz_audit_end_to_end_with_human_sheet(tmp_path, capsys):
    idx, out = tmp_path / "idx.sqlite", tmp_path / "run"
    args = ["audit", "--index", str(idx), "--out", str(out), "--mode", "bm25", "--dense", "false", "--limit", "1",
            "--n_boot", "100", "--progress", "false", "--system", "[closed_book, verified_rag]"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["new_answers"] == 8 and set(summary["summary"]) == {"closed_book", "verified_rag"}
    for f in ("answers.jsonl", "labels.jsonl", "metrics.json", "report.md", "report.html", "audit_chart.png", "label_sheet.csv"):
        assert (out / f).is_file(), f
    # a human fills in the sheet: agrees with every automatic label
    labels = {(r["system"], r["query_id"]): r for r in map(json.loads, (out / "labels.jsonl").read_text().splitlines())}
    with open(out / "label_sheet.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        lab = labels[(r["system"], r["query_id"])]
        r["human_correctness"], r["human_groundedness"] = lab["correctness"], lab["groundedness"] or ""
    sheet = tmp_path / "human.csv"
    with open(sheet, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    assert main(args + ["--human_sheet", str(sheet), "--second_human_sheet", str(sheet)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["new_answers"] == 0 and summary["reused_answers"] == 8  # resumed
    ag = json.loads((out / "metrics.json").read_text())["human_agreement"]
    assert ag["auto_vs_human"]["agreement_label"] == 1.0 and ag["human_vs_human"]["n"] == 8
    # a sheet with an unknown label is a clear error (exit 2), not a traceback
    rows[0]["human_correctness"] = "sort of"
    with open(sheet, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    assert main(args + ["--human_sheet", str(sheet)]) == 2
    assert "sort of" in capsys.readouterr().err


def test_rizz_audit_bad_system(tmp_path, capsys):
    assert main(["audit", "--system", "[oracle]", "--out", str(tmp_path)]) == 2
    assert "oracle" in capsys.readouterr().err
    assert main(["audit", "--system", "naive_rag,oracle", "--out", str(tmp_path)]) == 2  # comma form
    assert "['oracle']" in capsys.readouterr().err
