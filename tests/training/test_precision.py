"""Mixed precision: recurrent states, stabilisers and ORPO log-odds stay fp32 under bf16/fp16 autocast."""

from __future__ import annotations

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
