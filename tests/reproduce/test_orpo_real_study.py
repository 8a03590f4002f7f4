"""ORPO study, real tier: the tiny end-to-end run (a random llama with SmolLM2's tokenizer), the splits,
the claim logic on hand-made numbers (so each claim can be seen to fail) and the compute record."""

from __future__ import annotations

import pytest
import torch

from rizzearch.data.preference import PreferencePair
from rizzearch.errors import DataError
from rizzearch.reproduce import orpo_real
from rizzearch.reproduce.common import REAL_MODEL, TINY_REAL_MODEL, read_results
from rizzearch.reproduce.orpo_real_data import prompt_key, split_by_prompt, summarize

SZ = orpo_real.Size(bootstrap=500)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("orpo_real")
    return out, orpo_real.run(str(out), tiny=True)


def test_tiny_run_writes_results_report_and_plots(tiny_run):
    out, res = tiny_run
    data = read_results(out / "results.json")
    assert data == res and data["study"] == "orpo"
    ids = {c["id"] for c in data["claims"]}
    assert ids == {"sft_raises_rejected", "orpo_margin_beats_sft", "orpo_accuracy_at_least_sft", "orpo_margin_beats_sft_lam1",
                   "orpo_accuracy_at_least_sft_lam1", "orpo_fewer_forward_passes"}
    assert all(c["model"] == TINY_REAL_MODEL for c in data["claims"])
    m = data["metrics"]
    assert m["tier"] == "real" and m["fine_tuning"]["kind"] == "LoRA" and m["fine_tuning"]["r"] == 16
    assert set(m["fine_tuning"]["targets"]) and all(n.split(".")[-1] in ("qkv", "proj", "gate_up", "down") for n in m["fine_tuning"]["targets"])
    for method in orpo_real.METHODS:
        r = m["results"][method]
        assert 0.0 <= r["pref_accuracy"] <= 1.0 and r["n"] == m["data"]["test_pairs"]
        lo, hi = r["accuracy_ci"]["ci95"]
        assert lo <= r["pref_accuracy"] <= hi
    for sweep in m["lr_sweeps"].values():  # the same grid for every method, the selection from it
        assert sweep["grid"] == list(orpo_real.LR_GRID) and sweep["selected_lr"] in orpo_real.LR_GRID
    assert sum(m["split_overlap"].values()) == 0
    # Fig. 3 curves: step 0 (base), the snapshots, the final step
    sz = m["sizes"]
    for curve in m["curves"].values():
        steps = [p["step"] for p in curve]
        assert steps[0] == 0 and steps[-1] == sz["steps"] and steps == sorted(steps) and len(steps) >= 3
    assert set(m["curves"]) == set(orpo_real.CURVE_METHODS)
    assert m["curves"]["sft"][0] == m["curves"]["orpo"][0]  # the same base point
    assert {"load_model", "data", "train", "evaluate"} <= set(m["phase_seconds"]) and m["load_average"] is not None
    assert (out / "report.md").read_text().startswith("# ORPO study, real tier (tiny mode)")
    for png in ("orpo_real.png", "orpo_real_curves.png"):
        assert (out / png).stat().st_size > 1000


def test_tiny_run_counts_forward_passes_exactly(tiny_run):
    _, res = tiny_run
    m = res["metrics"]
    sz, c, n_train = m["sizes"], m["compute"], m["data"]["train_pairs"]
    assert n_train == sz["steps"] * sz["batch"]
    assert c["sft"]["forward_sequences"] == sz["steps"] * sz["batch"]  # chosen only
    assert c["orpo"]["forward_sequences"] == 2 * sz["steps"] * sz["batch"]
    assert c["sft+dpo"]["reference_forward_sequences"] == 2 * n_train  # one no-grad pass over the training pairs
    assert c["sft+dpo"]["forward_sequences"] == c["sft"]["forward_sequences"] + 2 * n_train + 2 * sz["steps"] * sz["batch"]
    assert next(x for x in res["claims"] if x["id"] == "orpo_fewer_forward_passes")["holds"] is True


def _pair(first: str, i: int, follow: str = "") -> PreferencePair:
    msgs = (("user", first),) + ((("assistant", "ok"), ("user", follow)) if follow else ())
    return PreferencePair(msgs, f"good {i}", f"bad {i}", f"mem:{i}")


def test_split_keeps_every_prompt_group_in_one_split():
    # 30 opening requests, several with multi-turn variants sharing the first turn (and case/space variants)
    pairs = [_pair(f"Question {k}", 10 * k + j, follow=f"more {j}" if j else "") for k in range(30) for j in range(k % 3 + 1)]
    pairs += [_pair(f"  question   {k} ", 999 + k) for k in range(5)]
    train, val, test = split_by_prompt(pairs, (20, 10, 15), seed=3)
    assert (len(train), len(val), len(test)) == (20, 10, 15)
    keys = [{prompt_key(p) for p in s} for s in (train, val, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert split_by_prompt(pairs, (20, 10, 15), seed=3) == (train, val, test)  # fixed by the seed
    assert split_by_prompt(pairs, (20, 10, 15), seed=4) != (train, val, test)


def test_split_fails_clearly_when_pairs_run_out():
    pairs = [_pair(f"q{k}", k) for k in range(10)]
    with pytest.raises(DataError, match="too few pairs"):
        split_by_prompt(pairs, (5, 3, 5), seed=0)


def _logps(chosen, rejected):
    return torch.tensor(chosen, dtype=torch.float), torch.tensor(rejected, dtype=torch.float)


def test_claim_sft_rejected_rises_holds_and_fails():
    base = _logps([-2.0] * 50, [-2.5] * 50)
    up = _logps([-1.5 + 0.01 * (i % 5) for i in range(50)], [-2.0 + 0.01 * (i % 7) for i in range(50)])
    claim, d = orpo_real.claim_sft_rejected_rises(base, up, "m", SZ, 0)
    assert claim.holds and claim.model == "m" and d["rejected_change"]["ci95"][0] > 0
    down = _logps([-1.5] * 50, [-3.0 + 0.01 * (i % 7) for i in range(50)])
    assert not orpo_real.claim_sft_rejected_rises(base, down, "m", SZ, 0)[0].holds
    noisy = _logps([-1.5] * 50, [-2.5 + (0.3 if i % 2 else -0.3) for i in range(50)])  # no change on average
    assert not orpo_real.claim_sft_rejected_rises(base, noisy, "m", SZ, 0)[0].holds


def test_claim_margin_and_accuracy_on_hand_made_numbers():
    sft = _logps([-1.0] * 40, [-1.1 + 0.2 * (i % 2) for i in range(40)])  # margin 0.1 / -0.1, accuracy 0.5
    orpo = _logps([-1.0] * 40, [-1.6 + 0.2 * (i % 2) for i in range(40)])  # margin 0.6 / 0.4, accuracy 1.0
    c, d = orpo_real.claim_margin(sft, orpo, 0.1, "m", SZ, 0)
    assert c.holds and d["mean"] == pytest.approx(0.5, abs=1e-4)
    assert not orpo_real.claim_margin(orpo, sft, 0.1, "m", SZ, 0)[0].holds
    c, d = orpo_real.claim_accuracy(sft, orpo, 0.1, "m", SZ, 0)
    assert c.holds and d["mean"] == pytest.approx(0.5)
    c, d = orpo_real.claim_accuracy(orpo, sft, 0.1, "m", SZ, 0)  # ORPO far worse: fails
    assert not c.holds and d["ci95"][1] < 0
    # equal accuracy holds (non-inferiority), a small but clear deficit beyond the margin does not
    assert orpo_real.claim_accuracy(orpo, orpo, 0.1, "m", SZ, 0)[0].holds
    worse = _logps([-1.0] * 40, [-1.6 if i % 10 else -0.5 for i in range(40)])  # 0.9 vs 1.0, every loss one-sided
    c, d = orpo_real.claim_accuracy(orpo, worse, 0.1, "m", SZ, 0)
    assert d["mean"] == pytest.approx(-0.1) and not c.holds


def test_claim_forwards_fails_with_a_reference_pass_or_more_sequences():
    sweeps = {
        "sft": {"selected_lr": 1.0, "runs": {"1.0": {"forward_calls": 10, "forward_sequences": 40, "forward_tokens": 400, "seconds": 1.0}}},
        "sft+dpo": {"selected_lr": 2.0, "runs": {"2.0": {"forward_calls": 10, "forward_sequences": 80, "forward_tokens": 800, "seconds": 2.0}}},
        "orpo": {"selected_lr": 1.0, "runs": {"1.0": {"forward_calls": 10, "forward_sequences": 80, "forward_tokens": 800, "seconds": 2.0}}},
    }
    sweeps["orpo_lam1"] = sweeps["orpo"]
    ref = {"reference_forward_calls": 3, "reference_forward_sequences": 80, "reference_forward_tokens": 800}
    compute = orpo_real.compute_record(sweeps, ref)
    assert compute["sft+dpo"]["forward_sequences"] == 40 + 80 + 80 and compute["sft+dpo"]["seconds"] == 3.0
    assert orpo_real.claim_forwards(compute, "m").holds
    compute["orpo"]["reference_forward_sequences"] = 1
    assert not orpo_real.claim_forwards(compute, "m").holds
    compute["orpo"].update(reference_forward_sequences=0, forward_sequences=500)
    assert not orpo_real.claim_forwards(compute, "m").holds


def test_trainer_refuses_adapters_of_another_model():
    from types import SimpleNamespace

    from rizzearch.errors import CheckpointError
    from rizzearch.models.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig(vocab_size=64, d_model=32, n_layer=1, n_head=4, n_kv_head=2, d_ff=64))
    run = SimpleNamespace(seed=0, size=SZ, device="cpu")
    t = orpo_real.Trainer(run, model, None, None)
    assert t.trainable > 0 and all(".lora_" in k for k in t.init)
    t.load(t.init)  # its own adapters load
    with pytest.raises(CheckpointError, match="does not match"):
        t.load({"blocks.7.attn.qkv.lora_A.0": torch.zeros(16, 32)})


def test_summarize_counts_ties_as_wrong():
    s = summarize(*_logps([-1.0, -2.0, -1.0], [-2.0, -1.0, -1.0]))
    assert s["pref_accuracy"] == pytest.approx(1 / 3) and s["logp_margin"] == pytest.approx(0.0) and s["n"] == 3


@pytest.mark.slow
def test_quick_mode_runs_within_budget(tmp_path):
    res = orpo_real.run(str(tmp_path))
    m = res["metrics"]
    assert m["mode"] == "quick" and all(c["model"] == REAL_MODEL for c in res["claims"])
    assert m["estimate_quiet_seconds"] <= orpo_real.MODES.budget_s["quick"]
