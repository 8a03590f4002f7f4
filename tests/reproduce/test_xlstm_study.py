"""Smoke run of the xLSTM study (tiny mode): it runs end to end and writes valid outputs."""

from __future__ import annotations

import math

from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.xlstm import TINY, matched_width, n_params


def test_tiny_study_writes_results_report_and_plot(tmp_path):
    from rizzearch.reproduce.xlstm import run

    res = run(str(tmp_path), tiny=True)
    assert read_results(tmp_path / "results.json") == res
    assert res["study"] == "xlstm"
    assert {c["id"] for c in res["claims"]} == {"parity_slstm_extrapolates", "parity_no_memory_mixing_fails", "mqar_xlstm_recalls", "mqar_gpt_baseline"}
    m = res["metrics"]
    assert set(m["parity"]) == {"gpt", "mlstm", "slstm"} and set(m["mqar"]) == {"gpt", "mlstm", "mixed"}
    for task in ("parity", "mqar"):
        for r in m[task].values():
            assert r["steps"] > 0 and math.isfinite(r["final_loss"])
    for r in m["parity"].values():
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert m["wall_seconds"] > 0 and "start" in m["load_average"]
    report = (tmp_path / "report.md").read_text()
    assert "| model | parameters |" in report and "xLSTM[0:1] (sLSTM)" in report and "## MQAR" in report
    assert (tmp_path / "xlstm.png").stat().st_size > 1000
    assert (tmp_path / "runs" / "parity_slstm_seed0" / "metrics.jsonl").is_file()
    assert all(len(r["seeds"]) >= 1 for r in m["parity"].values())
    # MQAR: every model ran the whole learning-rate grid; the kept rate is the one with the best validation accuracy
    for kind, r in m["mqar"].items():
        assert set(r["sweep"]) == {str(lr) for lr in TINY.mqar_lrs}
        val = {lr: t["val_accuracy"] for lr, t in r["sweep"].items()}
        assert val[str(r["lr"])] == max(val.values())
        assert (tmp_path / "runs" / f"mqar_{kind}_lr{TINY.mqar_lrs[0]:g}" / "metrics.jsonl").is_file()
        lo, hi = r["accuracy_ci"]["ci95"]
        assert lo <= r["accuracy"] <= hi and len(r["test_scores"]) == TINY.mqar_eval_n
    gpt_claim = next(c for c in res["claims"] if c["id"] == "mqar_gpt_baseline")
    assert gpt_claim["holds"] == (m["mqar"]["gpt"]["accuracy"] >= 0.9) and "[" in gpt_claim["our_value"]["GPT"]


def test_mqar_models_are_matched_in_size():
    V = 64
    target = n_params("mixed", 64, V)
    for kind in ("gpt", "mlstm"):
        got = n_params(kind, matched_width(kind, target, V), V)
        assert abs(got - target) / target < 0.15, (kind, got, target)
