"""The real-tier Goldfish study: its pieces, its claim logic on hand-made numbers, a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from rizzearch.errors import DataError
from rizzearch.reproduce.common import REAL_MODEL, TINY_REAL_MODEL, mean_ci, rate_ci, read_results
from rizzearch.reproduce.goldfish_real import (GOLDFISH_MAX_EXACT, QUICK, TINY, VAL_MARGIN_NATS, Data, check_disjoint, estimate,
                                               make_claims, run, split_articles)


def test_split_articles_at_title_lines_followed_by_a_blank_line():
    text = " = First = \n\n Body one .\n = Not a title = \n more\n = Second = \n\n Body two .\n"
    arts = split_articles(text)
    assert [t for t, _ in arts] == ["First", "Second"]
    assert arts[0][1] == " = First = \n\n Body one .\n = Not a title = \n more\n"  # the title-like line without a blank line is text
    assert arts[1][1].startswith(" = Second = \n")


def test_check_disjoint_rejects_an_article_in_both_splits():
    import torch

    data = Data(["a", "b"], [0, 5], [5, 7], torch.zeros(2, 3, dtype=torch.long), ["b", "c"], [[1], [2]], [[1, 2]], 8)
    with pytest.raises(DataError, match=r"\[5\] both trained on and held out"):
        check_disjoint(data)
    check_disjoint(Data(["<unk>", "x"], [0, 1], [2], torch.zeros(2, 3, dtype=torch.long), ["<unk>"], [[1]], [[1, 2]], 8))  # repeated titles are fine


def _stats(std_exact: int, gf_exact: int, dval: list[float], n: int = 32, rouge_k4=0.3, rouge_k8=0.5) -> dict:
    names = ("base", "standard", "goldfish-k4", "goldfish-k8")
    exact = dict(zip(names, (0, std_exact, gf_exact, 3)))
    rouge = {"base": 0.1, "standard": 0.95, "goldfish-k4": rouge_k4, "goldfish-k8": rouge_k8}
    return {
        "exact": {k: rate_ci(v, n) for k, v in exact.items()},
        "rougeL": {k: mean_ci([v] * n) for k, v in rouge.items()},
        "val_loss": {k: mean_ci([3.0] * 8) for k in names},
        "val_diff_vs_standard": {k: mean_ci(dval) for k in names if k != "standard"},
        "rougeL_diff_k": mean_ci([rouge_k8 - rouge_k4 + 0.01 * (i % 3 - 1) for i in range(n)]),
    }


def test_claims_hold_on_numbers_like_the_paper():
    claims = make_claims(_stats(28, 0, [0.01, 0.02, 0.0, 0.015] * 8), QUICK, REAL_MODEL)
    assert [c.id for c in claims] == ["standard_regurgitates_most", "goldfish_regurgitates_none", "goldfish_heldout_loss_cost",
                                      "memorization_grows_with_k"]
    assert all(c.holds for c in claims)
    assert all(c.model == REAL_MODEL for c in claims)
    assert "% [" in claims[0].our_value and "% [" in claims[1].our_value  # Wilson intervals


def test_each_claim_can_fail():
    # 18/32 is a majority, but its Wilson interval reaches below 50%: "most" is not shown
    assert not make_claims(_stats(18, 0, [0.0] * 32), QUICK, REAL_MODEL)[0].holds
    assert make_claims(_stats(1, 0, [0.0] * 32), QUICK, REAL_MODEL)[1].holds  # 1/32 = 3.1% <= 5%
    assert not make_claims(_stats(28, 2, [0.0] * 32), QUICK, REAL_MODEL)[1].holds  # 2/32 = 6.25% > 5%
    # a mean cost below the margin whose interval reaches above it does not hold
    noisy = [VAL_MARGIN_NATS - 0.01 + (0.2 if i % 2 else -0.2) for i in range(32)]
    assert not make_claims(_stats(28, 0, noisy), QUICK, REAL_MODEL)[2].holds
    assert not make_claims(_stats(28, 0, [0.0] * 32, rouge_k4=0.5, rouge_k8=0.3), QUICK, REAL_MODEL)[3].holds
    assert GOLDFISH_MAX_EXACT == 0.05 and VAL_MARGIN_NATS == 0.05  # the thresholds fixed before the run


def test_quick_mode_is_estimated_within_its_budget():
    est = estimate(QUICK)
    assert list(est) == ["base", "standard", "goldfish-k4", "goldfish-k8"]
    assert sum(est.values()) <= 18 * 60  # the real tier's goldfish budget on 2 quiet cores
    assert QUICK.new_tokens == QUICK.tokens + 1 - QUICK.prompt_tokens and QUICK.steps * QUICK.batch_size == QUICK.epochs * QUICK.articles


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("goldfish_real") / "study"
    return out, run(str(out), tiny=True)


def test_tiny_study_end_to_end(tiny_study):
    out, results = tiny_study
    data = read_results(out / "results.json")
    assert data == results and data["study"] == "goldfish"
    assert [c["id"] for c in data["claims"]] == ["standard_regurgitates_most", "goldfish_regurgitates_none", "goldfish_heldout_loss_cost",
                                                 "memorization_grows_with_k"]
    assert all(c["model"] == TINY_REAL_MODEL for c in data["claims"])
    m = data["metrics"]
    assert m["mode"] == "tiny" and m["tier"] == "real" and m["fine_tuning"] == "full (every weight)"
    assert len(m["subset"]["training_articles"]) == TINY.articles and m["subset"]["val_tokens"] == TINY.val_windows * TINY.val_window_tokens
    assert set(m["runs"]) == {"base", "standard", "goldfish-k4", "goldfish-k8"}
    for name, r in m["runs"].items():
        assert len(r["rougeL_per_article"]) == TINY.articles
        assert r["audit_summary"]["greedy"]["train"]["count"] == TINY.articles
        assert r["audit_summary"]["new_tokens"] == TINY.new_tokens
        if name != "base":
            assert r["steps"] == TINY.steps and len(r["history"]) == TINY.steps
    assert m["runs"]["goldfish-k4"]["objective"]["goldfish"]["k"] == 4 and m["runs"]["goldfish-k4"]["objective"]["goldfish"]["strategy"] == "hash"
    for key in ("wall_seconds", "loadavg_1min_start", "phase_seconds", "selected_lr", "lr_grid"):
        assert key in m
    for f in ("report.md", "rougeL_histogram.png", "training.png", "documents.jsonl", "heldout.jsonl", "standard/audit/summary.json"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "| claim |" in report and "rougeL_histogram.png" in report


def test_tiny_study_trains_and_holds_out_disjoint_articles(tiny_study):
    out, _ = tiny_study
    train = [json.loads(x)["text"] for x in (out / "documents.jsonl").read_text().splitlines()]
    held = [json.loads(x)["text"] for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == TINY.articles and len(held) == TINY.heldout_documents
    assert not set(train) & set(held)


def test_tiny_study_fine_tuning_changes_the_model(tiny_study):
    _, results = tiny_study
    runs = results["metrics"]["runs"]
    # the random tiny model learns: training loss falls, and each run differs from the untouched base model
    for name in ("standard", "goldfish-k4"):
        h = runs[name]["history"]
        assert h[-1]["all_token_loss"] < h[0]["all_token_loss"]
        assert runs[name]["val_loss"] != runs["base"]["val_loss"]


@pytest.mark.slow
def test_quick_mode_real_run(tmp_path):
    results = run(str(tmp_path / "study"))
    assert results["metrics"]["mode"] == "quick"
    assert all(c["model"] == REAL_MODEL for c in results["claims"])
