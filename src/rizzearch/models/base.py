"""The CausalLM contract, ``generate()`` and parameter/FLOP counts; the model registry
(``models/registry.py``) is re-exported here.

Contract (DESIGN.md). Every model is a plain ``nn.Module`` with a frozen dataclass ``config`` and

- ``forward(tokens[B, T], state=None, attention_mask=None) -> (logits[B, T, V], state)`` for any T;
  ``state`` carries everything needed to continue (recurrent states, conv buffers, KV cache).
- ``init_state(batch_size, device=None, dtype=None) -> state`` (the state before any token).
- ``step(token[B], state, attention_mask=None) -> (logits[B, V], state)``.
- ``prefill(tokens[B, T], state=None, attention_mask=None) -> (logits[B, V], state)``: ``forward``
  keeping only the last position's logits, whose head (and final norm) each model computes for that
  position only (``_head_rows``): what ``generate`` needs before its first ``step``.
- Invariant, tested for every registered model: one ``forward`` over a sequence equals a chunked
  prefill followed by token-by-token ``step``, for batch > 1, to fp32 tolerance.
- ``attention_mask[B, T]`` (1 = real token, 0 = padding): padded positions leave the state
  unchanged, so left-padded batches decode exactly like unpadded rows.

A *state* is a nested structure (dict / list / tuple) of tensors whose first dimension is the
batch. That single rule lets ``generate()`` reorder beams (``select_state``) and lets padding be
applied generically (``where_state``) for every model.

Models return logits only; losses live in ``rizzearch.objectives``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from rizzearch.errors import CheckpointError, ConfigError, ShapeError
from rizzearch.models.registry import (  # noqa: F401  (the registry, named by the contract here)
    _REGISTRY,
    _TINY,
    build_model,
    config_from_dict,
    config_overrides_type,
    config_to_dict,
    get_model_class,
    model_names,
    overrides_to_dict,
    register_model,
    tiny_overrides,
)

State = Any  # nested dict / list / tuple of tensors, batch on dim 0

# The model whose ``prefill`` is running in this thread / task (its ``_head_rows`` keeps the last position)
_PREFILLING: contextvars.ContextVar = contextvars.ContextVar("rizz_prefilling", default=None)


# ----------------------------------------------------------------------------------------------
# State helpers


def map_state(fn: Callable[[Tensor], Tensor], state: State) -> State:
    """Apply ``fn`` to every tensor of a nested state, keeping the structure."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(fn, v) for v in state)
    if state is None or isinstance(state, (int, float, str, bool)):
        return state
    raise TypeError(f"unsupported state element of type {type(state).__name__}")


def zip_state(fn: Callable[[Tensor, Tensor], Tensor], a: State, b: State) -> State:
    """Combine two states of identical structure tensor by tensor."""
    if isinstance(a, Tensor):
        return fn(a, b)
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ShapeError(f"state keys differ: {sorted(a)} vs {sorted(b)}")
        return {k: zip_state(fn, a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ShapeError(f"state lists differ in length: {len(a)} vs {len(b)}")
        return type(a)(zip_state(fn, x, y) for x, y in zip(a, b))
    return a


def select_state(state: State, index: Tensor) -> State:
    """Rows ``index`` of every tensor in the state (beam reordering, batch expansion)."""
    return map_state(lambda t: t.index_select(0, index.to(t.device)), state)


def where_state(keep_new: Tensor, new: State, old: State) -> State:
    """Per batch row, take ``new`` where ``keep_new[b]`` is true, else ``old`` (padding)."""

    def pick(n: Tensor, o: Tensor) -> Tensor:
        m = keep_new.to(n.device).view(-1, *([1] * (n.dim() - 1)))
        return torch.where(m, n, o)

    return zip_state(pick, new, old)


# ----------------------------------------------------------------------------------------------
# The contract


class CausalLM(nn.Module):
    """Base class for every rizzearch language model (see the module docstring for the contract).

    Subclasses set ``self.config`` (a frozen dataclass with a ``vocab_size`` field) and implement
    ``forward`` and ``init_state``; ``step`` defaults to a one-token ``forward``.
    """

    config: Any

    def forward(self, tokens: Tensor, state: State = None, attention_mask: Tensor | None = None):
        raise NotImplementedError

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        raise NotImplementedError

    def step(self, token: Tensor, state: State, attention_mask: Tensor | None = None):
        """One token per row: ``token[B] -> (logits[B, V], state)``."""
        if token.dim() != 1:
            raise ShapeError(f"step: token must have shape (B,), got {tuple(token.shape)}")
        mask = None if attention_mask is None else attention_mask.view(-1, 1)
        logits, state = self(token[:, None], state, attention_mask=mask)
        return logits[:, 0], state

    def prefill(self, tokens: Tensor, state: State = None, attention_mask: Tensor | None = None):
        """Consume a prompt: ``tokens[B, T] -> (logits[B, V] of the last position, state)``, equal to
        ``forward(tokens, state, attention_mask)`` with ``logits[:, -1]`` kept (tested for every model).

        The model runs its final norm and LM head on the last position only (``_head_rows``), so the
        (B, T, V) logits of a prompt are never built (T x 49152 floats per row for SmolLM2) and the
        head's T - 1 unused rows are never multiplied (a quarter of the matmul work of the small
        xLSTM-7B-shape config at T = 256). ``generate`` and the other decoding loops start with it.
        """
        token = _PREFILLING.set(self)
        try:
            logits, state = self(tokens, state, attention_mask=attention_mask)
        finally:
            _PREFILLING.reset(token)
        return logits[:, -1], state

    def _prefilling(self) -> bool:
        """Whether this model's ``prefill`` is running: only the last position's outputs are read."""
        return _PREFILLING.get() is self

    def _head_rows(self, x: Tensor) -> Tensor:
        """The positions the final norm and LM head see: x (B, T, C) itself, or (B, 1, C), its last
        position, inside this model's ``prefill``."""
        return x[:, -1:] if self._prefilling() else x

    # -- checkpoints ------------------------------------------------------------------------

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` whose errors are ``RizzError``s that name the problem: a tensor
        of the wrong shape (``ShapeError``, expected and actual shape), missing or unexpected keys
        (``CheckpointError``, with ``strict``)."""
        own = self.state_dict()
        what = type(self).__name__
        for name, t in state_dict.items():
            if name in own and tuple(t.shape) != tuple(own[name].shape):
                raise ShapeError(
                    f"state_dict['{name}']: expected shape {tuple(own[name].shape)}, got {tuple(t.shape)} "
                    f"(weights of another {what} config?)"
                )
        if strict:
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise CheckpointError(
                    f"state_dict does not match this {what} model: missing {missing[:5]}"
                    f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- sizes ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    n -= m.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context ``seq_len``.

        Default: 6 x the weights that take part in matmuls, i.e. every parameter with two or more
        dimensions outside the embedding lookup (a tied LM head counts, because its matmul is
        real). Models override this to add their sequence-length terms (attention, chunkwise scans).
        """
        n = sum(
            p.numel()
            for m in self.modules()
            if not isinstance(m, nn.Embedding)
            for p in m.parameters(recurse=False)
            if p.dim() >= 2
        )
        return 6.0 * n

    def _check_tokens(self, tokens: Tensor, attention_mask: Tensor | None) -> None:
        if tokens.dim() != 2:
            raise ShapeError(f"tokens: expected shape (B, T), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"tokens: expected an integer tensor, got {tokens.dtype}")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ShapeError(
                f"attention_mask: expected shape {tuple(tokens.shape)} (same as tokens), got {tuple(attention_mask.shape)}"
            )

    @staticmethod
    def _padding_mask(attention_mask: Tensor | None) -> Tensor | None:
        """``attention_mask`` as bool (B, T), or None when it marks no padding (the unpadded path)."""
        if attention_mask is None:
            return None
        mask = attention_mask.bool()
        return None if bool(mask.all()) else mask

    def _recurrent_forward(self, tokens: Tensor, state: State, attention_mask: Tensor | None):
        """``forward`` of a recurrent model whose ``_run(tokens, state, mask)`` runs its blocks: checks
        the inputs; one padded token is computed unmasked and its row keeps the old state."""
        self._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        if state is not None:
            self._check_state(state, B)
        mask = self._padding_mask(attention_mask)
        if mask is not None and T == 1:
            old = state if state is not None else self.init_state(B, tokens.device)
            logits, new = self._run(tokens, old, None)
            return logits, where_state(mask[:, 0], new, old)
        return self._run(tokens, state, mask)


# ----------------------------------------------------------------------------------------------
# Generation


def _filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Top-k then nucleus (top-p) filtering; removed entries become -inf. logits: (B, V)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass *before* it already reaches top_p (the top token is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` inside the block; the model's train/eval mode is restored after it (also on error)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


# Documented limits of generate(): beyond them a request is refused up front (one-line ConfigError)
# instead of failing in the allocator half-way or silently growing a cache until the machine swaps.
MAX_NEW_TOKENS = 1_000_000
MAX_BEAMS = 256


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: the allocator's view; CPU: available physical pages), or None."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def _check_generation_settings(prompt: Tensor, max_new_tokens: int, temperature: float, top_k, top_p, num_beams: int, vocab: int) -> None:
    """Refuse impossible or unsafe decoding settings with a one-line ConfigError naming the field."""
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens must be in [0, {MAX_NEW_TOKENS:,}], got {max_new_tokens}")
    if not 1 <= num_beams <= MAX_BEAMS:
        raise ConfigError(f"num_beams must be in [1, {MAX_BEAMS}], got {num_beams}")
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or None, got {top_p}")
    # generate's own buffers: output ids (beams keep whole sequences) and the float32 scores of one step
    rows = prompt.shape[0] * num_beams
    need = rows * max_new_tokens * 8 * (2 if num_beams > 1 else 1) + rows * vocab * 4 * (3 if num_beams > 1 else 2)
    free = _available_bytes(prompt.device)
    if free is not None and need > free:
        raise ConfigError(f"max_new_tokens={max_new_tokens} with num_beams={num_beams} and batch {prompt.shape[0]} needs about "
                          f"{need / 2**30:.1f} GiB for decoding buffers alone, more than the {free / 2**30:.1f} GiB free on {prompt.device}")


@torch.no_grad()
def generate(
    model: CausalLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    length_penalty: float = 0.0,
    eos_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue ``prompt[B, T]`` by ``max_new_tokens`` tokens; returns only the new tokens (B, N).

    - ``temperature == 0`` and ``num_beams == 1``: greedy decoding (deterministic).
    - ``temperature > 0``: sampling from softmax(logits / temperature) after top-k / top-p filtering,
      drawn from ``generator`` (seed it for reproducible samples).
    - ``num_beams > 1``: beam search over summed log-probs, scores divided by
      ``length ** length_penalty`` when ranking finished beams (0 = no normalisation).
    - ``attention_mask`` marks left padding of ``prompt`` (1 = token, 0 = pad).
    - After ``eos_id`` a row keeps emitting ``eos_id``.

    The prompt is consumed by one ``prefill`` (the last position's logits only), then the model
    ``step``s one token at a time, so recurrent models decode with constant memory per token.
    """
    if prompt.dim() != 2:
        raise ShapeError(f"prompt: expected shape (B, T), got {tuple(prompt.shape)}")
    if prompt.shape[1] == 0:
        raise ShapeError("prompt: needs at least one token")
    _check_generation_settings(prompt, max_new_tokens, temperature, top_k, top_p, num_beams, int(getattr(model, "vocab_size", 0) or 0))
    with eval_mode(model):
        last, state = _prefill(model, prompt, attention_mask)
        last = last.float()  # (B, V)
        if num_beams > 1:
            return _beam_search(model, last, state, max_new_tokens, num_beams, length_penalty, eos_id)
        B = prompt.shape[0]
        out = prompt.new_empty(B, max_new_tokens)
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for i in range(max_new_tokens):
            if temperature and temperature > 0:
                filtered = _filter_logits(last / temperature, top_k, top_p)
                nxt = torch.multinomial(filtered.softmax(-1), 1, generator=generator)[:, 0]
            else:
                nxt = last.argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out[:, i] = nxt
            if i + 1 < max_new_tokens:
                last, state = model.step(nxt, state)
                last = last.float()
        return out


def _prefill(model, prompt: Tensor, attention_mask: Tensor | None):
    """``model.prefill`` (every CausalLM), or the last position of the forward of a model without one
    (a DDP or other wrapper)."""
    if hasattr(model, "prefill"):
        return model.prefill(prompt, None, attention_mask=attention_mask)
    logits, state = model(prompt, None, attention_mask=attention_mask)
    return logits[:, -1], state


def _beam_search(model, last: Tensor, state: State, n_new: int, W: int, length_penalty: float, eos_id):
    B, V = last.shape
    device = last.device
    if n_new == 0:
        return torch.empty(B, 0, dtype=torch.long, device=device)
    logp = last.log_softmax(-1)  # (B, V)
    W0 = min(W, V)
    scores, tok = logp.topk(W0, dim=-1)  # (B, W0)
    if W0 < W:  # fewer tokens than beams: pad with dead beams
        scores = torch.cat([scores, scores.new_full((B, W - W0), float("-inf"))], 1)
        tok = torch.cat([tok, tok[:, :1].expand(B, W - W0)], 1)
    seqs = tok[:, :, None]  # (B, W, 1)
    state = select_state(state, torch.arange(B, device=device).repeat_interleave(W))  # (B*W, ...)
    finished = (tok == eos_id) if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
    lengths = torch.ones(B, W, device=device)
    for _ in range(n_new - 1):
        step_logits, state = model.step(seqs[:, :, -1].reshape(B * W), state)
        logp = step_logits.float().log_softmax(-1).view(B, W, V)  # (B, W, V)
        if eos_id is not None:
            # a finished beam continues only with eos at no cost
            frozen = torch.full_like(logp, float("-inf"))
            frozen[..., eos_id] = 0.0
            logp = torch.where(finished[..., None], frozen, logp)
        cand = (scores[..., None] + logp).view(B, W * V)  # (B, W*V)
        scores, flat = cand.topk(W, dim=-1)  # (B, W)
        beam, tok = flat // V, flat % V
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[2])), tok[..., None]], 2)
        lengths = lengths.gather(1, beam) + (~finished.gather(1, beam)).float()
        finished = finished.gather(1, beam) | ((tok == eos_id) if eos_id is not None else False)
        rows = (torch.arange(B, device=device)[:, None] * W + beam).reshape(-1)
        state = select_state(state, rows)
    ranked = scores / lengths.pow(length_penalty) if length_penalty else scores
    best = ranked.argmax(-1)  # (B,)
    return seqs[torch.arange(B, device=device), best]
