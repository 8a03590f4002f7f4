"""DPO and SFT objectives: hand-computed values, reference log-probs precomputed once, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rizzearch.data.preference import PreferencePair, encode_pairs
from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import ConfigError, ShapeError
from rizzearch.models import build_model
from rizzearch.objectives.dpo import DPOConfig, dpo_loss
from rizzearch.objectives.sft import sft_loss
from rizzearch.testing import assert_close
from rizzearch.training.preference import dpo_batch_loss, precompute_reference_logps, preference_forward, sft_batch_loss

T = torch.tensor


def test_hand_computed_dpo():
    # h = (pi_w - ref_w) - (pi_l - ref_l) = (-1 + 1.5) - (-2 + 1.5) = 1; beta = 0.5
    loss, m = dpo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), beta=0.5)
    assert_close(loss, T(-math.log(1 / (1 + math.exp(-0.5)))), name="loss")
    assert_close(m["reward_chosen"], T(0.25), name="reward_chosen")
    assert_close(m["reward_rejected"], T(-0.25), name="reward_rejected")
    assert_close(m["reward_margin"], T(0.5), name="reward_margin")
    assert float(m["reward_accuracy"]) == 1.0


def test_policy_equal_to_reference_gives_log2_and_no_grad_to_reference():
    pc = T([-3.0, -1.0], requires_grad=True)
    pr = T([-2.0, -4.0], requires_grad=True)
    rc, rr = pc.detach().clone().requires_grad_(True), pr.detach().clone().requires_grad_(True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert_close(loss, T(math.log(2.0)), name="loss at policy == reference")
    g = torch.autograd.grad(loss, (pc, pr, rc, rr), allow_unused=True)
    assert_close(g[0], T([-0.025, -0.025]), name="d/d policy chosen")  # -beta * sigmoid(0) / B
    assert g[2] is None and g[3] is None  # the reference is a constant


@settings(max_examples=50, deadline=None, derandomize=True)
@given(a=st.floats(-50, 0), b=st.floats(-50, 0), pr=st.floats(-50, 0), beta=st.floats(0.01, 2.0))
def test_dpo_loss_falls_as_chosen_logprob_rises(a, b, pr, beta):
    lo, hi = min(a, b), max(a, b)
    if hi - lo < 1e-2:
        return
    ref = T([-10.0])
    l_lo, _ = dpo_loss(T([lo]), T([pr]), ref, ref, beta)
    l_hi, _ = dpo_loss(T([hi]), T([pr]), ref, ref, beta)
    assert float(l_hi) < float(l_lo)


def test_bad_beta_and_shapes():
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="beta"):
            dpo_loss(T([-1.0]), T([-2.0]), T([-1.0]), T([-2.0]), beta)
        with pytest.raises(ConfigError, match="beta"):
            DPOConfig(beta=beta)
    with pytest.raises(ShapeError):
        dpo_loss(T([-1.0, -2.0]), T([-2.0]), T([-1.0]), T([-2.0]), 0.1)


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
    assert calls == [ps.tensors["chosen_input_ids"].shape[0]]  # one forward, chosen rows only
    fw = preference_forward(model, ps.tensors, nll_mode="response")
    assert_close(loss, fw.chosen_nll, name="sft loss")
    assert_close(loss, -fw.chosen.sum.sum() / fw.chosen.count.sum(), name="token-mean NLL")
