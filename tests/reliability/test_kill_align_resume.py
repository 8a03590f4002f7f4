"""Issue 12: a killed ``rizz align`` could neither resume (``--resume`` was unknown) nor be rerun into
its folder. Now ``align --resume true`` continues bit for bit, for every method, including a run
stopped in either stage of sft+dpo (the DPO reference is rebuilt from the stage's starting weights)."""

from __future__ import annotations

import json

import pytest
import torch

from rizzearch.cli import main
from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.models.base import tiny_overrides
from rizzearch.training import loop as loop_mod
from rizzearch.training.align import PreferenceDataConfig, align
from rizzearch.training.loop import TrainConfig

CFG = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=1, keep_checkpoints=2, seed=0)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _align(pairs, out, method, **kw):
    data = PreferenceDataConfig(source=str(pairs), tokenizer="byte", max_length=48, val_fraction=0.25)
    return align(method=method, model="gpt", model_config=tiny_overrides("gpt"), data=data, train=kw.pop("train", CFG), out=str(out),
                 sft_steps=3 if method == "sft+dpo" else None, progress=False, **kw)


def _state(run):
    from safetensors.torch import load_file

    out = {}
    for d in (run, run / "sft"):
        if (d / "checkpoints" / "latest.json").exists():
            name = json.loads((d / "checkpoints" / "latest.json").read_text())["name"]
            rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            out[str(d.relative_to(run))] = (name, load_file(str(d / "checkpoints" / name / "model.safetensors")),
                                            [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "peak_mem_mb")} for r in rows])
    return out


def _kill_at(monkeypatch, call: int):
    """Raise inside the loop at the ``call``-th optimizer step (counted over both stages)."""
    real, n = loop_mod.lr_at, {"calls": 0}

    def lr_at(step, cfg):
        n["calls"] += 1
        if n["calls"] == call:
            raise Killed
        return real(step, cfg)

    monkeypatch.setattr(loop_mod, "lr_at", lr_at)


@pytest.mark.parametrize("method,kill_at", [("orpo", 3), pytest.param("dpo", 3, marks=pytest.mark.slow),
                                            pytest.param("sft+dpo", 2, marks=pytest.mark.slow), ("sft+dpo", 6)])
def test_align_resume_is_bit_exact(tmp_path, pairs_file, monkeypatch, method, kill_at):
    _align(pairs_file, tmp_path / "ref", method)
    with monkeypatch.context() as m:
        _kill_at(m, kill_at)
        with pytest.raises(Killed):
            _align(pairs_file, tmp_path / "run", method)
    with pytest.raises(ConfigError, match="pass --resume true"):  # a plain rerun into the folder is refused, nothing overwritten
        _align(pairs_file, tmp_path / "run", method)
    _align(pairs_file, tmp_path / "run", method, resume=True)
    ref, got = _state(tmp_path / "ref"), _state(tmp_path / "run")
    assert ref.keys() == got.keys()
    for stage in ref:
        (na, wa, ma), (nb, wb, mb) = ref[stage], got[stage]
        assert na == nb
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{stage}/{k}: resumed weights differ"
        assert ma == mb, f"{stage}: metrics differ"


def test_align_resume_refuses_other_settings_and_empty_folders(tmp_path, pairs_file):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        _align(pairs_file, tmp_path / "empty", "orpo", resume=True)
    _align(pairs_file, tmp_path / "run", "orpo", train=TrainConfig(**{**CFG.__dict__, "steps": 2}))
    with pytest.raises(ConfigError, match=r"train\.lr: checkpoint 0\.001, now 0\.01"):
        _align(pairs_file, tmp_path / "run", "orpo", train=TrainConfig(**{**CFG.__dict__, "lr": 1e-2}), resume=True)


def test_align_resume_flag_through_the_cli(tmp_path, pairs_file):
    args = ["align", "--method", "sft", "--model", "gpt", "--model_config", json.dumps(tiny_overrides("gpt")), "--data.source", str(pairs_file),
            "--data.tokenizer", "byte", "--data.max_length", "48", "--data.val_fraction", "0.25", "--train.batch_size", "4",
            "--train.log_every", "1", "--progress", "false", "--out", str(tmp_path / "run")]
    assert main(args + ["--train.steps", "1"]) == 0
    assert main(args + ["--train.steps", "2", "--resume", "true"]) == 0
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 2
