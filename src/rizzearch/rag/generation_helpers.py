"""Torch helpers of ``rag.generators.PretrainedGenerator``: the last-position head of a prefill and the
torch thread count while generating (torch is imported on first use, as in ``rag.generators``)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache


@contextmanager
def last_position_head(model):
    """During a prefill, let the model's ``lm_head`` (when it has one) project only the last position: greedy
    decoding reads nothing else, and the full (B, T, vocab) logits of a batch of long prompts cost gigabytes
    (8 x 900 x 49152 floats for SmolLM2) and a fifth of the prefill's multiply-adds."""
    import torch.nn as nn

    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module):
        yield
        return
    model.lm_head = _last_only_class()(head)
    try:
        yield
    finally:
        model.lm_head = head


@lru_cache(maxsize=1)
def _last_only_class():
    """A module applying ``head`` to the last position only (defined on first use: torch is imported lazily here)."""
    import torch.nn as nn

    class LastOnly(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, h):  # (B, T, C) -> (B, 1, V)
            return self.head(h[:, -1:])

    return LastOnly


def get_threads() -> int:
    import torch

    return torch.get_num_threads()


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
