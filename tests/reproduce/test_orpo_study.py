"""ORPO study smoke run (tiny mode): writes a valid results.json, report.md and a plot."""

from __future__ import annotations

import random

import pytest

from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.orpo import make_pairs, paired_bootstrap, run


def test_tiny_study_writes_results_report_and_plot(tmp_path):
    out = run(str(tmp_path), tiny=True)
    data = read_results(tmp_path / "results.json")
    assert data == out and data["study"] == "orpo"
    assert {c["id"] for c in data["claims"]} == {"orpo_beats_sft_preference", "orpo_competitive_with_sft_dpo", "orpo_fewer_forward_passes"}
    m = data["metrics"]
    for method in ("base", "sft", "sft+dpo", "orpo", "orpo_lam1"):
        assert 0.0 <= m["results"][method]["pref_accuracy"] <= 1.0
    # compute accounting is exact: SFT forwards B per step, ORPO 2B, DPO 2B plus the reference pass
    sz, c = m["sizes"], m["compute"]
    assert c["sft"]["forward_sequences"] == sz["align_steps"] * sz["align_batch"]
    assert c["orpo"]["forward_sequences"] == 2 * sz["align_steps"] * sz["align_batch"]
    assert c["sft+dpo"]["reference_forward_sequences"] == 2 * m["data"]["train_pairs"]
    claim = next(x for x in data["claims"] if x["id"] == "orpo_fewer_forward_passes")
    assert claim["holds"] is True
    assert (tmp_path / "report.md").read_text().startswith("# ORPO study (tiny mode)")
    assert (tmp_path / "orpo.png").stat().st_size > 1000


def test_task_pairs_are_checkable():
    for p in make_pairs(50, random.Random(1)):
        prompt = p.messages[0][1]
        nums = [int(x) for x in prompt.split(":")[1].split(".")[0].split()]
        ranked = sorted(nums, reverse="largest" in prompt)
        assert int(p.chosen) == ranked[0] and int(p.rejected) == ranked[1]


def test_paired_bootstrap():
    import torch

    a = torch.tensor([1, 1, 1, 0] * 25, dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0] * 25, dtype=torch.bool)
    mean, lo, hi = paired_bootstrap(a, b, 500)
    assert mean == pytest.approx(0.5) and 0.3 < lo < 0.5 < hi < 0.7
