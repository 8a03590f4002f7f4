"""`rizz train --objective goldfish`: the goldfish loss wired into the training recipe and the CLI."""

from __future__ import annotations

import json

import pytest

from rizzearch import corpora
from rizzearch.cli import main

TINY = ["--model_config.n_layer", "1", "--model_config.d_model", "32", "--model_config.n_head", "2",
        "--data.tokenizer", "byte", "--data.seq_len", "32", "--data.eval_batches", "2",
        "--train.steps", "2", "--train.batch_size", "4", "--train.log_every", "1", "--progress", "false"]


@pytest.fixture
def tiny(tmp_path):
    """TINY on a 20 kB slice of tinyshakespeare, so each run tokenizes little."""
    path = tmp_path / "small.txt"
    path.write_text(corpora.path("tinyshakespeare").read_text()[:20_000])
    return [*TINY, "--data.source", str(path)]


def test_train_with_goldfish_objective(tmp_path, tiny):
    run = tmp_path / "gf"
    args = ["train", "--out", str(run), *tiny, "--objective", "goldfish",
            "--goldfish.k", "4", "--goldfish.h", "13", "--goldfish.strategy", "hash"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        # the same batch's kept-token, all-token and dropped-token losses are all logged
        assert {"all_token_loss", "dropped_token_loss", "dropped_fraction"} <= set(r)
        # T=32, h=13: 19 positions can be dropped, about 1 in 4 of them is
        assert 0.05 < r["dropped_fraction"] < 0.3
    evals = [r for r in rows if "val_loss" in r]
    assert evals and "val_dropped_fraction" not in evals[-1]  # validation is the standard loss
    meta = json.loads(next((run / "checkpoints").glob("step_*/model.json")).read_text())
    assert meta["objective"] == "goldfish"
    assert meta["goldfish"] == {"k": 4, "h": 13, "strategy": "hash", "seed": 0, "protected_ids": []}
    assert "strategy: hash" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("flag, value, message", [("--goldfish.k", "1", "goldfish.k"), ("--goldfish.h", "0", "goldfish.h")])
def test_bad_goldfish_settings_fail_before_training(tmp_path, tiny, capsys, flag, value, message):
    run = tmp_path / "bad"
    assert main(["train", "--out", str(run), *tiny, "--objective", "goldfish", flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_unknown_objective_is_named(tmp_path, tiny, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), *tiny, "--objective", "goldfsh"]) == 2
    err = capsys.readouterr().err
    assert "goldfsh" in err and "goldfish" in err
