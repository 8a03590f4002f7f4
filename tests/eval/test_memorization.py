"""Memorization audit: metrics by hand, an oracle model that has 'memorized' counting sequences,
skips, bad input, and the `rizz memorization` command end to end."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from rizzearch.cli import main
from rizzearch.errors import ConfigError, DataError
from rizzearch.eval.memorization import (
    audit_memorization,
    continuation_metrics,
    longest_common_run,
    read_documents,
    roc_auc,
    rouge_l,
)
from rizzearch.models.base import CausalLM


def test_metrics_by_hand():
    assert longest_common_run([1, 2, 3, 4], [9, 2, 3, 4, 1]) == 3
    assert longest_common_run([1, 2], [3, 4]) == 0
    assert longest_common_run([], [1]) == 0
    assert longest_common_run([5, 5, 5], [5, 5]) == 2
    m = continuation_metrics([1, 2, 3, 9], [1, 2, 3, 4])
    assert m == {"exact": False, "token_match": 0.75, "longest_run": 3}
    assert continuation_metrics([7, 8], [7, 8])["exact"]
    # 4 pairs: 3 > 1, 3 > 2, 2 > 1 win; 2 == 2 ties
    assert roc_auc([3, 2], [1, 2]) == pytest.approx(3.5 / 4)
    assert roc_auc([0.0], [1.0]) == 0.0
    with pytest.raises(DataError):
        roc_auc([], [1.0])
    # LCS "the cat on mat" of 6 and 4 words: P = 1, R = 4/6, F = 0.8
    assert rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)


@dataclass(frozen=True)
class _Cfg:
    vocab_size: int = 50


class CountingOracle(CausalLM):
    """Always predicts token + 1 (mod V) with high confidence: it has 'memorized' counting."""

    def __init__(self, vocab_size: int = 50):
        super().__init__()
        self.config = _Cfg(vocab_size)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, tokens, state=None, attention_mask=None):
        nxt = (tokens + 1) % self.config.vocab_size
        logits = torch.full((*tokens.shape, self.config.vocab_size), -10.0) + self.dummy
        return logits.scatter(-1, nxt[..., None], 10.0), state

    def init_state(self, batch_size, device=None, dtype=None):
        return None


def _count(start: int, n: int, V: int = 50) -> list[int]:
    return [(start + i) % V for i in range(n)]


def test_oracle_audit_exact_numbers():
    model = CountingOracle()
    g = torch.Generator().manual_seed(0)
    train = [_count(s, 20) for s in (0, 7, 13, 31)]
    train[3][14] = 0 if train[3][14] else 1  # one wrong token in the continuation of doc 3 (index 14 = position 6 of N=8)
    train.append(_count(3, 11))  # too short for P + N = 16: skipped, counted
    held = [torch.randint(0, 50, (20,), generator=g).tolist() for _ in range(3)]
    rep = audit_memorization(model, train, heldout=held, prompt_tokens=8, new_tokens=8, num_beams=2, batch_size=3)
    rows = {r["id"]: r for r in rep.rows}
    assert rows["train-4"]["skipped"] and "11 tokens" in rows["train-4"]["skip_reason"]
    for i in range(3):
        r = rows[f"train-{i}"]
        assert r["greedy_exact"] and r["beam_exact"] and r["greedy_token_match"] == 1.0
        assert r["greedy_longest_run"] == 8 and r["greedy_rougeL"] == pytest.approx(1.0)
    r = rows["train-3"]
    assert not r["greedy_exact"] and r["greedy_token_match"] == 7 / 8 and r["greedy_longest_run"] == 6
    s = rep.summary
    assert s["skipped"] == {"train": 1, "heldout": 0}
    assert s["greedy"]["train"]["count"] == 4 and s["greedy"]["train"]["exact_match_rate"] == 0.75
    assert s["beam"]["train"]["exact_match_rate"] == 0.75
    assert s["greedy"]["heldout"]["exact_match_rate"] == 0.0
    # the oracle is near-certain on counting text and wrong on random text: perfect separation
    assert s["membership"]["loss_auc"] == 1.0 and s["membership"]["zlib_auc"] == 1.0
    assert s["membership"]["train_loss"] < s["membership"]["heldout_loss"]
    table = rep.table()
    assert "| greedy | train | 4 | 75.0% |" in table and "beam (width 2)" in table


def test_all_documents_too_short_is_an_error_not_a_number():
    with pytest.raises(DataError, match="every training document is shorter"):
        audit_memorization(CountingOracle(), [_count(0, 10)], prompt_tokens=8, new_tokens=8)


def test_bad_settings_and_foreign_tokens():
    with pytest.raises(ConfigError, match="prompt_tokens"):
        audit_memorization(CountingOracle(), [_count(0, 20)], prompt_tokens=0)
    with pytest.raises(DataError, match="token id 77 outside"):
        audit_memorization(CountingOracle(), [[1, 2, 77] + _count(0, 20)], prompt_tokens=4, new_tokens=4)


def test_read_documents_formats(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"id": "a", "text": "one"}\n\n{"title": "B", "text": "two"}\n')
    assert read_documents(j) == [("a", "one"), ("B", "two")]
    t = tmp_path / "d.txt"
    t.write_text("first doc\nline 2\n\n\nsecond\n")
    assert [d for _, d in read_documents(t)] == ["first doc\nline 2", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_documents(bad)
    with pytest.raises(DataError, match="not found"):
        read_documents(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from rizzearch.data.tokenizer import byte_tokenizer, tokenizer_fingerprint
    from rizzearch.models import build_model
    from rizzearch.training import checkpoint as ckpt_io

    run = tmp_path_factory.mktemp("mem") / "run"
    tok = byte_tokenizer()
    model = build_model("gpt", n_layer=1, n_head=2, d_model=32, vocab_size=tok.vocab_size)
    ckpt_io.save_checkpoint(run / "checkpoints", 1, model, ckpt_io.model_meta(model, tokenizer=tokenizer_fingerprint(tok)), None)
    tok.save(run / "tokenizer.json")
    docs = tmp_path_factory.getbasetemp() / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i}: " + "abcdefgh" * 4}) + "\n" for i in range(3)))
    docs_short = docs.with_name("short.jsonl")
    docs_short.write_text(docs.read_text() + json.dumps({"id": "tiny", "text": "hi"}) + "\n")
    held = docs.with_name("held.txt")
    held.write_text("Some held out text that is long enough.\n\nAnother held-out paragraph of text.\n")
    return run, docs, docs_short, held


def test_memorization_command_end_to_end(tiny_run, tmp_path, capsys):
    run, _, docs_short, held = tiny_run
    out = tmp_path / "audit"
    args = ["memorization", "--checkpoint", str(run), "--documents", str(docs_short), "--heldout", str(held),
            "--prompt_tokens", "8", "--new_tokens", "6", "--num_beams", "2", "--out", str(out), "--progress", "false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| greedy | train | 3 |" in printed and "zlib ratio" in printed
    rows = [json.loads(line) for line in (out / "memorization.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["d0", "d1", "d2", "tiny", "held-0", "held-1"]
    assert rows[3]["skipped"] and "fewer than prompt_tokens + new_tokens = 14" in rows[3]["skip_reason"]
    assert rows[0]["prompt_text"] == "Document" and rows[0]["reference_text"] == " 0: ab"  # byte tokens 0..7, 8..13
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"]["train"] == 1 and summary["membership"] is not None
    assert (out / "summary.md").read_text().startswith("# Memorization audit")


def test_memorization_command_rejects_a_foreign_tokenizer(tiny_run, tmp_path, capsys):
    from rizzearch.data.tokenizer import train_bpe

    run, docs, _, _ = tiny_run
    other = train_bpe(["some other text to learn merges from " * 50], 300)
    path = other.save(tmp_path / "other.json")
    assert main(["memorization", "--checkpoint", str(run), "--documents", str(docs), "--tokenizer", str(path),
                 "--out", str(tmp_path / "x"), "--progress", "false"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert main(["memorization", "--checkpoint", str(tmp_path / "nothing"), "--documents", str(docs), "--progress", "false"]) == 2
    assert "not found" in capsys.readouterr().err
