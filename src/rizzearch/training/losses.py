"""The training loop's language-model ``loss_fn(model, batch) -> (loss, metrics)``s.

Each one runs the model and hands its logits to a pure objective of ``rizzearch.objectives``.
A batch is ``{"input_ids", "targets"[, "attention_mask"]}`` (targets ``-100`` where nothing counts).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor

from rizzearch.objectives.goldfish import GoldfishConfig, goldfish_cross_entropy
from rizzearch.objectives.lm import cross_entropy


def lm_loss(model, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """Standard language-model loss: next-token cross-entropy over every target (``objectives.lm.cross_entropy``)."""
    logits, _ = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
    return cross_entropy(logits, batch["targets"])


class GoldfishLoss:
    """``loss_fn(model, batch)``: the goldfish loss (Hans et al. 2024, Eq. 2), in train and eval mode alike.

    It does not look at ``model.training``: to compare validation losses of goldfish and standard
    runs, evaluate with the all-token loss explicitly (``lm_loss``, e.g. the loop's
    ``eval_loss_fn``), which is what ``rizz train`` and the goldfish study do.
    For the ``random`` strategy each call draws a fresh mask seed from the global torch RNG (which
    the loop seeds and checkpoints, so resumed runs are bit-identical); with a fixed seed every
    batch would get the same positional pattern, which is just a static mask.

    Args:
        config: the goldfish settings.
        protected_ids: token ids added to ``config.protected_ids`` (never dropped; special tokens).
    """

    def __init__(self, config: GoldfishConfig, protected_ids: Sequence[int] = ()):
        extra = tuple(int(i) for i in protected_ids if int(i) not in config.protected_ids)
        self.config = replace(config, protected_ids=tuple(config.protected_ids) + extra)

    def __call__(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        logits, _ = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
        seed = None
        if self.config.strategy == "random" and self.config.enabled:
            seed = self.config.seed * 1_000_003 + int(torch.randint(0, 2**31 - 1, (1,)))
        return goldfish_cross_entropy(logits, batch["targets"], self.config, seed=seed)

    def __repr__(self) -> str:
        return f"GoldfishLoss({self.config})"
