"""Smoke run of the RWKV study (tiny mode): it runs end to end and writes valid outputs."""

from __future__ import annotations

import math

from rizzearch.reproduce.common import read_results
from rizzearch.reproduce.rwkv import make_models, state_bytes, TINY


def test_tiny_study_writes_results_report_and_plot(tmp_path):
    from rizzearch.reproduce.rwkv import run

    res = run(str(tmp_path), tiny=True)
    assert read_results(tmp_path / "results.json") == res
    assert res["study"] == "rwkv"
    ids = {c["id"] for c in res["claims"]}
    assert ids == {"rwkv_decode_time_flat", "gpt_decode_time_grows", "rwkv_state_constant", "rwkv_competitive_with_gpt"}
    # memory: RWKV's state is the same at every context, the KV cache grows linearly
    rows = res["metrics"]["decode"]
    assert len({r["rwkv_state_bytes"] for r in rows}) == 1
    assert rows[-1]["gpt_state_bytes"] > rows[0]["gpt_state_bytes"]
    assert next(c for c in res["claims"] if c["id"] == "rwkv_state_constant")["holds"]
    for name in ("rwkv", "gpt"):
        t = res["metrics"]["training"][name]
        assert math.isfinite(t["val_loss"]) and t["val_loss"] < math.log(258) + 0.5
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
