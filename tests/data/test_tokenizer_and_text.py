"""Tokenizers, token shards and batch sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rizzearch import corpora
from rizzearch.data.batches import EvalWindows, RandomWindows, RowBatches, split_batch
from rizzearch.data.text import TextDataset, prepare_text, split_text
from rizzearch.data.tokenizer import Tokenizer, byte_tokenizer, make_tokenizer, tokenizer_fingerprint, train_bpe
from rizzearch.errors import ConfigError, DataError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20 + "Unicode: naïve café ✓\n"


def test_make_tokenizer_from_the_setting(tmp_path):
    def never():
        raise AssertionError("texts are read only for bpe")

    byte = make_tokenizer("byte", 300, never)
    assert byte.vocab_size == 258
    path = byte.save(tmp_path / "tok.json")
    assert tokenizer_fingerprint(make_tokenizer(str(path), 300, never)) == tokenizer_fingerprint(byte)
    assert make_tokenizer("bpe", 300, lambda: [TEXT]).vocab_size > 258
    with pytest.raises(ConfigError, match="data.tokenizer"):
        make_tokenizer("wordpiece", 300, never)


def test_byte_tokenizer_round_trip_and_ids():
    tok = byte_tokenizer()
    assert tok.vocab_size == 258 and tok.eot_id == 0 and tok.pad_id == 1
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert ids[:2] == [ord("F") + 2, ord("i") + 2]
    assert len(ids) == len(TEXT.encode("utf-8"))


def test_bpe_trains_round_trips_and_saves(tmp_path):
    tok = train_bpe([TEXT], vocab_size=300)
    assert 258 < tok.vocab_size <= 300
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges compress
    path = tok.save(tmp_path)
    again = Tokenizer.load(path)
    assert again.encode(TEXT) == ids
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(byte_tokenizer()) != tokenizer_fingerprint(tok)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        train_bpe([TEXT], vocab_size=100)
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "none.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        Tokenizer.load(bad)


def test_split_text_at_line_boundary():
    train, val = split_text("aaaa\nbbbb\ncccc\ndddd\n", 0.25)
    assert train + val == "aaaa\nbbbb\ncccc\ndddd\n"
    assert train.endswith("\n") and val == "dddd\n"


def test_prepare_text_writes_shards_and_meta(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    tok = byte_tokenizer()
    ds = prepare_text(src, tmp_path / "data", tok, val_fraction=0.1)
    total = sum(len(s) for s in ds.train) + sum(len(s) for s in ds.val)
    assert total == len(TEXT.encode())
    assert ds.bytes_per_token == pytest.approx(1.0)
    assert ds.train[0].dtype == np.uint16
    again = TextDataset.open(tmp_path / "data")
    assert np.array_equal(np.asarray(again.val[0]), np.asarray(ds.val[0]))
    assert tok.decode(list(ds.val[0])) == split_text(TEXT, 0.1)[1]


def test_prepare_text_bad_sources(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(DataError, match="not found"):
        prepare_text(tmp_path / "missing.txt", tmp_path / "d", tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        prepare_text(empty, tmp_path / "d", tok)
    with pytest.raises(DataError, match="meta.json: not found"):
        TextDataset.open(tmp_path / "nothing")


def test_truncated_shard_is_detected(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(TEXT)
    prepare_text(src, tmp_path / "d", byte_tokenizer())
    shard = tmp_path / "d" / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        TextDataset.open(tmp_path / "d")


def test_bundled_corpora_are_listed_and_present():
    names = corpora.list()
    assert {"tinyshakespeare", "wikitext-2-valid", "scotus", "us-constitution", "hh-rlhf-harmless-test"} <= set(names)
    for n in names:
        assert corpora.path(n).exists()
    assert "CC BY-SA" in corpora.describe("wikitext-2-valid")
    assert (corpora.ROOT / "SOURCES.md").is_file()
    with pytest.raises(DataError, match="unknown corpus"):
        corpora.path("nope")


def test_random_windows_deterministic_and_resumable():
    toks = torch.arange(1000)
    a = RandomWindows(toks, 4, 16, seed=7)
    batches = [a.next_batch() for _ in range(5)]
    assert torch.equal(batches[0]["targets"][:, :-1], batches[0]["input_ids"][:, 1:])
    b = RandomWindows(toks, 4, 16, seed=7)
    b.load_state_dict({"seed": 7, "position": 3})
    assert torch.equal(b.next_batch()["input_ids"], batches[3]["input_ids"])
    c = RandomWindows(toks, 4, 16, seed=8)
    assert not torch.equal(c.next_batch()["input_ids"], batches[0]["input_ids"])
    with pytest.raises(DataError, match="seed"):
        c.load_state_dict(a.state_dict())


def test_random_windows_over_shards_never_cross():
    shards = [torch.full((50,), 1), torch.full((30,), 2), torch.full((5,), 3)]  # last is too short
    src = RandomWindows(shards, 64, 10, seed=0)
    x = src.next_batch()["input_ids"]
    assert ((x == 1).all(1) | (x == 2).all(1)).all()
    with pytest.raises(DataError, match="too short"):
        RandomWindows([torch.arange(5)], 2, 10)


def test_row_batches_cover_every_row_each_epoch():
    rows = {"x": torch.arange(10)[:, None]}
    src = RowBatches(rows, 5, seed=1)
    epoch1 = torch.cat([src.next_batch()["x"] for _ in range(2)])
    epoch2 = torch.cat([src.next_batch()["x"] for _ in range(2)])
    assert sorted(epoch1.flatten().tolist()) == list(range(10))
    assert sorted(epoch2.flatten().tolist()) == list(range(10))
    assert epoch1.flatten().tolist() != epoch2.flatten().tolist()
    again = RowBatches(rows, 5, seed=1)
    again.load_state_dict({"seed": 1, "position": 10, "rows": 10})
    assert torch.equal(torch.cat([again.next_batch()["x"] for _ in range(2)]), epoch2)


def test_eval_windows_and_split_batch():
    ev = EvalWindows(torch.arange(100), 3, 9, max_batches=2)
    bs = list(ev.batches())
    assert len(bs) == 2 and bs[0]["input_ids"].shape == (3, 9)
    assert bs[0]["input_ids"][1, 0].item() == 9
    parts = split_batch(bs[0], 3)
    assert len(parts) == 3 and parts[2]["input_ids"].shape == (1, 9)
    with pytest.raises(DataError):
        split_batch(bs[0], 2)


@pytest.mark.parametrize("make", [
    lambda t: RandomWindows(t, 4, 0),
    lambda t: RandomWindows(t, 0, 8),
    lambda t: EvalWindows(t, 4, 0),
    lambda t: EvalWindows(t, 0, 8),
    lambda t: RowBatches({"x": t[:10]}, 0),
])
def test_batch_sources_refuse_empty_batches_and_windows(make):
    with pytest.raises(DataError, match="(batch_size|seq_len) must be >= 1"):
        make(torch.arange(100))
