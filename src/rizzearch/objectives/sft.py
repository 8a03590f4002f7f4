"""SFT: supervised fine-tuning on the chosen responses of preference data.

    L_SFT = -(1/|K|) sum_{(b, t) in K} log P(y_t | x, y_<t)      K = chosen response tokens of the batch

the token-mean negative log-likelihood with the prompt masked (ORPO paper Eq. 3; the first stage
of the SFT -> DPO pipeline). Only the chosen sequences are forwarded.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from rizzearch.objectives.orpo import preference_forward


def sft_loss(model, batch: dict[str, Tensor], chunk_size: int | None = None) -> tuple[Tensor, dict]:
    """``loss_fn(model, batch)``: NLL of the chosen responses of a preference batch."""
    fw = preference_forward(model, batch, nll_mode="response", sides=("chosen",), chunk_size=chunk_size)
    with torch.no_grad():
        metrics = {"loss": fw.chosen_nll.detach(), "nll": fw.chosen_nll.detach(), "chosen_logp": fw.chosen.mean.mean(), "tokens": fw.nll_tokens}
    return fw.chosen_nll, metrics


def make_sft_loss(chunk_size: int | None = None):
    return partial(sft_loss, chunk_size=chunk_size)
