"""ORPO loss: hand-computed values, log1mexp, the corrected gradient analysis, stability as P -> 1,
properties (hypothesis), and the model/batch helper (one forward, NLL modes)."""

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
from rizzearch.objectives.lm import IGNORE_INDEX, cross_entropy
from rizzearch.objectives.orpo import (
    LOGP_MAX,
    ORPOConfig,
    log1mexp,
    log_odds_ratio,
    orpo_loss,
)
from rizzearch.testing import assert_close
from rizzearch.training.preference import orpo_batch_loss, preference_forward, score_pairs

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


# ----------------------------------------------------------------------------------------------
# The helper over a model and a batch


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    pairs = [
        PreferencePair((("user", "2+2?"),), "4", "5"),
        PreferencePair((("user", "Capital of France?"),), "Paris, of course.", "Rome"),
        PreferencePair((("user", "Hi"),), "Hello there!", "Go away"),
    ]
    ps = encode_pairs(pairs, tok, "chat", max_length=64)
    torch.manual_seed(0)
    model = build_model("gpt", n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size)
    return tok, ps, model


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, tokens, state=None, attention_mask=None):
        self.calls += 1
        return self.inner(tokens, state, attention_mask=attention_mask)


def _unpadded_side(model, batch, side, i):
    """Score one row alone, no padding, no concatenation (the spec for the helper)."""
    att = batch[f"{side}_attention_mask"][i]
    ids = batch[f"{side}_input_ids"][i][att][None]
    resp = batch[f"{side}_response_mask"][i][att][None]
    full = att[att][None]
    logits, _ = model(ids)
    tgt_r = torch.full_like(ids, IGNORE_INDEX)
    tgt_r[:, :-1] = torch.where(resp[:, 1:], ids[:, 1:], IGNORE_INDEX)
    tgt_f = torch.full_like(ids, IGNORE_INDEX)
    tgt_f[:, :-1] = torch.where(full[:, 1:], ids[:, 1:], IGNORE_INDEX)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt_r.clamp_min(0)[..., None])[..., 0]
    n = (tgt_r != IGNORE_INDEX).sum()
    return (lp * (tgt_r != IGNORE_INDEX)).sum() / n, logits, tgt_r, tgt_f


def test_helper_matches_rowwise_spec_and_calls_model_once(setup):
    tok, ps, model = setup
    counting = _Counting(model)
    fw = preference_forward(counting, ps.tensors, nll_mode="response", chunk_size=5)
    assert counting.calls == 1
    for side, got in (("chosen", fw.chosen), ("rejected", fw.rejected)):
        for i in range(3):
            want, *_ = _unpadded_side(model, ps.tensors, side, i)
            assert_close(got.mean[i], want, name=f"{side}[{i}] mean logp")


def test_score_pairs_scores_in_eval_mode_by_batch_and_restores_the_mode(setup):
    tok, ps, model = setup
    modes = []
    handle = model.register_forward_hook(lambda mod, args, out: modes.append(mod.training))
    model.train()
    try:
        fws = list(score_pairs(model, ps.tensors, batch_size=2))
    finally:
        handle.remove()
    assert modes == [False, False] and model.training  # 3 pairs in batches of 2
    full = preference_forward(model, ps.tensors, nll_mode=None)
    for side in ("chosen", "rejected"):
        got = torch.cat([getattr(f, side).mean for f in fws])
        assert_close(got, getattr(full, side).mean.detach(), name=f"{side} by batches")


def test_nll_modes(setup):
    tok, ps, model = setup
    # response mode == cross-entropy over chosen response tokens; prompt+response == over every real token after the first
    logits, tr, tf = [], [], []
    for i in range(3):
        _, lg, t_r, t_f = _unpadded_side(model, ps.tensors, "chosen", i)
        logits.append(lg[0]), tr.append(t_r[0]), tf.append(t_f[0])
    cat = lambda xs: torch.cat(xs)[None]  # noqa: E731
    want_r, _ = cross_entropy(cat(logits), cat(tr))
    want_f, _ = cross_entropy(cat(logits), cat(tf))
    fr = preference_forward(model, ps.tensors, nll_mode="response")
    ff = preference_forward(model, ps.tensors, nll_mode="prompt+response")
    assert_close(fr.chosen_nll, want_r, name="response NLL")
    assert_close(ff.chosen_nll, want_f, name="prompt+response NLL")
    assert int(ff.nll_tokens) == int(ps.tensors["chosen_attention_mask"].sum()) - 3
    # the log-probs do not depend on the NLL mode
    assert_close(fr.chosen.mean, ff.chosen.mean, name="chosen logps across modes")


def test_extra_padding_changes_nothing(setup):
    tok, ps, model = setup
    padded = {k: torch.cat([v, torch.full((v.shape[0], 7), tok.pad_id if "ids" in k else 0, dtype=v.dtype)], 1) for k, v in ps.tensors.items()}
    a, _ = orpo_batch_loss(model, ps.tensors, 0.2)
    b, _ = orpo_batch_loss(model, padded, 0.2)
    assert_close(a, b, name="loss with extra padding")


def test_chunked_and_full_helper_agree_with_grads(setup):
    tok, ps, model = setup
    fa = preference_forward(model, ps.tensors, nll_mode="prompt+response", chunk_size=3)
    la, _ = orpo_loss(fa.chosen.mean, fa.rejected.mean, fa.chosen_nll, 0.3)
    ga = torch.autograd.grad(la, list(model.parameters()))
    fb = preference_forward(model, ps.tensors, nll_mode="prompt+response", chunked=False)
    lb, _ = orpo_loss(fb.chosen.mean, fb.rejected.mean, fb.chosen_nll, 0.3)
    gb = torch.autograd.grad(lb, list(model.parameters()))
    assert_close(la, lb, name="loss")
    for i, (x, y) in enumerate(zip(ga, gb)):
        assert_close(x, y, atol=1e-6, rtol=1e-4, name=f"grad {i}")


def test_inplace_backward_same_gradients(setup):
    tok, ps, model = setup
    grads = []
    for inplace in (False, True):
        loss, _ = orpo_batch_loss(model, ps.tensors, 0.5, "prompt+response", chunk_size=4, inplace_backward=inplace)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(b, a, name=f"grad {i}")


def test_saturated_model_gives_finite_loss_and_gradients(setup):
    """P -> 1 in a real forward: a model that puts all its mass on the chosen tokens."""
    tok, ps, model = setup

    class Confident(torch.nn.Module):
        def __init__(self, inner, batch):
            super().__init__()
            self.inner, self.scale = inner, torch.nn.Parameter(torch.tensor(1.0))
            ids, resp = batch["chosen_input_ids"], batch["chosen_response_mask"]
            self.boost = torch.zeros(ids.shape[1], tok.vocab_size)
            # every position predicts the next chosen token of row 0 with an enormous margin
            self.boost[torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 1e4

        def forward(self, tokens, state=None, attention_mask=None):
            logits, st = self.inner(tokens, state, attention_mask=attention_mask)
            return self.scale * logits + self.boost[: tokens.shape[1]], st

    row0 = {k: v[:1] for k, v in ps.tensors.items()}
    m = Confident(model, row0)
    fw = preference_forward(m, row0)
    assert float(fw.chosen.mean[0].detach()) == 0.0  # P(chosen) = 1 exactly in fp32: log(1 - P) = -inf without the cap
    loss, _ = orpo_loss(fw.chosen.mean, fw.rejected.mean, fw.chosen_nll, lam=1.0)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_orpo_training_raises_the_margin(setup):
    """A few optimizer steps on one batch raise the chosen-vs-rejected margin and lower the loss."""
    tok, ps, _ = setup
    torch.manual_seed(1)
    model = build_model("gpt", n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss, m = orpo_batch_loss(model, ps.tensors, lam=1.0)
        first = first or (float(loss.detach()), float(m["log_odds_ratio"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, m = orpo_batch_loss(model, ps.tensors, lam=1.0)
    assert float(loss.detach()) < first[0] and float(m["log_odds_ratio"]) > first[1]
    assert float(m["pref_accuracy"]) == 1.0


def test_bad_batches_are_rejected(setup):
    tok, ps, model = setup
    b = {k: v.clone() for k, v in ps.tensors.items()}
    b["rejected_response_mask"][1] = False
    with pytest.raises(ShapeError, match="rejected_response_mask row 1 is all False"):
        orpo_batch_loss(model, b, 0.1)
    b = {k: v.clone() for k, v in ps.tensors.items()}
    b["chosen_response_mask"][0, 0] = True
    with pytest.raises(ShapeError, match="empty prompt"):
        orpo_batch_loss(model, b, 0.1)
    with pytest.raises(ShapeError, match="missing tensor"):
        orpo_batch_loss(model, {"chosen_input_ids": b["chosen_input_ids"]}, 0.1)
    with pytest.raises(ConfigError, match="lam"):
        orpo_batch_loss(model, ps.tensors, -1.0)
