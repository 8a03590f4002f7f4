"""Synthetic tasks: parity and MQAR data are correct, deterministic and resumable; scoring works."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import ConfigError
from rizzearch.eval.tasks import (
    _gen,
    EVEN,
    IGNORE,
    ODD,
    PARITY_VOCAB,
    MQARData,
    MQARSpec,
    ParityData,
    mqar_accuracy,
    mqar_batch,
    mqar_scores,
    parity_accuracy,
    parity_batch,
)
from rizzearch.models import build_model


def test_parity_targets_are_the_running_parity():
    b = parity_batch(64, 3, 20, torch.Generator().manual_seed(0))
    x, y, lengths = b["input_ids"], b["targets"], b["lengths"]
    assert x.shape == y.shape == (64, 20) and int(x.max()) <= 1
    assert lengths.min() >= 3 and lengths.max() <= 20
    for row in range(64):
        n = int(lengths[row])
        ones = 0
        for t in range(20):
            if t < n:
                ones += int(x[row, t])
                assert int(y[row, t]) == (ODD if ones % 2 else EVEN)
            else:
                assert int(y[row, t]) == IGNORE


def test_parity_source_is_deterministic_and_resumable():
    a = ParityData(8, 2, 10, seed=3)
    first = [a.next_batch() for _ in range(3)]
    b = ParityData(8, 2, 10, seed=3)
    b.next_batch()
    state = b.state_dict()
    c = ParityData(8, 2, 10, seed=3)
    c.load_state_dict(state)
    for got, want in zip([c.next_batch(), c.next_batch()], first[1:]):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["targets"], want["targets"])
    other = ParityData(8, 2, 10, seed=4).next_batch()
    assert not torch.equal(other["input_ids"], first[0]["input_ids"])
    with pytest.raises(ConfigError, match="min_len"):
        ParityData(8, 10, 5)


def test_mqar_layout_and_answers():
    spec = MQARSpec(n_pairs=5, n_keys=12, n_values=7)
    b = mqar_batch(32, spec, torch.Generator().manual_seed(1))
    x, y = b["input_ids"], b["targets"]
    N = spec.n_pairs
    assert x.shape == (32, spec.seq_len) and int(x.max()) < spec.vocab_size
    for row in range(32):
        keys, vals = x[row, 0 : 2 * N : 2], x[row, 1 : 2 * N : 2]
        assert len(set(keys.tolist())) == N and int(keys.max()) < spec.n_keys and int(vals.min()) >= spec.n_keys
        binding = dict(zip(keys.tolist(), vals.tolist()))
        queries, answers = x[row, 2 * N :: 2], x[row, 2 * N + 1 :: 2]
        assert sorted(queries.tolist()) == sorted(keys.tolist())  # every key queried once
        for j, (q, a) in enumerate(zip(queries.tolist(), answers.tolist())):
            assert binding[q] == a == int(y[row, 2 * N + 2 * j])  # target at the query position
    assert int((y != IGNORE).sum()) == 32 * N
    with pytest.raises(ConfigError, match="n_pairs"):
        MQARSpec(n_pairs=20, n_keys=8)


def test_mqar_source_resumes():
    a = MQARData(4, MQARSpec(n_pairs=3, n_keys=8, n_values=8), seed=0)
    a.next_batch()
    want = a.next_batch()
    b = MQARData(4, MQARSpec(n_pairs=3, n_keys=8, n_values=8), seed=0)
    b.load_state_dict({"position": 1, "seed": 0})
    assert torch.equal(b.next_batch()["input_ids"], want["input_ids"])


class _Oracle(torch.nn.Module):
    """A 'model' that reads the answer off the input: perfect on parity and MQAR."""

    def __init__(self, task, spec=None):
        super().__init__()
        self.task, self.spec = task, spec

    def forward(self, tokens, state=None, attention_mask=None):
        B, T = tokens.shape
        if self.task == "parity":
            V = PARITY_VOCAB
            ans = EVEN + tokens.cumsum(1) % 2
        else:
            V, N = self.spec.vocab_size, self.spec.n_pairs
            ans = torch.zeros_like(tokens)
            for r in range(B):
                binding = dict(zip(tokens[r, 0 : 2 * N : 2].tolist(), tokens[r, 1 : 2 * N : 2].tolist()))
                ans[r] = torch.tensor([binding.get(t, 0) for t in tokens[r].tolist()])
        return torch.nn.functional.one_hot(ans, V).float(), None


def test_accuracy_functions_score_an_oracle_and_a_random_model():
    assert parity_accuracy(_Oracle("parity"), [5, 33], n_per_length=40) == {5: 1.0, 33: 1.0}
    spec = MQARSpec(n_pairs=4, n_keys=8, n_values=8)
    assert mqar_accuracy(_Oracle("mqar", spec), spec, n=40, batch_size=16) == 1.0
    torch.manual_seed(0)
    gpt = build_model("gpt", vocab_size=PARITY_VOCAB, n_layer=1, d_model=16, n_head=2)
    acc = parity_accuracy(gpt, [64], n_per_length=200)[64]
    assert 0.3 < acc < 0.7  # an untrained model is at chance
    gpt = build_model("gpt", vocab_size=spec.vocab_size, n_layer=1, d_model=16, n_head=2)
    assert mqar_accuracy(gpt, spec, n=64) < 0.5


class _HalfOracle(_Oracle):
    """Answers the queries of the first half of the value positions right, the rest with token 0."""

    def forward(self, tokens, state=None):
        probs, _ = super().forward(tokens, state)
        N = self.spec.n_pairs
        probs[:, 2 * N + 2 * (N // 2) :] = torch.nn.functional.one_hot(torch.tensor(0), probs.shape[-1]).float()
        return probs, None


def test_mqar_scores_are_per_sequence_and_seeds_give_disjoint_splits():
    spec = MQARSpec(n_pairs=4, n_keys=8, n_values=8)
    s = mqar_scores(_HalfOracle("mqar", spec), spec, n=40, batch_size=16)
    assert s.shape == (40,) and torch.allclose(s, torch.full((40,), 0.5))  # 2 of 4 queries right in every row
    assert mqar_accuracy(_HalfOracle("mqar", spec), spec, n=40) == pytest.approx(0.5)
    # the validation split (one seed) and the test split (another) hold different sequences
    val, test = (mqar_scores(_Oracle("mqar", spec), spec, n=8, seed=s) for s in (1, 2))
    assert torch.equal(val, test)  # an oracle is perfect on both
    first = lambda seed: mqar_batch(8, spec, _gen(seed, 10**6))["input_ids"]
    assert not torch.equal(first(1), first(2)) and torch.equal(first(1), first(1))
