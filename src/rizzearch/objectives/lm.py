"""Language-modelling objectives: next-token cross-entropy and masked sequence log-probs.

Pure functions over logits and targets returning ``(loss, metrics)``; ``metrics`` holds detached
Python floats (or 0-d tensors) for logging. Targets use ``ignore_index = -100`` for positions
that do not count.
"""

from __future__ import annotations

from typing import NamedTuple

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


# ----------------------------------------------------------------------------------------------
# Masked sequence log-probs (shared by SFT, DPO and ORPO)
#
# For a sequence x with next-token targets y_t and a mask K of the positions that count (the
# response tokens), the sequence log-prob is  log P(y|x) = sum_{t in K} log softmax(z_t)[y_t]  and the
# per-token mean is  (1/|K|) sum_{t in K} log softmax(z_t)[y_t]  (ORPO's length-normalised
# likelihood, Hong et al. 2024 Eq. 2; DPO uses the sum, Rafailov et al. 2023 Eq. 7).
#
# Two forms of the same math: ``token_logprobs_reference`` materialises the full [B, T, V]
# log-softmax (the spec); ``token_logprobs`` walks the vocabulary dimension chunk by chunk of
# positions, keeps only one logsumexp per position for the backward pass, and skips positions
# that do not count. Its extra memory is one chunk, not a second [B, T, V] tensor.

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (~16 MiB in fp32) when chunk_size is None


def _acc_dtype(logits: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half/bf16/fp32 logits, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _check_logits_targets(name: str, logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ShapeError(
            f"{name}: logits (B, T, V) and targets (B, T) expected, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ShapeError(f"{name}: targets must be an integer tensor, got {targets.dtype}")


def token_logprobs_reference(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """log softmax(z_t)[y_t] per position, 0 where ``targets == ignore_index`` -> (B, T) in fp32 (fp64 for fp64).

    The spec: one full [B, T, V] fp32 log-softmax followed by a gather.
    """
    _check_logits_targets("token_logprobs_reference", logits, targets)
    valid = targets != ignore_index
    logp = torch.log_softmax(logits.to(_acc_dtype(logits)), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, torch.where(valid, targets, 0).long()[..., None]).squeeze(-1)  # (B, T)
    return torch.where(valid, picked, torch.zeros_like(picked))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Selected log-softmax over the rows of logits[N, V], chunk by chunk of rows.

    forward:  lp_n = z_n[y_n] - logsumexp(z_n)           (only rows in ``rows``; others 0)
    backward: dL/dz_n = g_n * (onehot(y_n) - softmax(z_n))  recomputed per chunk from the saved lse
    """

    @staticmethod
    def forward(ctx, logits2d: Tensor, targets: Tensor, rows: Tensor, chunk: int, inplace: bool) -> Tensor:
        N, acc = logits2d.shape[0], _acc_dtype(logits2d)
        out = torch.zeros(N, dtype=acc, device=logits2d.device)
        lse = torch.empty(rows.numel(), dtype=acc, device=logits2d.device)
        for s in range(0, rows.numel(), chunk):
            idx = rows[s : s + chunk]
            z = logits2d.index_select(0, idx).to(acc)  # (c, V)
            lse_c = torch.logsumexp(z, dim=-1)  # (c,)
            lse[s : s + chunk] = lse_c
            out[idx] = z.gather(-1, targets[idx, None]).squeeze(-1) - lse_c
        ctx.save_for_backward(logits2d, targets, rows, lse)
        ctx.chunk, ctx.inplace = chunk, inplace
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits2d, targets, rows, lse = ctx.saved_tensors
        chunk = ctx.chunk
        # in place: the gradient overwrites the logits chunk by chunk (each chunk is read before it
        # is written); positions that do not count are zeroed at the end
        grad = logits2d if ctx.inplace else torch.zeros_like(logits2d)
        g_all = grad_out.to(lse.dtype)
        for s in range(0, rows.numel(), chunk):
            idx = rows[s : s + chunk]
            g = g_all[idx][:, None]  # (c, 1)
            p = torch.exp(logits2d.index_select(0, idx).to(lse.dtype) - lse[s : s + chunk, None])  # softmax (c, V)
            p.mul_(-g)
            p.scatter_add_(-1, targets[idx, None], g)
            grad.index_copy_(0, idx, p.to(grad.dtype))
        if ctx.inplace:
            skipped = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
            skipped[rows] = False
            grad.masked_fill_(skipped[:, None], 0)
        return grad, None, None, None, None


# autograd nodes that only alias their input (the logits share storage with the node's input)
_VIEW_NODES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0",
               "PermuteBackward0", "AsStridedBackward0", "SliceBackward0", "ExpandBackward0", "SqueezeBackward0",
               "UnsqueezeBackward0"}
# nodes whose backward reads only their inputs, never their output
_OUTPUT_FREE_NODES = {"MmBackward0", "AddmmBackward0", "BmmBackward0", "BaddbmmBackward0", "AddBackward0", "MulBackward0"}


def inplace_backward_is_safe(logits: Tensor) -> bool:
    """True when writing the logits gradient into the logits buffer cannot corrupt autograd.

    That holds when the logits come (through views only) from a node whose backward never reads
    its own output, such as the matmul of a linear LM head. A head that saves its output (a tanh
    soft-cap, a softmax) would see its saved tensor overwritten, so the answer is False there.
    """
    if not logits.requires_grad or logits.grad_fn is None or not logits.is_contiguous():
        return False
    node = logits.grad_fn
    while node is not None and type(node).__name__ in _VIEW_NODES:
        nxt = [fn for fn, _ in node.next_functions if fn is not None]
        node = nxt[0] if len(nxt) == 1 else None
    return node is not None and type(node).__name__ in _OUTPUT_FREE_NODES


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    *,
    inplace_backward: bool | None = False,
) -> Tensor:
    """log softmax(z_t)[y_t] per position, 0 where ignored -> (B, T) fp32 (fp64 for fp64), no full log-softmax.

    Same values and gradients as ``token_logprobs_reference``. Positions are processed
    ``chunk_size`` at a time (None: about ``DEFAULT_CHUNK_ELEMENTS / V`` positions); ignored
    positions cost nothing. Memory beyond ``logits``: one fp32 chunk plus one float per position
    (the logsumexp saved for backward). The gradient w.r.t. ``logits`` is of course full size,
    unless ``inplace_backward=True``: then backward writes it into the logits' own buffer (as
    fused cross-entropy kernels do), so the backward pass adds only one chunk too. Use it only when
    nothing else reads these logits after the backward pass (autograd raises if another op saved them).
    ``inplace_backward=None`` decides automatically (``inplace_backward_is_safe``): in place for a
    plain linear head, out of place otherwise. Without a graph (no grad) there is no backward, so
    nothing is done in place.
    """
    _check_logits_targets("token_logprobs", logits, targets)
    B, T, V = logits.shape
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(V, 1))
    if chunk_size < 1:
        raise ShapeError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    flat_t = targets.reshape(-1)
    valid = flat_t != ignore_index
    bad = valid & ((flat_t < 0) | (flat_t >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ShapeError(f"token_logprobs: target {int(flat_t[i])} at position {divmod(i, T)} is outside the vocabulary [0, {V})")
    rows = valid.nonzero().squeeze(-1)  # (K,)
    safe = torch.where(valid, flat_t, 0).long()
    if inplace_backward is None:
        inplace_backward = inplace_backward_is_safe(logits)
    inplace_backward = bool(inplace_backward) and logits.requires_grad
    if inplace_backward and not logits.is_contiguous():
        raise ShapeError("token_logprobs: inplace_backward needs contiguous logits")
    out = _ChunkedTokenLogprobs.apply(logits.reshape(B * T, V), safe, rows, int(chunk_size), inplace_backward)
    return out.view(B, T)


class SequenceLogprobs(NamedTuple):
    """Per-sequence log-probs over the counted (response) tokens, all (B,) fp32.

    Args:
        sum: sum of token log-probs, log P(y|x).
        mean: sum / count, the per-token mean (log of ORPO's length-normalised P(y|x)).
        count: number of counted tokens.
    """

    sum: Tensor
    mean: Tensor
    count: Tensor


def sequence_logprobs(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    *,
    chunked: bool = True,
) -> SequenceLogprobs:
    """Masked sequence log-probs: sum and per-token mean over positions whose target counts.

    logits: (B, T, V); targets: (B, T) aligned with logits (targets[:, t] is the token that
    logits[:, t] predicts), ``ignore_index`` where a position does not count (prompt, padding).
    Every row must have at least one counted token (else ShapeError naming the row: an
    all-masked response would give 0/0). ``chunked=False`` uses the full log-softmax reference.
    """
    lp = token_logprobs(logits, targets, ignore_index, chunk_size) if chunked else token_logprobs_reference(logits, targets, ignore_index)
    count = (targets != ignore_index).sum(-1)  # (B,)
    if bool((count == 0).any()):
        row = int((count == 0).nonzero()[0])
        raise ShapeError(f"sequence_logprobs: row {row} has no counted target (all-masked response)")
    total = lp.sum(-1)
    return SequenceLogprobs(total, total / count, count)
