"""The ORPO model/batch side (training.preference): one forward for chosen + rejected, NLL modes,
padding, chunked vs full log-softmax, in-place backward, saturation, a few training steps, bad batches."""

from __future__ import annotations

import pytest
import torch

from rizzearch.data.preference import PreferencePair, encode_pairs
from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import ConfigError, ShapeError
from rizzearch.models import build_model
from rizzearch.objectives.lm import IGNORE_INDEX, cross_entropy
from rizzearch.objectives.orpo import orpo_loss
from rizzearch.testing import assert_close
from rizzearch.training.preference import orpo_batch_loss, preference_forward, score_pairs


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


@pytest.mark.parametrize("distributed", [False, True])
def test_helper_matches_rowwise_spec_and_calls_model_once_under_ddp(setup, distributed, monkeypatch):
    """Every row scores as it would alone. Under torch.distributed (DDP/FSDP: one forward per
    backward) the model is called once; otherwise once per length group (at most 4)."""
    tok, ps, model = setup
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: distributed)
    counting = _Counting(model)
    fw = preference_forward(counting, ps.tensors, nll_mode="response", chunk_size=5)
    assert counting.calls == 1 if distributed else 1 <= counting.calls <= 4
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
    assert len(modes) >= 2 and not any(modes) and model.training  # 3 pairs in batches of 2 (length groups within)
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
