"""Smoke run of the xLSTM study (tiny mode): it runs end to end and writes valid outputs."""

from __future__ import annotations

import math

from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.xlstm import matched_width, n_params


def test_tiny_study_writes_results_report_and_plot(tmp_path):
    from rizzearch.reproduce.xlstm import run

    res = run(str(tmp_path), tiny=True)
    assert read_results(tmp_path / "results.json") == res
    assert res["study"] == "xlstm"
    assert {c["id"] for c in res["claims"]} == {"parity_slstm_extrapolates", "parity_no_memory_mixing_fails", "mqar_xlstm_recalls"}
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


def test_mqar_models_are_matched_in_size():
    V = 64
    target = n_params("mixed", 64, V)
    for kind in ("gpt", "mlstm"):
        got = n_params(kind, matched_width(kind, target, V), V)
        assert abs(got - target) / target < 0.15, (kind, got, target)
