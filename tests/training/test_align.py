"""``rizz align``: every method end to end on a tiny model, compute accounting, init from a
checkpoint, the CLI, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from rizzearch.cli import main
from rizzearch.errors import ConfigError
from rizzearch.models.base import model_names, tiny_overrides
from rizzearch.training.align import PreferenceDataConfig, align
from rizzearch.training.checkpoint import load_checkpoint
from rizzearch.training.loop import TrainConfig

STEPS, BATCH = 2, 4


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _data(f, **kw):
    return PreferenceDataConfig(source=str(f), tokenizer="byte", max_length=48, val_fraction=0.25, **kw)


def _train(**kw):
    return TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, warmup_steps=1, log_every=1, **kw)


@pytest.mark.parametrize("method", ["orpo", "sft", "dpo"])
def test_methods_end_to_end_with_compute_accounting(tmp_path, pairs_file, method):
    s = align(method=method, model="gpt", model_config=tiny_overrides("gpt"), data=_data(pairs_file), train=_train(),
              out=str(tmp_path / method), progress=False)
    n_train = s["pairs"]["train"]
    assert (s["pairs"]["train"], s["pairs"]["val"]) == (12, 4)
    assert 0.0 <= s["val_after"]["pref_accuracy"] <= 1.0 and "pref_accuracy" in s["val_before"]
    per_step = {"orpo": 2 * BATCH, "sft": BATCH, "dpo": 2 * BATCH}[method]
    ref = 2 * n_train if method == "dpo" else 0
    assert s["forward_sequences"] == STEPS * per_step + ref
    assert s["stages"][0].get("reference_forward_sequences", 0) == ref
    model, tok, meta = load_checkpoint(tmp_path / method)
    assert meta["objective"] == method and tok is not None and meta["step"] == STEPS
    assert json.loads((tmp_path / method / "align_summary.json").read_text())["method"] == method


def test_sft_then_dpo_through_the_cli(tmp_path, pairs_file, capsys):
    out = tmp_path / "two"
    rc = main(["align", "--method", "sft+dpo", "--sft_steps", "3", "--model", "gpt", "--model_config", json.dumps(tiny_overrides("gpt")),
               "--data.source", str(pairs_file), "--data.tokenizer", "byte", "--data.max_length", "48", "--data.val_fraction", "0.25",
               "--train.steps", "2", "--train.batch_size", "4", "--train.log_every", "1", "--progress", "false", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "align_summary.json").read_text())
    assert [st["method"] for st in s["stages"]] == ["sft", "dpo"]
    assert s["stages"][0]["steps"] == 3 and s["stages"][1]["steps"] == 2
    assert s["forward_sequences"] == 3 * 4 + 2 * 12 + 2 * 2 * 4  # SFT + reference pass + DPO
    assert (out / "sft" / "checkpoints").is_dir() and (out / "checkpoints").is_dir()
    assert (out / "config.yaml").is_file()


def test_init_from_checkpoint_keeps_tokenizer_and_architecture(tmp_path, pairs_file):
    first = align(method="sft", model="gpt", model_config=tiny_overrides("gpt"), data=_data(pairs_file), train=_train(),
                  out=str(tmp_path / "a"), progress=False)
    s = align(method="orpo", init=first["run"], data=_data(pairs_file), train=_train(), out=str(tmp_path / "b"), progress=False)
    assert s["model"] == "gpt"
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (tmp_path / "a" / "tokenizer.json").read_text()
    with pytest.raises(ConfigError, match="model_config cannot be combined"):
        align(method="orpo", init=first["run"], model_config={"d_model": 32}, data=_data(pairs_file), train=_train(),
              out=str(tmp_path / "c"), progress=False)


@pytest.mark.parametrize("name", [n for n in ("xlstm", "rwkv") if n in model_names()])
def test_orpo_runs_for_every_registered_architecture(tmp_path, pairs_file, name):
    s = align(method="orpo", model=name, model_config=tiny_overrides(name), data=_data(pairs_file), train=_train(),
              out=str(tmp_path / name), progress=False)
    assert s["model"] == name and torch.isfinite(torch.tensor(s["val_after"]["chosen_logp"]))


def test_bad_input_fails_at_config_time(tmp_path, pairs_file, capsys):
    base = ["align", "--data.source", str(pairs_file), "--data.tokenizer", "byte", "--out", str(tmp_path / "x"), "--progress", "false"]
    assert main(base + ["--orpo.lam", "-0.5"]) == 2
    assert "orpo.lam" in capsys.readouterr().err
    assert main(base + ["--data.max_length", "32", "--data.max_response_length", "32"]) == 2
    assert "max_response_length" in capsys.readouterr().err
    assert main(base + ["--dpo.beta", "0"]) == 2
    assert "dpo.beta" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_refuses_to_overwrite_a_finished_run(tmp_path, pairs_file):
    align(method="sft", model="gpt", model_config=tiny_overrides("gpt"), data=_data(pairs_file), train=_train(),
          out=str(tmp_path / "r"), progress=False)
    with pytest.raises(ConfigError, match="already holds an alignment run"):
        align(method="sft", model="gpt", model_config=tiny_overrides("gpt"), data=_data(pairs_file), train=_train(),
              out=str(tmp_path / "r"), progress=False)


def test_debug_config_runs_through_the_cli(tmp_path):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / "configs" / "align-debug.yaml"
    rc = main(["align", "--config", str(cfg), "--train.steps", "2", "--data.limit", "24", "--progress", "false", "--out", str(tmp_path / "dbg")])
    assert rc == 0
    s = json.loads((tmp_path / "dbg" / "align_summary.json").read_text())
    assert s["method"] == "orpo" and s["pairs"]["train"] + s["pairs"]["val"] == 24
