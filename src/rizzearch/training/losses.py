"""The training loop's language-model ``loss_fn(model, batch) -> (loss, metrics)``s, and token log-probs
computed from a model's final hidden states without its full logits (``model_token_logprobs``).

Each loss runs the model and hands its logits to a pure objective of ``rizzearch.objectives``.
A batch is ``{"input_ids", "targets"[, "attention_mask"]}`` (targets ``-100`` where nothing counts).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rizzearch.errors import ShapeError
from rizzearch.models.base import CausalLM
from rizzearch.objectives.goldfish import GoldfishConfig, goldfish_cross_entropy
from rizzearch.objectives.lm import DEFAULT_CHUNK_ELEMENTS, IGNORE_INDEX, cross_entropy, token_logprobs


def lm_loss(model, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """Standard language-model loss: next-token cross-entropy over every target (``objectives.lm.cross_entropy``)."""
    logits, _ = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
    return cross_entropy(logits, batch["targets"])


class GoldfishLoss:
    """``loss_fn(model, batch)``: the goldfish loss (Hans et al. 2024, Eq. 2), in train and eval mode alike.

    It does not look at ``model.training``: to compare validation losses of goldfish and standard
    runs, evaluate with the all-token loss explicitly (``lm_loss``, e.g. the loop's
    ``eval_loss_fn``), which is what ``rizz train`` and the goldfish study do.
    For the ``random`` strategy each call draws a fresh mask seed from the global torch RNG (which
    the loop seeds and checkpoints, so resumed runs are bit-identical); with a fixed seed every
    batch would get the same positional pattern, which is just a static mask.

    Args:
        config: the goldfish settings.
        protected_ids: token ids added to ``config.protected_ids`` (never dropped; special tokens).
    """

    def __init__(self, config: GoldfishConfig, protected_ids: Sequence[int] = ()):
        extra = tuple(int(i) for i in protected_ids if int(i) not in config.protected_ids)
        self.config = replace(config, protected_ids=tuple(config.protected_ids) + extra)

    def __call__(self, model, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        logits, _ = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
        seed = None
        if self.config.strategy == "random" and self.config.enabled:
            seed = self.config.seed * 1_000_003 + int(torch.randint(0, 2**31 - 1, (1,)))
        return goldfish_cross_entropy(logits, batch["targets"], self.config, seed=seed)

    def __repr__(self) -> str:
        return f"GoldfishLoss({self.config})"


# ----------------------------------------------------------------------------------------------
# Token log-probs from the final hidden states: the [N, L, V] logits are never materialised.
#
# For next-token targets y_t (IGNORE_INDEX where a position does not count) the model's token
# log-probs are  lp_t = z_t[y_t] - logsumexp(z_t),  z_t = head(h_t)  with h_t the final hidden state
# (after the final norm). ``model_token_logprobs`` runs the model with its output head bypassed
# (the head returns its input, which is captured), keeps only the K positions that count, and
# computes lp chunk by chunk of positions. Its extra memory is one [chunk, V] block instead of the
# logits, their log-softmax and their gradient (3 x N L V floats: 2.4 GB for 8 x 512 x 49152 in fp32).
# Same values and gradients as ``objectives.lm.token_logprobs`` on the model's logits (tested for
# every registered model family).

_HEAD_NAMES = ("lm_head", "head")  # the output projection of each model family (gpt/llama/xlstm: lm_head, rwkv: head)


class _LinearHeadLogprobs(torch.autograd.Function):
    """lp_k = z_k[y_k] - logsumexp(z_k), z_k = h_k W^T (+ b), over the rows h[K, C], ``chunk`` rows at a time.

    Backward: dL/dz_k = g_k (onehot(y_k) - softmax(z_k)), dL/dh_k = dL/dz_k W, dL/dW = sum_k dL/dz_k^T h_k.
    A frozen head (LoRA) lets the forward store a_k = (onehot(y_k) - softmax(z_k)) W (K, C): since g_k
    is one scalar per row, dL/dh_k = g_k a_k exactly, and backward costs nothing. A trained head
    recomputes z chunk by chunk in backward instead (one extra head matmul, no [K, V] tensor kept).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        K, store = h.shape[0], ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        out = torch.empty(K, dtype=torch.float32 if h.dtype != torch.float64 else h.dtype, device=h.device)
        lse = torch.empty_like(out)
        slopes = torch.empty(K, h.shape[1], dtype=out.dtype, device=h.device) if store else None  # (K, C)
        zdt = None
        for s in range(0, K, chunk):
            z = F.linear(h[s : s + chunk], weight, bias)  # (c, V) in the autocast dtype
            zdt = z.dtype
            z = z.to(out.dtype)
            lse[s : s + chunk] = torch.logsumexp(z, -1)
            out[s : s + chunk] = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
            if store:  # z becomes -(softmax - onehot) in place, then a = that @ W
                z.sub_(lse[s : s + chunk, None]).exp_().neg_()
                z.scatter_add_(-1, targets[s : s + chunk, None], torch.ones_like(z[:, :1]))
                slopes[s : s + chunk] = (z.to(zdt) @ weight.to(zdt)).to(out.dtype)
        ctx.store, ctx.chunk, ctx.zdt, ctx.hdt = store, chunk, zdt, h.dtype
        ctx.save_for_backward(slopes if store else h, weight, bias, targets, lse)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        saved, weight, bias, targets, lse = ctx.saved_tensors
        if ctx.store:
            return (g[:, None].to(saved.dtype) * saved).to(ctx.hdt), None, None, None, None
        h, zdt, c = saved, ctx.zdt, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        gb = torch.zeros_like(bias, dtype=lse.dtype) if need_b else None
        for s in range(0, h.shape[0], c):
            z = F.linear(h[s : s + c].to(zdt), weight.to(zdt), None if bias is None else bias.to(zdt)).to(lse.dtype)
            dz = z.sub_(lse[s : s + c, None]).exp_().mul_(-g[s : s + c, None])  # -g softmax
            dz.scatter_add_(-1, targets[s : s + c, None], g[s : s + c, None].to(dz.dtype))
            if need_h:
                gh[s : s + c] = dz.to(zdt) @ weight.to(zdt)
            if need_w:
                gw.addmm_(dz.t(), h[s : s + c].to(lse.dtype))
            if need_b:
                gb += dz.sum(0)
        return gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype), None, None


def _chunk_logprobs(head: nn.Module, cap: float | None, h: Tensor, targets: Tensor) -> Tensor:
    """lp of rows h[c, C] through any head module (and the model's logit soft cap) -> (c,) fp32."""
    z = head(h)  # (c, V)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def head_logprobs(head: nn.Module, h: Tensor, targets: Tensor, *, cap: float | None = None, chunk_size: int | None = None) -> Tensor:
    """log softmax(cap(head(h_k)))[y_k] for rows h[K, C] and targets y[K] -> (K,) fp32, ``chunk_size`` rows at a time.

    A plain ``nn.Linear`` head without soft cap takes the fused ``_LinearHeadLogprobs``; any other
    head (a LoRA-wrapped one, a soft-capped one) runs each chunk under activation checkpointing, so
    only one chunk's logits exist at a time in forward and backward alike.
    """
    if chunk_size is None:  # about DEFAULT_CHUNK_ELEMENTS logits per chunk
        n_out = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", (None,))[0]
        if not n_out:
            raise ShapeError(f"head_logprobs: give chunk_size for a {type(head).__name__} head (its output size is unknown)")
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // int(n_out))
    if chunk_size < 1:
        raise ShapeError(f"head_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if type(head) is nn.Linear and cap is None and "forward" not in vars(head):
        return _LinearHeadLogprobs.apply(h, head.weight, head.bias, targets, int(chunk_size))
    parts = []
    for s in range(0, h.shape[0], chunk_size):
        args = (head, cap, h[s : s + chunk_size], targets[s : s + chunk_size])
        grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def output_head(model) -> tuple[nn.Module, nn.Module, float | None] | None:
    """``(model, head, logit soft cap)`` of a CausalLM (or a DDP wrapper around one), None if it has no known head."""
    inner = model if isinstance(model, CausalLM) else getattr(model, "module", None)
    if not isinstance(inner, CausalLM):
        return None
    for name in _HEAD_NAMES:
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return inner, head, getattr(inner.config, "logit_soft_cap", None)
    return None


@contextlib.contextmanager
def _head_bypassed(head: nn.Module):
    """Within the block, ``head(x)`` returns ``x`` and records it (the final hidden states)."""
    seen: list[Tensor] = []
    before = vars(head).get("forward")

    def forward(x):
        seen.append(x)
        return x

    head.forward = forward
    try:
        yield seen
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def model_token_logprobs(model, ids: Tensor, targets: Tensor, *, chunk_size: int | None = None,
                         inplace_backward: bool | None = None) -> Tensor:
    """The model's log softmax(z_t)[y_t] at ``targets`` (N, L) -> (N, L) fp32, 0 where ignored.

    The model is causal, so a row's scores depend on its columns up to its last scored target only.
    Rows are grouped by that length (``length_buckets``) and each group runs trimmed to its own
    longest row: a right-padded batch does not pay for its padding. One forward per group; under
    ``torch.distributed`` (DDP/FSDP expect one forward per backward) always one forward.
    Each forward runs with the head bypassed, then ``head_logprobs`` at the counted positions only:
    no [N, L, V] logits. A model without a known head (a wrapper) or one that does not call it gets
    the logits path (``objectives.lm.token_logprobs``, ``chunk_size`` and ``inplace_backward`` passed on).
    """
    scored = targets != IGNORE_INDEX
    ends = torch.where(scored.any(1), scored.shape[1] - scored.flip(1).int().argmax(1), 0)  # (N,) last scored + 1
    one = torch.distributed.is_available() and torch.distributed.is_initialized()
    groups = [torch.arange(ids.shape[0], device=ids.device)] if one else length_buckets(ends)
    out = None
    for rows in groups:
        L = max(1, int(ends[rows].max()))
        full = len(groups) == 1 and L == ids.shape[1]
        lp = _token_logprobs_once(model, ids if full else ids[rows, :L], targets if full else targets[rows, :L],
                                  chunk_size=chunk_size, inplace_backward=inplace_backward)
        if full:
            return lp
        out = lp.new_zeros(targets.shape) if out is None else out
        out = out.index_put((rows[:, None], torch.arange(L, device=ids.device)[None]), lp)
    return out


def length_buckets(ends: Tensor, max_groups: int = 4, overhead: float = 0.05) -> list[Tensor]:
    """Row indices grouped by ``ends`` (N,) (the columns each row needs): sorted, cut into 1, 2 or
    ``max_groups`` equal groups, whichever computes the fewest positions (sum over groups of rows x
    the group's longest row), each extra group charged ``overhead`` of the ungrouped cost."""
    N = ends.shape[0]
    order = torch.argsort(ends, stable=True)
    best, best_cost = [torch.arange(N, device=ends.device)], float(N * int(ends.max())) if N else 0.0
    for k in (2, max_groups):
        if k > N or k == 1:
            continue
        parts = list(order.tensor_split(k))
        cost = sum(len(p) * int(ends[p].max()) for p in parts) + overhead * (k - 1) * N * int(ends.max())
        if cost < best_cost:
            best, best_cost = parts, cost
    return best


def _token_logprobs_once(model, ids: Tensor, targets: Tensor, *, chunk_size: int | None, inplace_backward: bool | None) -> Tensor:
    """``model_token_logprobs`` for one forward over ``ids`` (N, L)."""
    found = output_head(model)
    if found is None:
        logits, _ = model(ids)  # (N, L, V)
        return token_logprobs(logits, targets, chunk_size=chunk_size, inplace_backward=inplace_backward)
    inner, head, cap = found
    with _head_bypassed(head) as seen:
        out, _ = model(ids)
    if not seen:  # the head was not called: the model returned its logits
        return token_logprobs(out, targets, chunk_size=chunk_size, inplace_backward=inplace_backward)
    if len(seen) != 1 or seen[0].shape[:2] != ids.shape:
        raise ShapeError(f"model_token_logprobs: {type(inner).__name__} called its head {len(seen)} times or on another shape")
    flat = targets.reshape(-1)
    V = int(inner.config.vocab_size)
    bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ShapeError(f"model_token_logprobs: target {int(flat[i])} at position {divmod(i, ids.shape[1])} is outside the vocabulary [0, {V})")
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(-1)  # (K,)
    h = seen[0].reshape(flat.shape[0], -1).index_select(0, rows)  # (K, C)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // V)
    lp = head_logprobs(head, h, flat.index_select(0, rows).long(), cap=cap, chunk_size=chunk_size)  # (K,)
    return torch.zeros(flat.shape[0], dtype=lp.dtype, device=lp.device).index_copy(0, rows, lp).view(ids.shape)
