"""Issue 12: run folders tied to their inputs, and bad training/eval/generate input refused in one
line. Each test reproduces a reported case that was silent or a traceback before the fix."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

from rizzearch.cli import main
from rizzearch.data.text import prepare_text
from rizzearch.data.tokenizer import byte_tokenizer, tokenizer_fingerprint
from rizzearch.errors import CheckpointError, ConfigError, DataError
from rizzearch.models.base import tiny_overrides
from rizzearch.training.checkpoint import load_checkpoint
from rizzearch.training.loop import TrainConfig
from rizzearch.training.recipes import DataConfig
from rizzearch.training.recipes import train as train_recipe

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(300))
CFG = TrainConfig(steps=2, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, seed=0)


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(CORPUS)
    return f


def _data(corpus, **kw) -> DataConfig:
    return DataConfig(**{"source": str(corpus), "tokenizer": "byte", "seq_len": 16, "eval_batches": 1, **kw})


def _train(corpus, out, model="gpt", cfg=CFG, **kw):
    return train_recipe(model=model, model_config=kw.pop("model_config", tiny_overrides(model)), data=_data(corpus, **kw.pop("data", {})),
                        train=cfg, out=str(out), progress=False, **kw)


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


# -- item 2: stale tokenizer ---------------------------------------------------------------------


def test_failed_run_tokenizer_is_not_reused_by_a_new_run(tmp_path, corpus):
    run = tmp_path / "run"
    with pytest.raises(DataError, match="too short"):
        _train(corpus, run, data={"tokenizer": "bpe", "vocab_size": 300, "seq_len": 2_000_000})
    assert (run / "tokenizer.json").is_file()  # left behind by the failed attempt
    _train(corpus, run)  # byte tokenizer now
    model, tok, meta = load_checkpoint(run)
    assert tok.vocab_size == 258 and meta["tokenizer"] == tokenizer_fingerprint(byte_tokenizer())


# -- item 3: token cache keyed by content -------------------------------------------------------


def test_replaced_corpus_with_same_size_and_mtime_is_retokenized(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("aaaa bbbb\n" * 50)
    st = src.stat()
    tok = byte_tokenizer()
    first = prepare_text(src, tmp_path / "cache", tok, 0.0)
    assert set(first.train[0].tolist()) == set(tok.encode("ab \n"))
    src.write_text("cccc dddd\n" * 50)  # same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # and same mtime
    second = prepare_text(src, tmp_path / "cache", tok, 0.0)
    assert set(second.train[0].tolist()) == set(tok.encode("cd \n"))
    assert second.meta["content"]["bytes"] == st.st_size


# -- item 4: metrics of two attempts never mixed -------------------------------------------------


def test_rerun_after_a_run_without_checkpoint_starts_a_fresh_metrics_log(tmp_path, corpus):
    run = tmp_path / "run"
    _train(corpus, run)
    first = (run / "metrics.jsonl").read_text()
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    _train(corpus, run, cfg=replace(CFG, lr=1e-3))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2]  # each step once, from the new model only
    assert (run / "metrics.1.jsonl").read_text() == first  # the earlier attempt's log is kept aside, not lost


# -- item 6 and resume checks: validate before writing anything ----------------------------------


def test_refused_resume_leaves_config_yaml_untouched(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    common = ["train", "--model", "gpt", "--model_config.n_layer", "1", "--model_config.n_head", "2", "--data.source", str(corpus),
              "--data.tokenizer", "byte", "--data.seq_len", "16", "--data.eval_batches", "1", "--train.steps", "2",
              "--train.batch_size", "4", "--train.log_every", "1", "--progress", "false", "--out", str(run)]
    assert main(common + ["--model_config.d_model", "64"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    rc, err = _cli(capsys, *common, "--model_config.d_model", "32", "--resume", "true", "--train.steps", "4")
    assert rc == 2 and "d_model: checkpoint 64, now 32" in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before and not (run / "config.1.yaml").exists()


@pytest.mark.parametrize("change,field", [
    ({"cfg": replace(CFG, steps=4, batch_size=8)}, "train.batch_size: checkpoint 4, now 8"),
    ({"cfg": replace(CFG, steps=4, lr=1e-2)}, "train.lr: checkpoint 0.003, now 0.01"),
    ({"data": {"seq_len": 8}}, "data.seq_len: checkpoint 16, now 8"),
    ({"corpus": "other"}, "data.corpus_sha256"),
])
def test_resume_with_other_settings_is_refused_naming_them(tmp_path, corpus, change, field):
    run = tmp_path / "run"
    _train(corpus, run)
    before = sorted(p.name for p in run.rglob("*"))
    if change.get("corpus"):
        corpus.write_text(CORPUS.upper())
    with pytest.raises((ConfigError, CheckpointError), match=field.replace(".", r"\.")):
        _train(corpus, run, cfg=change.get("cfg", replace(CFG, steps=4)), data=change.get("data", {}), resume=True)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_resume_may_extend_steps(tmp_path, corpus):
    run = tmp_path / "run"
    _train(corpus, run)
    res = _train(corpus, run, cfg=replace(CFG, steps=3), resume=True)
    assert res.steps == 3


# -- unclear errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [0, -5])
def test_seq_len_zero_or_negative(tmp_path, corpus, capsys, seq_len):
    rc, err = _cli(capsys, "train", "--data.source", str(corpus), "--data.tokenizer", "byte", "--data.seq_len", str(seq_len),
                   "--train.steps", "1", "--progress", "false", "--out", str(tmp_path / "run"))
    assert rc == 2 and "data.seq_len must be >= 1" in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    (d / "corpus.txt").write_text(CORPUS)
    _train(d / "corpus.txt", d / "run")
    return d


@pytest.mark.parametrize("args,message", [
    (["--seq_len", "0"], "seq_len must be >= 1"),
    (["--batch_size", "0"], "batch_size must be >= 1"),
    (["--split", "train"], "split: expected 'val' or 'all'"),
])
def test_eval_bad_settings(trained, capsys, args, message):
    rc, err = _cli(capsys, "eval", "--checkpoint", str(trained / "run"), "--source", str(trained / "corpus.txt"), *args)
    assert rc == 2 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_cuda_device_without_cuda(trained, tmp_path, capsys, command):
    args = {"train": ["train", "--data.source", str(trained / "corpus.txt"), "--data.tokenizer", "byte", "--train.device", "cuda",
                      "--out", str(tmp_path / "r")],
            "eval": ["eval", "--checkpoint", str(trained / "run"), "--device", "cuda"],
            "generate": ["generate", "--checkpoint", str(trained / "run"), "--device", "cuda"]}[command]
    rc, err = _cli(capsys, *args)
    assert rc == 2 and "device: 'cuda' requested but" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,message", [(b"", "config file is empty"), (b"train:\n  steps: \xff\xfe\n", "not UTF-8"),
                                             (b"- 1\n- 2\n", "expected a mapping")])
def test_bad_yaml_config(tmp_path, capsys, content, message):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    rc, err = _cli(capsys, "train", "--config", str(f))
    assert rc == 2 and str(f) in err and message in err


@pytest.mark.parametrize("args,message", [(["--temperature", "-1"], "temperature must be"),
                                          (["--max_new_tokens", "1000000000"], "max_new_tokens must be in"),
                                          (["--num_beams", "100000"], "num_beams must be in")])
def test_generate_bad_settings(trained, capsys, args, message):
    rc, err = _cli(capsys, "generate", "--checkpoint", str(trained / "run"), *args)
    assert rc == 2 and message in err


def test_align_init_with_another_model_is_refused(tmp_path, corpus):
    from rizzearch.training.align import PreferenceDataConfig, align

    _train(corpus, tmp_path / "rwkv", model="rwkv")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(8)))
    with pytest.raises(ConfigError, match="'gpt' given, but --init .* is a 'rwkv' checkpoint"):
        align(init=str(tmp_path / "rwkv"), model="gpt", data=PreferenceDataConfig(source=str(pairs)), train=CFG,
              out=str(tmp_path / "a"), progress=False)


def test_memorization_names_a_binary_document(trained, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a fine document\n")
    (docs / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    rc, err = _cli(capsys, "memorization", "--checkpoint", str(trained / "run"), "--documents", str(docs), "--out", str(tmp_path / "m"))
    assert rc == 2 and str(docs / "b.txt") in err
