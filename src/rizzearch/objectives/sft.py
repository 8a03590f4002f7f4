"""SFT: supervised fine-tuning on the chosen responses of preference data.

    L_SFT = -(1/|K|) sum_{(b, t) in K} log P(y_t | x, y_<t)      K = chosen response tokens of the batch

the token-mean negative log-likelihood with the prompt masked (ORPO paper Eq. 3; the first stage
of the SFT -> DPO pipeline). Pure: it takes the chosen responses' log-probs
(``rizzearch.objectives.preference.preference_logprobs``); ``rizzearch.training.preference`` runs
the model (chosen sequences only) and feeds it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rizzearch.errors import ShapeError
from rizzearch.objectives.lm import SequenceLogprobs


def sft_loss(chosen: SequenceLogprobs) -> tuple[Tensor, dict]:
    """L_SFT from the chosen responses' summed log-probs and token counts, each (B,).

    Metrics (detached): loss and nll (both L_SFT), chosen_logp (batch mean of the per-token mean
    log-prob), tokens (|K|).
    """
    if chosen.sum.dim() != 1 or chosen.count.shape != chosen.sum.shape:
        raise ShapeError(f"sft_loss: sum and count must both be (B,), got {tuple(chosen.sum.shape)} and {tuple(chosen.count.shape)}")
    n_tok = chosen.count.sum()
    nll = -chosen.sum.sum() / n_tok
    with torch.no_grad():
        metrics = {"loss": nll.detach(), "nll": nll.detach(), "chosen_logp": chosen.mean.mean(), "tokens": n_tok}
    return nll, metrics
