"""The DPO and SFT model/batch side (training.preference): reference log-probs precomputed once,
a few DPO steps, the missing-reference error, SFT as the chosen responses' cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch

from rizzearch.data.preference import PreferencePair, encode_pairs
from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import ShapeError
from rizzearch.models import build_model
from rizzearch.testing import assert_close
from rizzearch.training.preference import dpo_batch_loss, precompute_reference_logps, preference_forward, sft_batch_loss

T = torch.tensor


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    pairs = [
        PreferencePair((("user", "2+2?"),), "4", "5"),
        PreferencePair((("user", "Capital of France?"),), "Paris, of course.", "Rome"),
        PreferencePair((("user", "Hi"),), "Hello there!", "Go away"),
        PreferencePair((("user", "Colour of the sky?"),), "Blue.", "Green, mostly"),
        PreferencePair((("user", "3*3?"),), "9", "6"),
    ]
    ps = encode_pairs(pairs, tok, "chat", max_length=64)
    torch.manual_seed(0)
    model = build_model("gpt", n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size)
    return tok, ps, model


def test_reference_logps_precomputed_once_match_per_batch(setup):
    tok, ps, model = setup
    ref = precompute_reference_logps(model, ps.tensors, batch_size=2)
    fw = preference_forward(model, ps.tensors, nll_mode=None)
    assert_close(ref["ref_chosen_logps"], fw.chosen.sum.detach(), name="ref chosen")
    assert_close(ref["ref_rejected_logps"], fw.rejected.sum.detach(), name="ref rejected")
    loss, m = dpo_batch_loss(model, {**ps.tensors, **ref}, beta=0.1)
    assert_close(loss, T(math.log(2.0)), atol=1e-5, name="DPO loss of the reference itself")
    assert float(m["reward_margin"]) == pytest.approx(0.0, abs=1e-5)


def test_dpo_training_moves_rewards_apart(setup):
    tok, ps, _ = setup
    torch.manual_seed(2)
    model = build_model("gpt", n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size)
    batch = {**ps.tensors, **precompute_reference_logps(model, ps.tensors)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):
        loss, m = dpo_batch_loss(model, batch, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, m = dpo_batch_loss(model, batch, beta=0.5)
    assert float(loss.detach()) < math.log(2.0) and float(m["reward_margin"]) > 0


def test_dpo_without_reference_is_a_clear_error(setup):
    tok, ps, model = setup
    with pytest.raises(ShapeError, match="precompute_reference_logps"):
        dpo_batch_loss(model, ps.tensors)


def test_sft_is_response_cross_entropy_of_chosen_only(setup):
    tok, ps, model = setup
    calls = []
    handle = model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        loss, m = sft_batch_loss(model, ps.tensors)
    finally:
        handle.remove()
    assert sum(calls) == ps.tensors["chosen_input_ids"].shape[0]  # chosen rows only, each once (in length groups)
    fw = preference_forward(model, ps.tensors, nll_mode="response")
    assert_close(loss, fw.chosen_nll, name="sft loss")
    assert_close(loss, -fw.chosen.sum.sum() / fw.chosen.count.sum(), name="token-mean NLL")
