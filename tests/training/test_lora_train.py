"""LoRA in ``rizz train`` / ``rizz align``: only adapters train, checkpoints hold only them, resume, DPO's base reference, reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rizzearch.cli import main
from rizzearch.errors import CheckpointError
from rizzearch.models.base import tiny_overrides
from rizzearch.testing import assert_close
from rizzearch.training.align import PreferenceDataConfig, align
from rizzearch.training.checkpoint import load_checkpoint
from rizzearch.training.loop import TrainConfig
from rizzearch.training.lora import LoraConfig, lora_layers


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(4)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _align(tmp, f, method="orpo", steps=2, lora=LoraConfig(r=4, alpha=8.0), **kw):
    data = PreferenceDataConfig(source=str(f), tokenizer="byte", max_length=48, val_fraction=0.25)
    train = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, log_every=1, ckpt_every=1, keep_checkpoints=5)
    return align(method=method, model="gpt", model_config=tiny_overrides("gpt"), data=data, train=train, lora=lora,
                 out=str(tmp), progress=False, **kw)


def _weights(run):
    return load_file(str(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


@pytest.mark.parametrize("method", ["orpo", "dpo", "sft", "sft+dpo"])
def test_every_align_method_trains_and_checkpoints_only_the_adapters(tmp_path, pairs_file, method):
    kw = {"sft_steps": 1} if method == "sft+dpo" else {}
    s = _align(tmp_path / "run", pairs_file, method=method, **kw)
    assert s["method"] == method
    w = _weights(tmp_path / "run")
    assert w and all(".lora_A." in k or ".lora_B." in k for k in w), sorted(w)[:3]
    assert any(t.abs().max() > 0 for k, t in w.items() if ".lora_B." in k)  # the adapters did train
    meta = json.loads((sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1] / "model.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["targets"]


def test_lora_checkpoint_is_small_and_resume_equals_uninterrupted(tmp_path, pairs_file):
    full = _align(tmp_path / "full", pairs_file, steps=3, lora=LoraConfig())
    _align(tmp_path / "lora", pairs_file, steps=3)
    size = lambda run: (sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "lora") < 0.5 * size(tmp_path / "full"), (size(tmp_path / "lora"), size(tmp_path / "full"))
    assert full["method"] == "orpo"
    _align(tmp_path / "part", pairs_file, steps=2)
    _align(tmp_path / "part", pairs_file, steps=3, resume=True)
    a, b = _weights(tmp_path / "lora"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], atol=0, rtol=0, name=k)


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path, pairs_file):
    """DPO's first-step loss is log 2 (policy == reference) and the reference pass counts the base's forwards."""
    s = _align(tmp_path / "dpo", pairs_file, method="dpo", steps=1)
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    assert abs(first["loss"] - 0.6931) < 1e-3
    assert s["stages"][0]["reference_forward_sequences"] == 2 * s["pairs"]["train"]


def test_lora_from_init_reloads_with_its_base(tmp_path, pairs_file):
    base = tmp_path / "base"
    _align(base, pairs_file, steps=1, lora=LoraConfig())
    run = tmp_path / "adapted"
    data = PreferenceDataConfig(source=str(pairs_file), max_length=48, val_fraction=0.25)
    train = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1)
    align(method="orpo", init=str(base), data=data, train=train, lora=LoraConfig(r=4, alpha=8.0), out=str(run), progress=False)
    model, tok, meta = load_checkpoint(run)
    assert lora_layers(model) and tok is not None and meta["lora"]["r"] == 4
    x = torch.randint(0, 200, (1, 9))
    base_model, _, _ = load_checkpoint(base)
    with torch.no_grad():
        assert (model(x)[0] - base_model(x)[0]).abs().max() > 0


def test_lora_checkpoint_without_a_base_is_a_clear_error(tmp_path, pairs_file):
    _align(tmp_path / "r", pairs_file, steps=1)
    with pytest.raises(CheckpointError, match="holds only the adapters and its run had no --init base"):
        load_checkpoint(tmp_path / "r")


def test_lora_on_rizz_train_cli(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "t"
    args = ["train", "--model", "gpt", "--model_config", json.dumps(tiny_overrides("gpt")), "--data.source", str(corpus),
            "--data.tokenizer", "byte", "--data.seq_len", "32", "--train.steps", "2", "--train.batch_size", "4", "--train.log_every", "1",
            "--lora.r", "4", "--lora.alpha", "8", "--lora.targets", "[attn.qkv, mlp.fc]", "--train.checkpointing", "blocks",
            "--progress", "false", "--out", str(out)]
    assert main(args) == 0
    w = _weights(out)
    assert {k.split(".lora_")[0] for k in w} == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc")}
    assert main(args[:-2] + ["--train.steps", "3", "--resume", "true", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3 and all("peak_mem_mb" in r for r in rows if "loss" in r)
