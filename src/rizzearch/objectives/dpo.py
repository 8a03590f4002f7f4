r"""DPO: direct preference optimisation against a frozen reference model (Rafailov et al. 2023).

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )   (Eq. 7)

with log pi(y|x) the *summed* token log-prob of the response. The implicit rewards are
r = beta * (log pi - log ref) (Sec. 5). The reference model never changes, so its log-probs are
computed once over the whole data set (``precompute_reference_logps``) and carried in the batch as
``ref_chosen_logps`` / ``ref_rejected_logps``: training then needs one forward per step (chosen
and rejected concatenated) and no second model in memory, and the reference costs one no-grad pass
over the data instead of one per step.

This module is pure; the model-calling side (the reference pass, the loop's ``loss_fn``) is
``rizzearch.training.preference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ConfigError, ShapeError

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def check_beta(beta: float) -> float:
    beta = float(beta)
    if not math.isfinite(beta) or beta <= 0:
        raise ConfigError(f"dpo.beta must be a finite number > 0, got {beta}")
    return beta


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, dict]:
    """DPO loss (Eq. 7) from summed response log-probs, all (B,).

    Metrics (detached batch means): reward_chosen / reward_rejected = beta (log pi - log ref),
    reward_margin, reward_accuracy (fraction with reward_chosen > reward_rejected),
    chosen_logp_sum / rejected_logp_sum (policy).
    """
    beta = check_beta(beta)
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ShapeError(f"dpo_loss: all four log-prob tensors must share one (B,) shape, got {sorted(shapes)}")
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float().detach(), ref_rejected_logps.float().detach()
    h = (pc - rc) - (pr - rr)  # (B,)
    loss = -F.logsigmoid(beta * h).mean()
    with torch.no_grad():
        r_c, r_r = beta * (pc - rc), beta * (pr - rr)
        metrics = {
            "loss": loss.detach(),
            "reward_chosen": r_c.mean(),
            "reward_rejected": r_r.mean(),
            "reward_margin": (r_c - r_r).mean(),
            "reward_accuracy": (r_c > r_r).float().mean(),
            "chosen_logp_sum": pc.mean(),
            "rejected_logp_sum": pr.mean(),
        }
    return loss, metrics


@dataclass(frozen=True)
class DPOConfig:
    """DPO settings.

    Args:
        beta: inverse temperature of the implicit reward (deviation from the reference); 0.1 is common.
        chunk_size: positions per chunk of the chunked log-softmax (None: automatic).
        ref_batch_size: rows per forward when precomputing the reference log-probs.
    """

    beta: float = 0.1
    chunk_size: int | None = None
    ref_batch_size: int = 32

    def __post_init__(self):
        check_beta(self.beta)
        if self.ref_batch_size < 1:
            raise ConfigError(f"dpo.ref_batch_size must be >= 1, got {self.ref_batch_size}")
