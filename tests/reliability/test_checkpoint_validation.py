"""Issue 12: checkpoints that must not load silently (NaN/Inf weights; a latest.json that is a
list, or points outside the run folder) and partial ``.tmp-step_*`` folders left by a kill."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rizzearch.cli import main
from rizzearch.errors import CheckpointError
from rizzearch.models.base import tiny_overrides
from rizzearch.training.checkpoint import load_checkpoint, resolve_checkpoint
from rizzearch.training.loop import TrainConfig
from rizzearch.training.recipes import DataConfig
from rizzearch.training.recipes import train as train_recipe

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(300))
CFG = TrainConfig(steps=2, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, seed=0, ckpt_every=1, keep_checkpoints=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    (d / "corpus.txt").write_text(CORPUS)
    train_recipe(model="gpt", model_config=tiny_overrides("gpt"), data=DataConfig(source=str(d / "corpus.txt"), tokenizer="byte", seq_len=16,
                 eval_batches=1), train=CFG, out=str(d / "run"), progress=False)
    return d


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(run, trained, capsys, value):
    from safetensors.torch import load_file, save_file

    f = run / "checkpoints" / "step_00000002" / "model.safetensors"
    weights = load_file(str(f))
    name = sorted(weights)[0]
    weights[name].view(-1)[3] = value
    save_file(weights, str(f))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 1 NaN/Inf"):
        load_checkpoint(run)
    rc = main(["eval", "--checkpoint", str(run), "--source", str(trained / "corpus.txt")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and name in err


@pytest.mark.parametrize("latest,message", [
    ('["step_00000002"]', "expected a JSON object"),
    ('{"name": 2}', "expected a JSON object with a string field"),
    ('{"name": "../../other/checkpoints/step_00000002"}', "must be a checkpoint folder of this run"),
    ('{"name": "/tmp/elsewhere/step_00000002"}', "must be a checkpoint folder of this run"),
])
def test_latest_json_must_name_a_checkpoint_of_this_run(run, tmp_path, latest, message):
    other = tmp_path / "other"
    shutil.copytree(run, other)  # a real checkpoint that ../ would reach
    (run / "checkpoints" / "latest.json").write_text(latest)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(run)


def test_partial_checkpoint_of_a_killed_run_is_cleaned_on_resume(run, trained):
    partial = run / "checkpoints" / ".tmp-step_00000003-99999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    train_recipe(model="gpt", model_config=tiny_overrides("gpt"), data=DataConfig(source=str(trained / "corpus.txt"), tokenizer="byte",
                 seq_len=16, eval_batches=1), train=TrainConfig(**{**CFG.__dict__, "steps": 3}), out=str(run), resume=True, progress=False)
    assert not partial.exists()
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["name"] == "step_00000003"


def test_partial_checkpoint_is_cleaned_on_a_new_start(tmp_path, trained):
    run = tmp_path / "fresh"
    (run / "checkpoints" / ".tmp-step_00000001-4242").mkdir(parents=True)
    train_recipe(model="gpt", model_config=tiny_overrides("gpt"), data=DataConfig(source=str(trained / "corpus.txt"), tokenizer="byte",
                 seq_len=16, eval_batches=1), train=CFG, out=str(run), progress=False)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert torch.load(run / "checkpoints" / "step_00000002" / "train_state.pt", weights_only=True)["step"] == 2
