"""generate(): filtering, greedy, sampling and beam search on a model with known probabilities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.models.base import CausalLM, _filter_logits, generate


class BigramLM(CausalLM):
    """logits[t] depend only on token[t]: a fixed transition table (state = last token)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.log())
        self.config = type("C", (), {"vocab_size": table.shape[0]})()

    def init_state(self, batch_size, device=None, dtype=None):
        return {"last": torch.zeros(batch_size, dtype=torch.long)}

    def forward(self, tokens, state=None, attention_mask=None):
        return self.table[tokens], {"last": tokens[:, -1]}


def test_filter_top_k_and_top_p_by_hand():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    k2 = _filter_logits(logits, top_k=2, top_p=None)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    # top_p = 0.7: 0.5 < 0.7 so token 1 is needed; mass before token 2 is 0.8 >= 0.7 -> dropped
    p = _filter_logits(logits, top_k=None, top_p=0.7)
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    # the top token always survives
    assert torch.isfinite(_filter_logits(logits, None, 0.01)[0, 0])


def test_beam_search_finds_the_better_sequence():
    # from token 0: greedy picks 1 (0.6) but 1 -> anything is flat (1/4 each);
    # 2 (0.4) -> 3 with 0.97: P(0,2,3) = 0.388 > P(0,1,x) = 0.15
    t = torch.full((4, 4), 0.25)
    t[0] = torch.tensor([0.0, 0.6, 0.4, 0.0]) + 1e-9
    t[2] = torch.tensor([0.01, 0.01, 0.01, 0.97])
    m = BigramLM(t / t.sum(-1, keepdim=True))
    prompt = torch.tensor([[0]])
    assert generate(m, prompt, 2)[0, 0].item() == 1
    assert generate(m, prompt, 2, num_beams=2)[0].tolist() == [2, 3]


def test_eos_stops_rows():
    t = torch.full((3, 3), 1e-6)
    t[0, 2] = 1.0  # 0 -> eos(2)
    t[1, 1] = 1.0
    t[2, 0] = 1.0
    m = BigramLM(t / t.sum(-1, keepdim=True))
    out = generate(m, torch.tensor([[0], [1]]), 4, eos_id=2)
    assert out[0].tolist() == [2, 2, 2, 2]
    assert out[1].tolist() == [1, 1, 1, 1]


def test_sampling_follows_the_distribution():
    t = torch.tensor([[0.7, 0.3], [0.7, 0.3]])
    m = BigramLM(t)
    g = torch.Generator().manual_seed(0)
    out = generate(m, torch.zeros(4000, 1, dtype=torch.long), 1, temperature=1.0, generator=g)
    assert abs(out.float().mean().item() - 0.3) < 0.03


def test_bad_arguments():
    m = BigramLM(torch.full((2, 2), 0.5))
    with pytest.raises(ShapeError):
        generate(m, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ConfigError):
        generate(m, torch.zeros(1, 1, dtype=torch.long), 2, num_beams=0)


def test_eval_mode_restores_the_previous_mode_also_on_error():
    from rizzearch.models.base import eval_mode

    m = torch.nn.Dropout(0.5)
    for start in (True, False):
        m.train(start)
        with eval_mode(m) as inner:
            assert inner is m and not m.training
        assert m.training is start
        with pytest.raises(RuntimeError), eval_mode(m):
            raise RuntimeError("boom")
        assert m.training is start


# -- issue 12: decoding settings refused up front, in one line -------------------------------------


@pytest.mark.parametrize("kw,message", [
    ({"temperature": -0.5}, "temperature must be"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"max_new_tokens": -1}, "max_new_tokens must be in"),
    ({"max_new_tokens": 10**9}, "max_new_tokens must be in"),
    ({"num_beams": 0}, "num_beams must be in"),
    ({"num_beams": 10**6}, "num_beams must be in"),
    ({"top_k": 0}, "top_k must be"),
    ({"top_p": 1.5}, "top_p must be"),
])
def test_generate_refuses_bad_settings(kw, message):
    from rizzearch.errors import ConfigError
    from rizzearch.models import build_model
    from rizzearch.models.base import generate, tiny_overrides

    model = build_model("gpt", **tiny_overrides("gpt"))
    with pytest.raises(ConfigError, match=message):
        generate(model, torch.zeros(1, 3, dtype=torch.long), **{"max_new_tokens": 4, **kw})


def test_generate_checks_memory_before_decoding(monkeypatch):
    from rizzearch.errors import ConfigError
    from rizzearch.models import base
    from rizzearch.models.base import generate, tiny_overrides

    model = base.build_model("gpt", **tiny_overrides("gpt"))
    monkeypatch.setattr(base, "_available_bytes", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ConfigError, match="GiB for decoding buffers"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), 200_000, num_beams=8)
    assert generate(model, torch.zeros(1, 3, dtype=torch.long), 4).shape == (1, 4)  # small requests still run


def test_generate_accepts_a_wrapper_without_prefill():
    """A wrapper with ``forward`` and ``step`` only (DDP, a user's module) generates through its forward's
    last position: the same tokens as the model's own ``prefill``."""
    torch.manual_seed(0)
    lm = BigramLM(torch.softmax(torch.randn(6, 6), -1))

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens, state=None, attention_mask=None):
            return self.inner(tokens, state, attention_mask=attention_mask)

        def step(self, token, state):
            return self.inner.step(token, state)

    prompt = torch.randint(0, 6, (2, 5))
    assert not hasattr(Wrapper(lm), "prefill")
    assert torch.equal(generate(Wrapper(lm), prompt, 7), generate(lm, prompt, 7))
