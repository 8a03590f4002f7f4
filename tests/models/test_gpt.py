"""GPT baseline: bad configs are named (the CausalLM contract runs in tests/models/test_contract.py)."""

from __future__ import annotations

import pytest

from rizzearch.errors import ConfigError
from rizzearch.models import build_model


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_head=0), "n_head must be >= 1"),  # checked before d_model % n_head divides by it
        (dict(d_model=0), "d_model must be >= 1"),
        (dict(d_model=64, n_head=3), "divisible by n_head"),
        (dict(d_model=60, n_head=4), "must be even for RoPE"),
        (dict(n_embd=64), "unknown key"),
    ],
)
def test_bad_config_is_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model("gpt", **overrides)
