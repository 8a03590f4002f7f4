"""The shared study scaffold: modes and sizes, the run context, clocks and the report/plot writers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from rizzearch.errors import ConfigError
from rizzearch.reproduce import goldfish, goldfish_real, orpo, orpo_real, rwkv, xlstm
from rizzearch.reproduce.common import (
    MODES, Budget, Claim, Markdown, Modes, StudyRun, claims_table, environment, figure, fmt_value, load_average, md_table,
)


@dataclass(frozen=True)
class Size:
    width: int = 8


SIZES = Modes(tiny=Size(2), quick=Size(), full=Size(32), budget_s={"tiny": 10, "quick": 60, "full": 600})


def test_study_run_picks_the_mode_sizes_and_budget(tmp_path):
    r = StudyRun.start("toy", tmp_path / "a" / "b", SIZES, full=False, tiny=True, device="cpu", seed=3)
    assert (r.mode, r.tier, r.size, r.budget.seconds, r.seed) == ("tiny", "quick", Size(2), 10, 3)
    assert r.out.is_dir()
    assert StudyRun.start("toy", tmp_path, SIZES, full=True, tiny=False, device="cpu", seed=0).size == Size(32)
    assert StudyRun.start("toy", tmp_path, SIZES, full=False, tiny=False, device="cpu", seed=0).budget.seconds == 60
    with pytest.raises(ConfigError, match="at most one"):
        StudyRun.start("toy", tmp_path, SIZES, full=True, tiny=True, device="cpu", seed=0)
    data = r.finish([Claim("c", "s", 1, 2.5, True)], {"m": 1})
    assert data == json.loads((r.out / "results.json").read_text()) and data["study"] == "toy"


def test_modes_table_is_checked():
    with pytest.raises(ConfigError, match=r"no budget for mode\(s\) \['full'\]"):
        Modes(tiny=1, quick=2, full=3, budget_s={"tiny": 1, "quick": 2})
    with pytest.raises(ConfigError, match="unknown tier 'nope'"):
        Modes(tiny=1, quick=2, full=3, budget_s=dict.fromkeys(MODES, 1.0), tier="nope")
    with pytest.raises(ConfigError, match="unknown mode 'huge'"):
        SIZES.size("huge")


@pytest.mark.parametrize("study,tier", [(xlstm, "quick"), (rwkv, "quick"), (goldfish, "quick"), (orpo, "quick"),
                                        (goldfish_real, "real"), (orpo_real, "real")])
def test_every_study_uses_the_shared_modes_table(study, tier):
    assert isinstance(study.MODES, Modes) and study.MODES.tier == tier
    assert (study.MODES.tiny, study.MODES.quick, study.MODES.full) == (study.TINY, study.QUICK, study.FULL)
    assert type(study.TINY) is study.Size and all(study.MODES.budget_s[m] > 0 for m in MODES)


def test_budget_clocks():
    b = Budget(100.0)
    assert 0 <= b.elapsed() < 100 and b.left() <= 100 and b.cpu_elapsed() >= 0
    assert (b.load_start is None) == (load_average() is None)


def test_md_table_and_claims_table():
    assert md_table(["a", "b"], [["x", 1.23456], ["y", {"k": 2}]], "lr") == "| a | b |\n|---|---:|\n| x | 1.235 |\n| y | k: 2 |"
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        md_table(["a", "b"], [[1, 2, 3]])
    with pytest.raises(ValueError, match="align"):
        md_table(["a", "b"], [], "l")
    text = claims_table([Claim("c1", "X beats Y", 0.9, 0.95, True), {"id": "c2", "statement": "Z", "paper_value": "<5%", "our_value": [0.07], "holds": False}])
    assert text.splitlines() == ["| claim | paper | ours | holds |", "|---|---|---|---|", "| X beats Y | 0.9 | 0.95 | yes |", "| Z | <5% | [0.07] | **no** |"]
    assert fmt_value(True) == "yes" and fmt_value(1 / 3) == "0.3333"


def test_markdown_sections_and_figure(tmp_path):
    doc = Markdown("Study").section(None, "intro", "").claims([Claim("c", "s", 1, 2, True)]).section("Runs", "| t |")
    doc.image(tmp_path / "plot.png", "the plot").write(tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Study\n\nintro\n\n## Claims\n\n| claim | paper | ours | holds |")
    assert text.endswith("## Runs\n\n| t |\n\n![the plot](plot.png)\n") and text.count("## Claims") == 1
    with figure(tmp_path / "fig.png", 2, (4, 2)) as (a, b):
        a.plot([0, 1], [1, 0])
        b.bar([0], [1])
    assert (tmp_path / "fig.png").stat().st_size > 500
    from rizzearch.reproduce.common import pyplot

    open_before = len(pyplot().get_fignums())
    with pytest.raises(RuntimeError, match="drawing failed"), figure(tmp_path / "bad.png", 1, (2, 2)):
        raise RuntimeError("drawing failed")
    assert not (tmp_path / "bad.png").exists() and len(pyplot().get_fignums()) == open_before


def test_environment_is_the_one_machine_record():
    env = environment()
    assert {"python", "platform", "cpu_count", "torch", "torch_threads", "device", "rizzearch"} <= set(env)


# -- intervals and the learning-rate sweep ------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    from rizzearch.reproduce.common import rate_ci, wilson_interval

    # 8/10: p = 0.8, centre = (0.8 + 0.19208) / 1.38416 = 0.71679, half = 1.96 sqrt(0.016 + 0.009604) / 1.38416 = 0.22658
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and 0.0 < wilson_interval(0, 20)[1] < 0.2  # sensible at 0 successes
    assert wilson_interval(20, 20)[1] == pytest.approx(1.0) and wilson_interval(20, 20)[0] > 0.8
    assert rate_ci(3, 4) == {"rate": 0.75, "ci95": [round(wilson_interval(3, 4)[0], 4), round(wilson_interval(3, 4)[1], 4)], "n": 4}
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_mean_ci_brackets_the_mean_and_is_reproducible():
    from rizzearch.reproduce.common import fmt_ci, mean_ci

    x = [0.1 * i for i in range(50)]
    a, b = mean_ci(x, key="k"), mean_ci(x, key="k")
    assert a == b and a["n"] == 50 and a["ci95"][0] < a["mean"] < a["ci95"][1]
    assert mean_ci([1.0] * 10)["ci95"] == [1.0, 1.0]
    assert fmt_ci(a).startswith(f"{a['mean']:.3f} [")


def test_lr_sweep_selects_on_the_validation_score_and_skips_diverged_runs():
    from rizzearch.reproduce.common import lr_sweep

    val = {1e-3: 0.5, 3e-3: 0.9, 1e-2: float("nan")}
    trained = []

    def train(lr):
        trained.append(lr)
        return f"model@{lr}", {"lr": lr}

    model, rec = lr_sweep([1e-3, 3e-3, 1e-2], train, lambda m, info: val[info["lr"]], higher_is_better=True)
    assert trained == [1e-3, 3e-3, 1e-2] and model == "model@0.003" and rec["selected_lr"] == 3e-3
    assert set(rec["runs"]) == {"0.001", "0.003", "0.01"} and rec["grid"] == [1e-3, 3e-3, 1e-2]
    # losses: lower wins; a diverged first run never stays selected; ties keep the earlier rate
    loss = {1e-3: float("inf"), 3e-3: 2.0, 1e-2: 2.0}
    model, rec = lr_sweep([1e-3, 3e-3, 1e-2], train, lambda m, info: loss[info["lr"]], higher_is_better=False)
    assert rec["selected_lr"] == 3e-3
    with pytest.raises(ConfigError, match="empty"):
        lr_sweep([], train, lambda m, i: 0.0, higher_is_better=True)
