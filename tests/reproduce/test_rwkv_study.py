"""Smoke run of the RWKV study (tiny mode): it runs end to end and writes valid outputs."""

from __future__ import annotations

import math

import pytest

from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.rwkv import TINY, make_models, state_bytes


def test_tiny_study_writes_results_report_and_plot(tmp_path):
    from rizzearch.reproduce.rwkv import run

    res = run(str(tmp_path), tiny=True)
    assert read_results(tmp_path / "results.json") == res
    assert res["study"] == "rwkv"
    ids = {c["id"] for c in res["claims"]}
    assert ids == {"rwkv_decode_time_flat", "gpt_decode_time_grows", "rwkv_state_constant", "rwkv_on_par_with_gpt"}
    # memory: RWKV's state is the same at every context, the KV cache grows linearly
    rows = res["metrics"]["decode"]
    assert len({r["rwkv_state_bytes"] for r in rows}) == 1
    assert rows[-1]["gpt_state_bytes"] > rows[0]["gpt_state_bytes"]
    assert next(c for c in res["claims"] if c["id"] == "rwkv_state_constant")["holds"]
    for name in ("rwkv", "gpt"):
        t = res["metrics"]["training"][name]
        assert math.isfinite(t["val_loss"]) and t["val_loss"] < math.log(258) + 0.5
        # the whole grid ran; the kept rate has the lowest validation loss; the test loss is the mean over test windows
        assert set(t["sweep"]) == {str(lr) for lr in TINY.lrs}
        assert t["sweep"][str(t["lr"])]["val_loss"] == min(x["val_loss"] for x in t["sweep"].values())
        assert t["test_loss"] == pytest.approx(sum(t["test_window_losses"]) / len(t["test_window_losses"]))
    par = res["metrics"]["parity"]
    lo, hi = par["relative_difference"]["ci95"]
    assert lo <= par["relative_difference"]["mean"] <= hi
    claim = next(c for c in res["claims"] if c["id"] == "rwkv_on_par_with_gpt")
    assert claim["holds"] == (-0.05 <= lo and hi <= 0.05) == par["within"]
    report = (tmp_path / "report.md").read_text()
    assert "| context |" in report and "| rwkv |" in report
    assert (tmp_path / "rwkv.png").stat().st_size > 1000


def test_models_have_matching_sizes_and_state_bytes():
    models = make_models(TINY, 258, "cpu")
    r, g = models["rwkv"].num_params(), models["gpt"].num_params()
    assert abs(r - g) / r < 0.02
    state = models["rwkv"].init_state(1)
    # 5 vectors per layer: att_x, ffn_x (d_model, fp32 model) and num, den, max (fp32)
    assert state_bytes(state) == TINY.n_layer * 5 * TINY.d_model * 4


def test_parity_is_an_equivalence_test_on_the_paired_interval():
    from rizzearch.reproduce.rwkv import parity

    gpt = [3.0 + 0.01 * (i % 7) for i in range(64)]
    same = parity({"rwkv": {"test_window_losses": [x + 0.003 for x in gpt]}, "gpt": {"test_window_losses": gpt}})
    assert same["within"] and same["relative_difference"]["mean"] == pytest.approx(0.001, abs=1e-4)
    better = parity({"rwkv": {"test_window_losses": [0.8 * x for x in gpt]}, "gpt": {"test_window_losses": gpt}})
    assert not better["within"]  # 20% lower loss is not parity (it would be superiority)
    worse = parity({"rwkv": {"test_window_losses": [1.1 * x for x in gpt]}, "gpt": {"test_window_losses": gpt}})
    assert not worse["within"] and worse["relative_difference"]["ci95"][0] > 0.05
