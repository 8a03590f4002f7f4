"""Smoke run of the goldfish study (tiny mode) and of `rizz memorization` on what it trained."""

from __future__ import annotations

import json
import math

import pytest

from rizzearch.cli import main
from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.goldfish import TINY, run, wikitext_articles


def test_wikitext_articles_are_split_at_title_lines():
    arts = wikitext_articles()
    assert len(arts) == 120  # 60 articles in the validation split, 60 in the test split
    title, text = arts[0]
    assert title == "Homarus gammarus" and text.startswith(" = Homarus gammarus = \n")
    assert all(t.lstrip().startswith(f"= {title} =") for title, t in arts)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("goldfish") / "study"
    return out, run(str(out), tiny=True)


def test_tiny_study_writes_results_report_and_plot(tiny_study):
    out, results = tiny_study
    data = read_results(out / "results.json")
    assert data == results and data["study"] == "goldfish"
    # the validation-loss cost is not a quick-tier claim (see the module docstring); its numbers are still recorded
    assert [c["id"] for c in data["claims"]] == ["standard_memorizes", "goldfish_does_not_memorize"]
    assert all("% [" in c["our_value"] for c in data["claims"])  # Wilson intervals
    m = data["metrics"]
    assert m["mode"] == "tiny" and m["subset"]["training_documents"] == TINY.articles
    for name in ("standard", "goldfish"):
        r = m["runs"][name]
        assert r["audit"]["greedy"]["train"]["count"] == TINY.articles
        assert 0.0 <= r["audit"]["greedy"]["train"]["exact_match_rate"] <= 1.0
        assert r["val_loss"] > 0 and (out / name / "audit" / "memorization.jsonl").is_file()
        assert len(r["val_curve"]) == TINY.evals and r["best_val_loss"] == min(v for _, v in r["val_curve"]) <= r["val_loss"]
    assert m["best_val_loss_ratio"] == pytest.approx(m["runs"]["goldfish"]["best_val_loss"] / m["runs"]["standard"]["best_val_loss"])
    assert 0 < m["unigram_val_loss"] < 2 * math.log(TINY.vocab_size)
    assert m["val_loss_ratio"] == pytest.approx(m["runs"]["goldfish"]["val_loss"] / m["runs"]["standard"]["val_loss"])
    assert (out / "goldfish.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| claim | paper | ours | holds |" in report and "| goldfish |" in report and "not a claim in the quick tier" in report
    # the goldfish run dropped about 1 in 4 of the positions it could drop
    rows = [json.loads(line) for line in (out / "goldfish" / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["dropped_fraction"] for r in rows if "dropped_fraction" in r]
    assert fractions and all(0.05 < f < 0.3 for f in fractions)


def test_cli_audit_of_the_study_checkpoint_matches_the_study(tiny_study, tmp_path):
    out, results = tiny_study
    audit = tmp_path / "audit"
    assert main(["memorization", "--checkpoint", str(out / "standard"), "--documents", str(out / "documents.jsonl"),
                 "--prompt_tokens", str(TINY.prompt_tokens), "--new_tokens", str(TINY.new_tokens), "--num_beams", "1",
                 "--max_tokens", str(TINY.tokens + 1), "--out", str(audit), "--progress", "false"]) == 0
    summary = json.loads((audit / "summary.json").read_text())
    study = results["metrics"]["runs"]["standard"]["audit"]["greedy"]["train"]
    assert summary["greedy"]["train"]["count"] == study["count"]
    assert summary["greedy"]["train"]["token_match"] == pytest.approx(study["token_match"])
    assert summary["greedy"]["train"]["exact_match"] == study["exact_match"]


def test_unigram_loss_is_the_cross_entropy_of_add_one_token_frequencies():
    import torch

    from rizzearch.reproduce.goldfish import unigram_loss

    rows = torch.tensor([[9, 0, 0, 1]])  # the first token of a row is never a target: counts 0:2, 1:1, 2:0 -> +1 -> 3, 2, 1
    val = torch.tensor([9, 0, 2])  # targets 0 and 2
    assert unigram_loss(rows, val, 3) == pytest.approx(-(math.log(3 / 6) + math.log(1 / 6)) / 2)
