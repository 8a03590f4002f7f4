"""Language-modelling objectives: next-token cross-entropy and masked sequence log-probs.

Pure functions over logits and targets returning ``(loss, metrics)``; ``metrics`` holds detached
Python floats (or 0-d tensors) for logging. Targets use ``ignore_index = -100`` for positions
that do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ShapeError

IGNORE_INDEX = -100


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, dict]:
    """Mean next-token cross-entropy over positions whose target is not ``ignore_index``.

    L = -(1/|K|) sum_{t in K} log softmax(z_t)[y_t],  K = {t : y_t != ignore_index}.
    logits: (B, T, V) (any float dtype; computed in fp32); targets: (B, T) long.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ShapeError(f"cross_entropy: logits (B, T, V) and targets (B, T) expected, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    n = (targets != ignore_index).sum()
    if int(n) == 0:
        raise ShapeError("cross_entropy: every target is ignored (no tokens to train on)")
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
    return loss, {"loss": loss.detach(), "tokens": n.detach()}


def lm_loss(model, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """Standard language-model loss for a batch {"input_ids", "targets"[, "attention_mask"]}."""
    logits, _ = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return cross_entropy(logits, batch["targets"])
