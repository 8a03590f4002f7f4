"""Issue 12 item 1: the same config and seed give the same model, for every command that builds or
trains one (train, align) and every model family. Before the fix the model was initialised before
anything was seeded, so two runs in one process (or two processes) started from different weights."""

from __future__ import annotations

import json

import pytest
import torch

from rizzearch.models.base import tiny_overrides
from rizzearch.training.align import PreferenceDataConfig, align
from rizzearch.training.checkpoint import load_checkpoint
from rizzearch.training.loop import TrainConfig
from rizzearch.training.recipes import DataConfig
from rizzearch.training.recipes import train as train_recipe

MODELS = ["gpt", "xlstm", "rwkv"]
CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(300))


def _weights(run):
    model, _, _ = load_checkpoint(run)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "peak_mem_mb")} for r in rows]


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: weights differ between two runs of the same config"
    assert _metrics(a) == _metrics(b)


@pytest.mark.parametrize("model", MODELS)
def test_train_twice_same_weights_and_metrics(tmp_path, model):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    data = DataConfig(source=str(corpus), tokenizer="byte", seq_len=16, eval_batches=1)
    cfg = TrainConfig(steps=2, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, seed=0)
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(1000 + i)  # whatever state the caller left the RNGs in must not matter
        train_recipe(model=model, model_config=tiny_overrides(model), data=data, train=cfg, out=str(tmp_path / name), progress=False)
    _assert_same_run(tmp_path / "a", tmp_path / "b")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("model", MODELS)
def test_align_twice_same_weights_and_metrics(tmp_path, pairs_file, model):
    data = PreferenceDataConfig(source=str(pairs_file), tokenizer="byte", max_length=48, val_fraction=0.25)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, seed=0)
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(1000 + i)
        align(method="orpo", model=model, model_config=tiny_overrides(model), data=data, train=cfg, out=str(tmp_path / name), progress=False)
    _assert_same_run(tmp_path / "a", tmp_path / "b")
