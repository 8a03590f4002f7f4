"""Preference log-probs: from the logits of stacked chosen/rejected sequences to what ORPO, DPO and SFT need.

A preference batch holds, per side (chosen, rejected), right-padded ``input_ids``, an
``attention_mask`` (real tokens) and a ``response_mask`` (response tokens), all (B, L). The model
(called in ``rizzearch.training.preference``) scores both sides in one forward over the stacked
(S*B, L) ids; this module turns those logits into, per row,

    log P(y|x)         = sum_{t in K} log softmax(z_t)[y_{t+1}]      K = positions whose next token is a response token
    mean log P(y|x)    = log P(y|x) / |K|                           (ORPO's length-normalised likelihood, Hong et al. 2024 Eq. 2)

and the NLL of the chosen rows in one of two modes (``NLL_MODES``):

- ``"response"``: token-mean NLL over the chosen response tokens (the SFT loss with the prompt masked);
- ``"prompt+response"``: token-mean NLL over every real token after the first (TRL's ORPOTrainer).

Pure functions over tensors: no model, no data loading.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rizzearch.errors import ConfigError
from rizzearch.objectives.lm import IGNORE_INDEX, SequenceLogprobs, token_logprobs, token_logprobs_reference

NLL_MODES = ("response", "prompt+response")
DEFAULT_NLL_MODE = "response"


class PreferenceForward(NamedTuple):
    """What one concatenated forward over a preference batch yields.

    Args:
        chosen: log-probs of the chosen responses (sum, mean, count), each (B,).
        rejected: log-probs of the rejected responses (None when only the chosen side was scored).
        chosen_nll: token-mean NLL of the chosen sequences in the requested mode (None if not asked).
        nll_tokens: number of tokens in that NLL.
    """

    chosen: SequenceLogprobs
    rejected: SequenceLogprobs | None
    chosen_nll: Tensor | None
    nll_tokens: Tensor | None


def check_nll_mode(nll_mode: str | None, where: str = "orpo.nll_mode") -> None:
    """ConfigError unless ``nll_mode`` is None or one of ``NLL_MODES``."""
    if nll_mode is not None and nll_mode not in NLL_MODES:
        raise ConfigError(f"{where}: expected one of {list(NLL_MODES)}, got {nll_mode!r}")


def shift_targets(ids: Tensor, mask: Tensor) -> Tensor:
    """targets[:, t] = ids[:, t+1] where mask[:, t+1], else ignore; the last column is ignored. (N, L) -> (N, L)."""
    tgt = torch.full_like(ids, IGNORE_INDEX)
    tgt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    return tgt


def stack_sides(batch: dict[str, Tensor], sides: tuple[str, ...] = ("chosen", "rejected")) -> tuple[Tensor, Tensor, Tensor]:
    """Stack the sides of a right-padded preference batch, trimming shared trailing padding.

    Returns ``(ids, response_mask, attention_mask)``, each (S*B, L) with L the longest real row;
    rows are side-major (all chosen rows, then all rejected rows).
    """
    L = max(int(batch[f"{s}_attention_mask"].sum(1).max()) for s in sides)
    ids = torch.cat([batch[f"{s}_input_ids"][:, :L] for s in sides])  # (S*B, L)
    resp = torch.cat([batch[f"{s}_response_mask"][:, :L] for s in sides]).bool()
    att = torch.cat([batch[f"{s}_attention_mask"][:, :L] for s in sides]).bool()
    return ids, resp, att


def preference_logprobs(
    logits: Tensor,
    ids: Tensor,
    response_mask: Tensor,
    attention_mask: Tensor,
    n_chosen: int,
    *,
    nll_mode: str | None = DEFAULT_NLL_MODE,
    has_rejected: bool = True,
    chunk_size: int | None = None,
    chunked: bool = True,
    inplace_backward: bool | None = None,
) -> PreferenceForward:
    """Response log-probs of every row and the chosen NLL, from the logits of stacked sequences.

    Args:
        logits: (S*B, L, V) logits of ``ids`` (S = 1 or 2 sides, chosen rows first).
        ids, response_mask, attention_mask: (S*B, L), as from ``stack_sides``.
        n_chosen: B, the number of chosen rows.
        nll_mode: None (no NLL) or one of ``NLL_MODES``.
        has_rejected: rows B.. hold the rejected side (else ``rejected`` is None).
        chunk_size, inplace_backward: passed to ``token_logprobs`` (chunked log-softmax).
        chunked: False uses the full log-softmax reference ``token_logprobs_reference``.
    """
    check_nll_mode(nll_mode)
    resp_t, full_t, union = preference_targets(ids, response_mask, attention_mask, n_chosen, nll_mode)
    if chunked:
        lp = token_logprobs(logits, union, chunk_size=chunk_size, inplace_backward=inplace_backward)
    else:
        lp = token_logprobs_reference(logits, union)
    return preference_from_token_logprobs(lp, resp_t, full_t, n_chosen, nll_mode=nll_mode, has_rejected=has_rejected)


def preference_targets(
    ids: Tensor, response_mask: Tensor, attention_mask: Tensor, n_chosen: int, nll_mode: str | None = DEFAULT_NLL_MODE
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Next-token targets of stacked rows -> ``(response, full, union)``, each (S*B, L), ``IGNORE_INDEX`` elsewhere.

    ``response``: the response tokens; ``full`` (only for ``"prompt+response"``, else None): every
    real token after the first of the chosen rows; ``union``: the positions whose log-prob is needed.
    """
    resp_t = shift_targets(ids, response_mask)
    full_t = None
    union = resp_t
    if nll_mode == "prompt+response":
        full_t = shift_targets(ids, attention_mask)
        full_t[n_chosen:] = IGNORE_INDEX  # the NLL is over the chosen rows only
        union = torch.where(resp_t != IGNORE_INDEX, resp_t, full_t)
    return resp_t, full_t, union


def preference_from_token_logprobs(
    lp: Tensor, resp_t: Tensor, full_t: Tensor | None, n_chosen: int, *, nll_mode: str | None = DEFAULT_NLL_MODE,
    has_rejected: bool = True,
) -> PreferenceForward:
    """Per-row response log-probs and the chosen NLL from token log-probs ``lp`` (S*B, L) at ``union`` targets.

    ``resp_t`` and ``full_t`` as from ``preference_targets``; ``lp`` may be 0 anywhere they are ignored.
    """
    check_nll_mode(nll_mode)
    B = n_chosen
    counted = resp_t != IGNORE_INDEX
    count = counted.sum(-1)  # (S*B,)
    total = (lp * counted).sum(-1)
    seq = SequenceLogprobs(total, total / count, count)
    chosen = SequenceLogprobs(*(t[:B] for t in seq))
    rejected = SequenceLogprobs(*(t[B:] for t in seq)) if has_rejected else None

    nll = n_tok = None
    if nll_mode == "response":
        n_tok = count[:B].sum()
        nll = -total[:B].sum() / n_tok
    elif nll_mode == "prompt+response":
        mask = full_t[:B] != IGNORE_INDEX
        n_tok = mask.sum()
        nll = -(lp[:B] * mask).sum() / n_tok
    return PreferenceForward(chosen, rejected, nll, n_tok)
