"""Mixed precision: recurrent states, stabilisers and ORPO log-odds stay fp32 under bf16/fp16 autocast."""

from __future__ import annotations

import json

import pytest
import torch

from rizzearch.data.preference import PreferencePair, encode_pairs
from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import ConfigError
from rizzearch.models import build_model
from rizzearch.models.base import tiny_overrides
from rizzearch.training.memory import autocast, grad_scaler
from rizzearch.training.preference import orpo_batch_loss

FP32_STATE = {"rwkv": ("num", "den", "max"), "xlstm": ("C", "n", "m", "c", "h")}


def _state_tensors(name, state):
    if name == "rwkv":
        return {k: t for k in FP32_STATE[name] for t in state[k]}.items()
    return [(k, t) for blk in state["blocks"] for k, t in blk.items() if k in FP32_STATE[name]]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(FP32_STATE))
def test_recurrent_states_stay_fp32_under_autocast(name, precision):
    model = build_model(name, **tiny_overrides(name))
    x = torch.randint(0, 256, (2, 20))
    with autocast(precision, "cpu"):
        logits, state = model(x)
        _, state = model(x[:, :3], state)  # carried across calls too
    assert logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # autocast did run
    pairs = list(_state_tensors(name, state))
    assert pairs
    for key, t in pairs:
        assert t.dtype == torch.float32, f"{name} state {key!r} is {t.dtype} under {precision}"


def test_orpo_log_odds_stay_fp32_under_bf16():
    tok = byte_tokenizer()
    pairs = [PreferencePair((("user", "2+2?"),), "4", "5"), PreferencePair((("user", "Hi"),), "Hello there!", "Go away")]
    batch = encode_pairs(pairs, tok, "chat", max_length=48).tensors
    torch.manual_seed(0)
    model = build_model("gpt", **tiny_overrides("gpt"), vocab_size=tok.vocab_size)
    loss32, m32 = orpo_batch_loss(model, batch)
    with autocast("bf16", "cpu"):
        loss16, m16 = orpo_batch_loss(model, batch)
    assert loss16.dtype == torch.float32
    for key in ("log_odds_ratio", "or_loss", "chosen_logp", "rejected_logp"):
        assert m16[key].dtype == torch.float32, key
        assert abs(float(m16[key]) - float(m32[key])) < 0.05 * max(1.0, abs(float(m32[key]))), key


def test_bad_precision_and_scaler():
    with pytest.raises(ConfigError, match=r"train\.precision: expected one of \['fp32', 'bf16', 'fp16'\], got 'fp8'"):
        autocast("fp8", "cpu")
    assert grad_scaler("bf16", "cpu") is None and grad_scaler("fp16", "cpu") is not None


# ----------------------------------------------------------------------------------------------
# In the training loop (--train.precision)


def _loop(tmp_path, precision, loss_fn, steps=3, **kw):
    from rizzearch.data.batches import RandomWindows
    from rizzearch.training.loop import TrainConfig, train

    torch.manual_seed(0)
    model = build_model("gpt", **tiny_overrides("gpt"))
    data = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1, precision=precision, **kw)
    return model, train(model, loss_fn, RandomWindows(data, 4, 16, seed=3), cfg, tmp_path, progress=False)


def test_bf16_training_runs_and_logs_memory(tmp_path):
    from rizzearch.training.losses import lm_loss

    _, res = _loop(tmp_path, "bf16", lm_loss)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert all(h["peak_mem_mb"] > 0 and h["tokens_per_s"] > 0 for h in res.history)


def test_fp16_overflowing_gradients_skip_the_step_and_are_logged(tmp_path):
    from rizzearch.training.losses import lm_loss

    calls = {"n": 0}

    def loss_fn(model, batch):
        loss, metrics = lm_loss(model, batch)
        calls["n"] += 1
        if calls["n"] == 1:  # same value, gradients so large that the scaled ones overflow
            w = next(model.parameters())
            blow = 1e35 * w.float().sum()
            loss = loss + (blow - blow.detach())
        return loss, metrics

    torch.manual_seed(0)
    before = build_model("gpt", **tiny_overrides("gpt")).state_dict()
    model, res = _loop(tmp_path, "fp16", loss_fn, steps=1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "skipped_step" in r]
    assert len(skipped) == 1 and skipped[0]["step"] == 1 and skipped[0]["loss_scale"] < 65536.0
    assert res.history[-1]["skipped_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    _, res2 = _loop(tmp_path / "again", "fp16", lm_loss, steps=2)
    assert res2.history[-1]["skipped_steps"] == 0


def test_fp16_forward_overflow_stops_without_a_checkpoint(tmp_path):
    from rizzearch.training.losses import lm_loss
    from rizzearch.training.loop import NonFiniteLossError

    def loss_fn(model, batch):
        loss, metrics = lm_loss(model, batch)
        return loss * float("inf"), metrics

    with pytest.raises(NonFiniteLossError, match="fp16 overflow in the forward: use train.precision bf16.*no checkpoint was written"):
        _loop(tmp_path, "fp16", loss_fn)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").glob("step_*"))
