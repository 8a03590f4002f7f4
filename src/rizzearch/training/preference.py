"""Preference training: run the model over preference batches and feed the pure objectives.

``preference_forward`` stacks the chosen and rejected sequences of a batch into ONE forward (so
DDP sees one call) and scores them: by default from the final hidden states at the scored
positions only (``training.losses.model_token_logprobs``, no [2B, L, V] logits), then
``objectives.preference.preference_from_token_logprobs`` (the same numbers as
``objectives.preference.preference_logprobs`` on the logits); the loop's
``loss_fn``s below pass the result to ``objectives.orpo.orpo_loss``, ``objectives.dpo.dpo_loss``
and ``objectives.sft.sft_loss``. ``score_pairs`` scores a whole preference set without gradients
(DPO's reference log-probs, held-out preference accuracy).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from torch import Tensor

from rizzearch.data.preference import PairEvalBatches, validate_batch
from rizzearch.errors import ShapeError
from rizzearch.models.base import eval_mode
from rizzearch.objectives.dpo import REF_KEYS, DPOConfig, check_beta, dpo_loss
from rizzearch.objectives.orpo import ORPOConfig, check_lam, orpo_loss
from rizzearch.objectives.preference import (
    DEFAULT_NLL_MODE,
    PreferenceForward,
    check_nll_mode,
    preference_from_token_logprobs,
    preference_logprobs,
    preference_targets,
    stack_sides,
)
from rizzearch.objectives.sft import sft_loss
from rizzearch.training.losses import model_token_logprobs


def preference_forward(
    model,
    batch: dict[str, Tensor],
    *,
    nll_mode: str | None = DEFAULT_NLL_MODE,
    sides: tuple[str, ...] = ("chosen", "rejected"),
    chunk_size: int | None = None,
    chunked: bool = True,
    inplace_backward: bool | None = None,
    from_hidden: bool = True,
) -> PreferenceForward:
    """Run chosen and rejected through ONE forward and score the responses.

    ``batch`` holds the six tensors of ``rizzearch.data.preference`` (right-padded). The two sides
    are stacked to (2B, L) after trimming shared trailing padding. Right padding needs no
    attention mask in a causal model: padded positions come after every real one and are never
    scored. ``nll_mode`` None skips the NLL; ``sides=("chosen",)`` forwards only the chosen
    sequences (SFT; ``rejected`` is then None). ``inplace_backward`` lets the backward pass write
    the logits gradient into the logits buffer (``token_logprobs``), saving one [2B, L, V] tensor;
    None (the default) does so whenever it is safe (a plain linear head: ``inplace_backward_is_safe``).
    ``from_hidden`` (the default, with ``chunked``) computes the log-probs from the final hidden
    states at the scored positions only (``training.losses.model_token_logprobs``): the (S*B, L, V)
    logits are never built; False forwards to the logits and scores them (the same numbers).
    """
    check_nll_mode(nll_mode)
    validate_batch(batch)
    ids, resp, att = stack_sides(batch, sides)  # (S*B, L) each
    B, has_rejected = batch["chosen_input_ids"].shape[0], "rejected" in sides
    if not (chunked and from_hidden):
        logits, _ = model(ids)  # (S*B, L, V)
        return preference_logprobs(logits, ids, resp, att, B, nll_mode=nll_mode, has_rejected=has_rejected,
                                   chunk_size=chunk_size, chunked=chunked, inplace_backward=inplace_backward)
    resp_t, full_t, union = preference_targets(ids, resp, att, B, nll_mode)  # (S*B, L) each
    lp = model_token_logprobs(model, ids, union, chunk_size=chunk_size, inplace_backward=inplace_backward)  # (S*B, L)
    return preference_from_token_logprobs(lp, resp_t, full_t, B, nll_mode=nll_mode, has_rejected=has_rejected)


@torch.no_grad()
def score_pairs(model, tensors: dict[str, Tensor], batch_size: int = 32, *, chunk_size: int | None = None,
                device=None) -> Iterator[PreferenceForward]:
    """``preference_forward`` (no NLL) over fixed, in-order batches of a preference set's tensors.

    Eval mode (dropout off) and no grad while the batches are scored; the model's mode is restored
    once the iteration ends. Used for DPO's reference log-probs and the held-out preference metrics.
    """
    with eval_mode(model):
        for batch in PairEvalBatches(tensors, batch_size).batches():
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            yield preference_forward(model, batch, nll_mode=None, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# ORPO


def orpo_batch_loss(
    model,
    batch: dict[str, Tensor],
    lam: float = 0.1,
    nll_mode: str = DEFAULT_NLL_MODE,
    chunk_size: int | None = None,
    inplace_backward: bool | None = None,
) -> tuple[Tensor, dict]:
    """``loss_fn(model, batch)`` for the training loop: one forward, then ``orpo_loss``."""
    check_lam(lam)
    fw = preference_forward(model, batch, nll_mode=nll_mode, chunk_size=chunk_size, inplace_backward=inplace_backward)
    loss, metrics = orpo_loss(fw.chosen.mean, fw.rejected.mean, fw.chosen_nll, lam)
    metrics["tokens"] = fw.nll_tokens.detach()
    return loss, metrics


def make_orpo_loss(config: ORPOConfig = ORPOConfig()):
    """The loop's ``loss_fn`` for an ORPOConfig."""
    return partial(orpo_batch_loss, lam=config.lam, nll_mode=config.nll_mode, chunk_size=config.chunk_size,
                   inplace_backward=config.inplace_backward)


# ----------------------------------------------------------------------------------------------
# SFT


def sft_batch_loss(model, batch: dict[str, Tensor], chunk_size: int | None = None) -> tuple[Tensor, dict]:
    """``loss_fn(model, batch)``: NLL of the chosen responses of a preference batch (only they are forwarded)."""
    fw = preference_forward(model, batch, nll_mode=None, sides=("chosen",), chunk_size=chunk_size)
    return sft_loss(fw.chosen)


def make_sft_loss(chunk_size: int | None = None):
    """The loop's ``loss_fn`` for SFT on preference data."""
    return partial(sft_batch_loss, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# DPO


@torch.no_grad()
def precompute_reference_logps(model, tensors: dict[str, Tensor], batch_size: int = 32, chunk_size: int | None = None,
                               device=None) -> dict[str, Tensor]:
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
    check_beta(beta)
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
