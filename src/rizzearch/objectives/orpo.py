r"""ORPO: odds-ratio preference optimisation without a reference model (Hong et al. 2024).

Notation (paper Sec. 3). For a prompt x and a response y of m tokens the length-normalised
likelihood is  P(y|x) = exp( (1/m) sum_t log P(y_t | x, y_<t) )  (Eq. 2), so
``logP = mean token log-prob`` of the response. The odds are  odds(y|x) = P / (1 - P)  (Eq. 4) and

    z     = log( odds(y_w|x) / odds(y_l|x) )
          = (logP_w - logP_l) - (log(1 - P_w) - log(1 - P_l))                  (Eq. 5, log form)
    L_OR  = -log sigmoid(z)                                                     (Eq. 7)
    L     = L_SFT + lambda * L_OR                                               (Eq. 6)

with L_SFT the negative log-likelihood of the chosen response. ``log(1 - P) = log1mexp(logP)`` is
computed stably: ``log(-expm1(a))`` for a > -ln 2 and ``log1p(-exp(a))`` below (Maechler 2012).

NLL modes (``nll_mode``):

- ``"response"`` (default; the paper's intent): token-mean NLL over the chosen *response* tokens,
  the usual SFT loss with the prompt masked.
- ``"prompt+response"``: token-mean NLL over every real token of the chosen sequence after the
  first (prompt included), which is what TRL's ``ORPOTrainer`` computes. Use it for parity.

Gradient (paper App. A, corrected). With  l = logP,  dz/dl_w = 1 + P_w/(1 - P_w) = 1/(1 - P_w)
and  dz/dl_l = -1/(1 - P_l),  and  dL_OR/dz = -sigmoid(-z) = -(1 + odds_w/odds_l)^{-1}:

    grad L_OR = -sigmoid(-z) * [ grad logP_w / (1 - P_w)  -  grad logP_l / (1 - P_l) ]

The paper reads the 1/(1 - P) weight as amplifying the update when P is *low*. It does the
opposite: 1/(1 - P) is about 1 for small P and grows without bound as P -> 1. So the penalty on a
rejected response is strongest when that response is already *likely* (the useful part), and the
chosen side's weight blows up as P_w -> 1, where the loss is already saturated: at P = 1 exactly
log(1 - P) = -inf and the gradient is inf/NaN.

Stability. log(1 - P) is evaluated at  min(logP, log(P_MAX))  with  P_MAX = 1 - 1e-4, so the weight
1/(1 - P) is capped at 1e4 and stays finite (the rest of z keeps its exact gradient; only the
log(1 - P) term is flat beyond the cap). Mean token log-probs are only accurate to ~1e-6 in fp32,
so nothing measurable is lost. TRL applies no cap; the two agree exactly whenever P <= P_MAX.

This module is pure (tensors in, ``(loss, metrics)`` out). The log-probs come from
``rizzearch.objectives.preference.preference_logprobs``; the model-calling side (one forward over a
preference batch, the training loop's ``loss_fn``) is ``rizzearch.training.preference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.objectives.preference import DEFAULT_NLL_MODE, NLL_MODES, check_nll_mode

# TRL's ORPOTrainer.get_batch_loss_metrics name -> our orpo_loss metric (TRL's beta is our lambda).
# Beware TRL's names: its "log_odds_ratio" is mean log sigmoid(z) = -L_OR, and its "log_odds_chosen"
# is the log odds ratio z itself. Its reward accuracy (lambda * logP_w > lambda * logP_l) equals our
# pref_accuracy for lambda > 0 (at lambda = 0 every TRL reward ties and its accuracy is 0).
TRL_METRICS = {
    "nll_loss": "nll",
    "log_odds_ratio": "neg_or_loss",
    "log_odds_chosen": "log_odds_ratio",
    "logps/chosen": "chosen_logp",
    "logps/rejected": "rejected_logp",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "pref_accuracy",
}

__all__ = ["DEFAULT_NLL_MODE", "LOGP_MAX", "NLL_MODES", "ORPOConfig", "P_MAX", "TRL_METRICS", "check_lam", "log1mexp",
           "log_odds_ratio", "orpo_loss"]
P_MAX = 1.0 - 1e-4
LOGP_MAX = math.log1p(-1e-4)  # log(P_MAX)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate everywhere (-inf at a = 0)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def check_lam(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"orpo.lam (lambda, the odds-ratio weight) must be a finite number >= 0, got {lam}")
    return lam


def log_odds_ratio(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """z = log odds(y_w) - log odds(y_l) from mean token log-probs (B,), with log(1 - P) capped at P_MAX."""
    lw, ll = chosen_logps.float(), rejected_logps.float()
    return (lw - ll) - (log1mexp(lw.clamp(max=LOGP_MAX)) - log1mexp(ll.clamp(max=LOGP_MAX)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor, lam: float) -> tuple[Tensor, dict]:
    """ORPO loss  L = NLL + lambda * mean_b(-log sigmoid(z_b))  (Hong et al. 2024, Eqs. 4-7).

    Args:
        chosen_logps: (B,) mean token log-prob of each chosen response (log P(y_w|x), Eq. 2).
        rejected_logps: (B,) mean token log-prob of each rejected response.
        chosen_nll: scalar NLL of the chosen responses (L_SFT; see the module docstring's modes).
        lam: lambda >= 0, the weight of the odds-ratio term (TRL's ``beta``).

    Returns ``(loss, metrics)``; metrics (detached, batch means):
        nll: L_SFT.  or_loss: L_OR = -log sigmoid(z).  neg_or_loss: -L_OR = log sigmoid(z)
        (TRL's ``log_odds_ratio``).  log_odds_ratio: z (TRL's ``log_odds_chosen``).
        chosen_logp / rejected_logp: mean token log-probs (TRL's ``logps/chosen``/``logps/rejected``).
        logp_margin: chosen_logp - rejected_logp.  pref_accuracy: fraction with logP_w > logP_l.
        reward_chosen / reward_rejected / reward_margin: lambda * logP (TRL's ``rewards/*``).
    """
    lam = check_lam(lam)
    if chosen_logps.dim() != 1 or rejected_logps.shape != chosen_logps.shape:
        raise ShapeError(f"orpo_loss: chosen_logps and rejected_logps must both be (B,), got {tuple(chosen_logps.shape)} and {tuple(rejected_logps.shape)}")
    if chosen_nll.dim() != 0:
        raise ShapeError(f"orpo_loss: chosen_nll must be a scalar, got shape {tuple(chosen_nll.shape)}")
    lw, ll = chosen_logps.float(), rejected_logps.float()
    z = log_odds_ratio(lw, ll)  # (B,)
    log_sig = F.logsigmoid(z)  # (B,)  = -L_OR per pair
    or_loss = -log_sig.mean()
    loss = chosen_nll.float() + lam * or_loss
    with torch.no_grad():
        margin = lw - ll
        metrics = {
            "loss": loss.detach(),
            "nll": chosen_nll.detach().float(),
            "or_loss": or_loss.detach(),
            "neg_or_loss": log_sig.mean(),
            "log_odds_ratio": z.mean(),
            "chosen_logp": lw.mean(),
            "rejected_logp": ll.mean(),
            "logp_margin": margin.mean(),
            "pref_accuracy": (margin > 0).float().mean(),
            "reward_chosen": lam * lw.mean(),
            "reward_rejected": lam * ll.mean(),
            "reward_margin": lam * margin.mean(),
        }
    return loss, metrics


@dataclass(frozen=True)
class ORPOConfig:
    """ORPO settings.

    Args:
        lam: lambda, the weight of the odds-ratio term (paper: 0.1 for larger models, up to 1.0 studied; TRL's beta).
        nll_mode: "response" (NLL of the chosen response only; the paper's intent) or "prompt+response" (TRL's behaviour).
        chunk_size: positions per chunk of the chunked log-softmax (None: automatic, ~4M logits per chunk).
        inplace_backward: write the logits gradient into the logits buffer (saves one [2B, L, V] tensor). None
            (default): whenever it is safe, i.e. the logits come from a plain linear head (every registered model);
            True forces it (an autograd error when the logits are the saved output of their op, e.g. a bare tanh); False never.
    """

    lam: float = 0.1
    nll_mode: Literal["response", "prompt+response"] = DEFAULT_NLL_MODE
    chunk_size: int | None = None
    inplace_backward: bool | None = None

    def __post_init__(self):
        check_lam(self.lam)
        check_nll_mode(self.nll_mode)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"orpo.chunk_size must be >= 1, got {self.chunk_size}")
