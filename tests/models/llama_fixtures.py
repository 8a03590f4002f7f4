"""A tiny Llama shared by the Llama test modules: seeded, its parameters moved off their initial
values (zero biases, unit norms) so every weight matters."""

from __future__ import annotations

import torch

from rizzearch.models import build_model
from rizzearch.models.base import tiny_overrides

V = 61


def make(**kw):
    torch.manual_seed(0)
    m = build_model("llama", **{**tiny_overrides("llama"), "vocab_size": V, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m
