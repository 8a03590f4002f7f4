r"""DPO: direct preference optimisation against a frozen reference model (Rafailov et al. 2023).

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )   (Eq. 7)

with log pi(y|x) the *summed* token log-prob of the response. The implicit rewards are
r = beta * (log pi - log ref) (Sec. 5). The reference model never changes, so its log-probs are
computed once over the whole data set (``precompute_reference_logps``) and carried in the batch as
``ref_chosen_logps`` / ``ref_rejected_logps``: training then needs one forward per step (chosen
and rejected concatenated) and no second model in memory, and the reference costs one no-grad pass
over the data instead of one per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.objectives.orpo import preference_forward, score_pairs

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _check_beta(beta: float) -> float:
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
    beta = _check_beta(beta)
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
        _check_beta(self.beta)
        if self.ref_batch_size < 1:
            raise ConfigError(f"dpo.ref_batch_size must be >= 1, got {self.ref_batch_size}")


@torch.no_grad()
def precompute_reference_logps(model, tensors: dict[str, Tensor], batch_size: int = 32, chunk_size: int | None = None, device=None) -> dict[str, Tensor]:
    """Summed response log-probs of the frozen reference for every pair -> {"ref_chosen_logps", "ref_rejected_logps"} (N,).

    One no-grad pass over the data in eval mode (dropout off); the result is meant to be merged
    into the training tensors so each batch carries its reference values.
    """
    out: dict[str, list[Tensor]] = {k: [] for k in REF_KEYS}
    for fw in score_pairs(model, tensors, batch_size, chunk_size=chunk_size, device=device):
        out["ref_chosen_logps"].append(fw.chosen.sum.float().cpu())
        out["ref_rejected_logps"].append(fw.rejected.sum.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def dpo_batch_loss(model, batch: dict[str, Tensor], beta: float = 0.1, chunk_size: int | None = None) -> tuple[Tensor, dict]:
    """``loss_fn(model, batch)``: one concatenated forward, reference log-probs from the batch."""
    missing = [k for k in REF_KEYS if k not in batch]
    if missing:
        raise ShapeError(f"dpo: batch lacks {missing}; run precompute_reference_logps on the data first")
    fw = preference_forward(model, batch, nll_mode=None, chunk_size=chunk_size)
    loss, metrics = dpo_loss(fw.chosen.sum, fw.rejected.sum, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta)
    with torch.no_grad():
        margin = fw.chosen.mean - fw.rejected.mean
        metrics.update({
            "chosen_logp": fw.chosen.mean.mean(),
            "rejected_logp": fw.rejected.mean.mean(),
            "logp_margin": margin.mean(),
            "pref_accuracy": (margin > 0).float().mean(),
        })
    return loss, metrics


def make_dpo_loss(config: DPOConfig = DPOConfig()):
    """The loop's ``loss_fn`` for a DPOConfig (the data must carry the reference log-probs)."""
    return partial(dpo_batch_loss, beta=config.beta, chunk_size=config.chunk_size)
