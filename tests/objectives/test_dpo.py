"""DPO and SFT objectives: hand-computed values and properties. The model/batch side (reference
log-probs precomputed once, SFT over the chosen rows) is tested in tests/training/test_preference_dpo.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.objectives.dpo import DPOConfig, dpo_loss
from rizzearch.objectives.sft import sft_loss
from rizzearch.testing import assert_close

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


def test_hand_computed_sft():
    from rizzearch.objectives.lm import SequenceLogprobs

    # two responses: 2 tokens summing to log-prob -3, and 1 token of log-prob -1: L = (3 + 1) / 3
    chosen = SequenceLogprobs(T([-3.0, -1.0]), T([-1.5, -1.0]), T([2, 1]))
    loss, m = sft_loss(chosen)
    assert_close(loss, T(4.0 / 3.0), name="sft loss")
    assert_close(m["chosen_logp"], T(-1.25), name="mean per-token log-prob")
    assert int(m["tokens"]) == 3 and float(m["nll"]) == float(loss)
    with pytest.raises(ShapeError):
        sft_loss(SequenceLogprobs(T([-3.0]), T([-1.5]), T([2, 1])))
