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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.models.base import eval_mode
from rizzearch.objectives.lm import IGNORE_INDEX, SequenceLogprobs, token_logprobs, token_logprobs_reference

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

NLL_MODES = ("response", "prompt+response")
DEFAULT_NLL_MODE = "response"
P_MAX = 1.0 - 1e-4
LOGP_MAX = math.log1p(-1e-4)  # log(P_MAX)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate everywhere (-inf at a = 0)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def _check_lam(lam: float) -> float:
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
    lam = _check_lam(lam)
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


# ----------------------------------------------------------------------------------------------
# From a model and a preference batch to the loss inputs


class PreferenceForward(NamedTuple):
    """What one concatenated forward over a preference batch yields.

    Args:
        chosen: log-probs of the chosen responses (sum, mean, count), each (B,).
        rejected: log-probs of the rejected responses.
        chosen_nll: token-mean NLL of the chosen sequences in the requested mode (None if not asked).
        nll_tokens: number of tokens in that NLL.
    """

    chosen: SequenceLogprobs
    rejected: SequenceLogprobs
    chosen_nll: Tensor | None
    nll_tokens: Tensor | None


def _shift_targets(ids: Tensor, mask: Tensor) -> Tensor:
    """targets[:, t] = ids[:, t+1] where mask[:, t+1], else ignore; the last column is ignored."""
    tgt = torch.full_like(ids, IGNORE_INDEX)
    tgt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    return tgt


def preference_forward(
    model,
    batch: dict[str, Tensor],
    *,
    nll_mode: str | None = DEFAULT_NLL_MODE,
    sides: tuple[str, ...] = ("chosen", "rejected"),
    chunk_size: int | None = None,
    chunked: bool = True,
    inplace_backward: bool | None = None,
) -> PreferenceForward:
    """Run chosen and rejected through ONE forward (so DDP sees one call) and score the responses.

    ``batch`` holds the six tensors of ``rizzearch.data.preference`` (right-padded). The two sides
    are stacked to (2B, L) after trimming shared trailing padding. Right padding needs no
    attention mask in a causal model: padded positions come after every real one and are never
    scored. ``nll_mode`` None skips the NLL; ``sides=("chosen",)`` forwards only the chosen
    sequences (SFT; ``rejected`` is then None). ``inplace_backward`` lets the backward pass write
    the logits gradient into the logits buffer (``token_logprobs``), saving one [2B, L, V] tensor;
    None (the default) does so whenever it is safe (a plain linear head: ``inplace_backward_is_safe``).
    """
    from rizzearch.data.preference import validate_batch

    if nll_mode is not None and nll_mode not in NLL_MODES:
        raise ConfigError(f"orpo.nll_mode: expected one of {list(NLL_MODES)}, got {nll_mode!r}")
    validate_batch(batch)
    B = batch["chosen_input_ids"].shape[0]
    L = max(int(batch[f"{s}_attention_mask"].sum(1).max()) for s in sides)
    ids = torch.cat([batch[f"{s}_input_ids"][:, :L] for s in sides])  # (S*B, L)
    resp = torch.cat([batch[f"{s}_response_mask"][:, :L] for s in sides]).bool()
    att = torch.cat([batch[f"{s}_attention_mask"][:, :L] for s in sides]).bool()
    logits, _ = model(ids)  # (S*B, L, V)

    resp_t = _shift_targets(ids, resp)  # response targets
    if nll_mode == "prompt+response":
        full_t = _shift_targets(ids, att)
        full_t[B:] = IGNORE_INDEX  # the NLL is over the chosen rows only
        union = torch.where(resp_t != IGNORE_INDEX, resp_t, full_t)
    else:
        union = resp_t
    if chunked:
        lp = token_logprobs(logits, union, chunk_size=chunk_size, inplace_backward=inplace_backward)
    else:
        lp = token_logprobs_reference(logits, union)

    counted = resp_t != IGNORE_INDEX
    count = counted.sum(-1)  # (S*B,)
    total = (lp * counted).sum(-1)
    seq = SequenceLogprobs(total, total / count, count)
    chosen = SequenceLogprobs(*(t[:B] for t in seq))
    rejected = SequenceLogprobs(*(t[B:] for t in seq)) if "rejected" in sides else None

    nll = n_tok = None
    if nll_mode == "response":
        n_tok = count[:B].sum()
        nll = -total[:B].sum() / n_tok
    elif nll_mode == "prompt+response":
        mask = full_t[:B] != IGNORE_INDEX
        n_tok = mask.sum()
        nll = -(lp[:B] * mask).sum() / n_tok
    return PreferenceForward(chosen, rejected, nll, n_tok)


@torch.no_grad()
def score_pairs(model, tensors: dict[str, Tensor], batch_size: int = 32, *, chunk_size: int | None = None,
                device=None) -> Iterator[PreferenceForward]:
    """``preference_forward`` (no NLL) over fixed, in-order batches of a preference set's tensors.

    Eval mode (dropout off) and no grad while the batches are scored; the model's mode is restored
    once the iteration ends. Used for DPO's reference log-probs and the held-out preference metrics.
    """
    from rizzearch.data.preference import PairEvalBatches

    with eval_mode(model):
        for batch in PairEvalBatches(tensors, batch_size).batches():
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            yield preference_forward(model, batch, nll_mode=None, chunk_size=chunk_size)


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
        _check_lam(self.lam)
        if self.nll_mode not in NLL_MODES:
            raise ConfigError(f"orpo.nll_mode: expected one of {list(NLL_MODES)}, got {self.nll_mode!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"orpo.chunk_size must be >= 1, got {self.chunk_size}")


def orpo_batch_loss(
    model,
    batch: dict[str, Tensor],
    lam: float = 0.1,
    nll_mode: str = DEFAULT_NLL_MODE,
    chunk_size: int | None = None,
    inplace_backward: bool | None = None,
) -> tuple[Tensor, dict]:
    """``loss_fn(model, batch)`` for the training loop: one forward, then ``orpo_loss``."""
    _check_lam(lam)
    fw = preference_forward(model, batch, nll_mode=nll_mode, chunk_size=chunk_size, inplace_backward=inplace_backward)
    loss, metrics = orpo_loss(fw.chosen.mean, fw.rejected.mean, fw.chosen_nll, lam)
    metrics["tokens"] = fw.nll_tokens.detach()
    return loss, metrics


def make_orpo_loss(config: ORPOConfig = ORPOConfig()):
    """The loop's ``loss_fn`` for an ORPOConfig."""
    return partial(orpo_batch_loss, lam=config.lam, nll_mode=config.nll_mode, chunk_size=config.chunk_size,
                   inplace_backward=config.inplace_backward)
