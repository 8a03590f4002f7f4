"""ORPO loss: hand-computed values, log1mexp, the corrected gradient analysis, stability as P -> 1,
and properties (hypothesis). The model/batch side is tested in tests/training/test_preference_orpo.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.objectives.orpo import (
    LOGP_MAX,
    ORPOConfig,
    log1mexp,
    log_odds_ratio,
    orpo_loss,
)
from rizzearch.testing import assert_close

T = torch.tensor


def test_hand_computed_loss_and_metrics():
    # P_w = 1/2 (odds 1), P_l = 1/4 (odds 1/3): z = log 3, L_OR = -log sigmoid(log 3) = log(4/3)
    lw, ll = T([math.log(0.5)]), T([math.log(0.25)])
    loss, m = orpo_loss(lw, ll, T(2.0), lam=0.5)
    assert_close(loss, T(2.0 + 0.5 * math.log(4 / 3)), name="loss")
    assert_close(m["log_odds_ratio"], T(math.log(3.0)), name="z")
    assert_close(m["or_loss"], T(math.log(4 / 3)), name="L_OR")
    assert_close(m["neg_or_loss"], T(-math.log(4 / 3)), name="-L_OR")
    assert_close(m["nll"], T(2.0), name="nll")
    assert_close(m["reward_chosen"], T(0.5 * math.log(0.5)), name="reward_chosen")
    assert_close(m["reward_margin"], T(0.5 * math.log(2.0)), name="reward_margin")
    assert_close(m["logp_margin"], T(math.log(2.0)), name="logp margin")
    assert float(m["pref_accuracy"]) == 1.0


def test_batch_mean_and_accuracy():
    lw = T([math.log(0.5), math.log(0.1)])
    ll = T([math.log(0.25), math.log(0.2)])
    loss, m = orpo_loss(lw, ll, T(1.0), lam=1.0)
    z = [math.log((0.5 / 0.5) / (0.25 / 0.75)), math.log((0.1 / 0.9) / (0.2 / 0.8))]
    l_or = sum(-math.log(1 / (1 + math.exp(-v))) for v in z) / 2
    assert_close(loss, T(1.0 + l_or), name="loss")
    assert float(m["pref_accuracy"]) == 0.5


def test_log1mexp_accurate_over_the_range():
    a = -torch.logspace(-20, 2.5, 400).double()  # fp32-representable inputs, evaluated in fp64 below
    got = log1mexp(a.float()).double()
    # fp64 reference: each branch where its formula is exact (expm1 near 0, exp far from 0)
    ref = torch.where(a > -0.5, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    assert_close(got, ref, atol=1e-30, rtol=1e-6, name="log1mexp fp32 vs fp64")
    mid = a[(a > -5) & (a < -0.01)]
    assert_close(log1mexp(mid.float()).double(), torch.log(1 - torch.exp(mid)), rtol=1e-6, name="log1mexp vs naive (mid range)")
    # the naive fp32 form is -inf / inaccurate near 0; ours is finite and right
    tiny = T([-1e-7, -1e-9])
    assert torch.isinf(torch.log(1 - torch.exp(tiny[1:]))).all()
    assert_close(log1mexp(tiny), torch.log(-tiny), rtol=1e-6, name="log1mexp near 0")
    assert float(log1mexp(T([0.0]))) == -math.inf


def test_gradient_weight_grows_as_P_approaches_one():
    """Corrected App. A: dz/dlogP_w = 1/(1 - P_w), largest as P_w -> 1, about 1 when P_w is small."""
    probs = [0.01, 0.1, 0.5, 0.9, 0.99, 0.999]
    weights = []
    for p in probs:
        lw = T([math.log(p)], dtype=torch.float64, requires_grad=True)
        ll = T([math.log(0.3)], dtype=torch.float64, requires_grad=True)
        z = log_odds_ratio(lw, ll)
        gw, gl = torch.autograd.grad(z.sum(), (lw, ll))
        assert_close(gw, T([1 / (1 - p)], dtype=gw.dtype), rtol=1e-5, name=f"dz/dlogP_w at P={p}")
        assert_close(gl, T([-1 / (1 - 0.3)], dtype=gl.dtype), rtol=1e-5, name="dz/dlogP_l")
        weights.append(float(gw))
    assert all(a < b for a, b in zip(weights, weights[1:])), weights
    assert weights[0] < 1.02 and weights[-1] > 900


def test_full_gradient_formula_matches_autograd():
    """grad L_OR = -sigmoid(-z) [grad logP_w / (1-P_w) - grad logP_l / (1-P_l)] (mean over the batch)."""
    lw = T([-0.3, -2.0, -0.05], requires_grad=True)
    ll = T([-1.0, -0.7, -3.0], requires_grad=True)
    loss, _ = orpo_loss(lw, ll, T(0.0), lam=1.0)
    gw, gl = torch.autograd.grad(loss, (lw, ll))
    with torch.no_grad():
        z = log_odds_ratio(lw, ll)
        s = torch.sigmoid(-z)
        B = lw.shape[0]
        assert_close(gw, -s / (1 - lw.exp()) / B, name="dL/dlogP_w")
        assert_close(gl, s / (1 - ll.exp()) / B, name="dL/dlogP_l")


@pytest.mark.parametrize("logp", [0.0, -1e-12, -1e-7, -1e-5, LOGP_MAX])
def test_gradients_stay_finite_as_P_approaches_one(logp):
    for chosen_side in (True, False):
        lw = T([logp if chosen_side else -1.0], requires_grad=True)
        ll = T([-1.0 if chosen_side else logp], requires_grad=True)
        loss, _ = orpo_loss(lw, ll, T(0.5), lam=1.0)
        gw, gl = torch.autograd.grad(loss, (lw, ll))
        assert torch.isfinite(loss) and torch.isfinite(gw).all() and torch.isfinite(gl).all()
        # the weight is capped at 1 / (1 - P_MAX) = 1e4
        assert float(gw.abs().max()) < 1.01e4 and float(gl.abs().max()) < 1.01e4


def test_unclamped_formula_would_blow_up_at_P_one():
    """Why the cap exists: without it, log(1 - P) at P = 1 is -inf and the gradient is NaN."""
    lw = T([0.0], requires_grad=True)
    z = (lw - math.log(0.5)) - (log1mexp(lw) - log1mexp(T([math.log(0.5)])))
    (g,) = torch.autograd.grad(torch.nn.functional.logsigmoid(z).sum(), lw)
    assert not torch.isfinite(g).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    a=st.floats(-12.0, LOGP_MAX), b=st.floats(-12.0, LOGP_MAX), ll=st.floats(-12.0, -1e-3),
    lam=st.floats(0.01, 5.0),
)
def test_loss_falls_as_chosen_logprob_rises(a, b, ll, lam):
    lo, hi = min(a, b), max(a, b)
    if hi - lo < 1e-3:
        return
    l_lo, _ = orpo_loss(T([lo]), T([ll]), T(1.0), lam)
    l_hi, _ = orpo_loss(T([hi]), T([ll]), T(1.0), lam)
    assert float(l_hi) < float(l_lo)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(a=st.floats(-12.0, LOGP_MAX), b=st.floats(-12.0, LOGP_MAX), lw=st.floats(-12.0, -1e-3))
def test_loss_rises_with_rejected_logprob_and_z_is_antisymmetric(a, b, lw):
    lo, hi = min(a, b), max(a, b)
    if hi - lo < 1e-3:
        return
    l_lo, _ = orpo_loss(T([lw]), T([lo]), T(0.0), 1.0)
    l_hi, _ = orpo_loss(T([lw]), T([hi]), T(0.0), 1.0)
    assert float(l_hi) > float(l_lo)
    assert_close(log_odds_ratio(T([lw]), T([a])), -log_odds_ratio(T([a]), T([lw])), atol=1e-5, name="antisymmetry")


def test_bad_lambda_and_shapes():
    for lam in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="lam"):
            orpo_loss(T([-1.0]), T([-2.0]), T(1.0), lam)
        with pytest.raises(ConfigError, match="lam"):
            ORPOConfig(lam=lam)
    with pytest.raises(ConfigError, match="nll_mode"):
        ORPOConfig(nll_mode="prompt")
    with pytest.raises(ShapeError):
        orpo_loss(T([-1.0, -2.0]), T([-2.0]), T(1.0), 0.1)
    with pytest.raises(ShapeError):
        orpo_loss(T([-1.0]), T([-2.0]), T([1.0]), 0.1)
