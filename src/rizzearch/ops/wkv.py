"""The RWKV-4 WKV operator: a reference loop (the spec) and a fast chunked form, state in and out.

Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", eq. (14): for each channel,
with decay ``w = exp(time_decay) > 0`` and bonus ``u = time_first``,

    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{-(t-1-i) w + k_i}       + e^{u + k_t})

computed as an RNN (the paper's recurrent form) over the un-normalised numerator ``A`` and
denominator ``B``: ``A_t = e^{-w} A_{t-1} + e^{k_t} v_t`` (same for ``B`` with ``v = 1``). The
exponentials overflow, so the state is kept as ``(a, b, p)`` with ``A = a e^p``, ``B = b e^p``:
``p`` is the running max exponent (the paper's numerically stable form, with ``q = max(p, u + k)``
for the output and ``q' = max(p - w, k)`` for the update). The state is always float32, whatever
the activation dtype, and ``p`` starts at -1e38 (empty prefix) like the official and HF code.

Sign convention: HF transformers and the official code store ``time_decay`` and apply
``-exp(time_decay)`` in log space, i.e. the per-step decay factor is ``exp(-exp(time_decay))``;
this module does the same, so HF/official weights load unchanged.

Forms (one math, compared in ``tests/ops/test_wkv.py`` for outputs, final states and every
gradient, including the initial state's):

- ``wkv_ref``: the plain loop over T above, differentiated by autograd. The spec.
- ``wkv_chunked``: the fast form. The max exponents obey ``p_t = max(p_{t-1} - w, k_t)``, a
  max-plus scan that does not depend on the values (computed without gradient: ``p`` only fixes the
  scale). Given ``p``, the scaled state obeys a *linear* recurrence ``h_t = f_t h_{t-1} + x_t`` with
  ``0 <= f_t <= 1``. Both scans run chunk-wise (a short loop inside chunks of ~sqrt(T) steps,
  vectorised over chunks, then a short loop over chunk carries), so the sequential depth is
  ~2 sqrt(T) instead of T; the linear scan has a hand-written backward (the same scan reversed).
  Gradients reach the initial ``(a, b, p)`` and flow into the final ``p`` exactly as in the loop
  (the final scale is re-attached with a factor ``e^{p_hat - p} = 1``).
- ``T == 1`` (decoding) always runs one step of the loop: it is the cheapest form.

``wkv`` dispatches between them through ``rizzearch.ops.backends`` (op ``"wkv"``: ``reference``
or ``fast``; the table is ``docs/backends.md``).

An optional ``mask[B, T]`` (False = padding) makes padded steps leave the state untouched (no
decay, no contribution); their outputs are finite but meaningless.

Decoding a whole RWKV-4 model one token at a time (the eager step and the fused C kernel) is
model-level code: ``rizzearch.models.rwkv_decode``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rizzearch.errors import ShapeError
from rizzearch.ops import backends
from rizzearch.ops._common import compute_dtype

WKVState = tuple[Tensor, Tensor, Tensor]  # (numerator a, denominator b, max exponent p), each (B, C) fp32

EMPTY_MAX = -1e38  # p of the empty prefix (e^p == 0 in float32)


def init_wkv_state(batch_size: int, channels: int, device=None) -> WKVState:
    """The state before any token: ``a = b = 0``, ``p = -1e38``; float32, each (B, C)."""
    z = torch.zeros(batch_size, channels, dtype=torch.float32, device=device)
    return z, z.clone(), torch.full_like(z, EMPTY_MAX)


# ----------------------------------------------------------------------------------------------
# Input checks


def _check(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state, mask) -> None:
    if k.dim() != 3:
        raise ShapeError(f"wkv: k must have shape (B, T, C), got {tuple(k.shape)}")
    B, T, C = k.shape
    if tuple(v.shape) != (B, T, C):
        raise ShapeError(f"wkv: v must have the shape of k {(B, T, C)}, got {tuple(v.shape)}")
    for name, p in (("time_decay", time_decay), ("time_first", time_first)):
        if tuple(p.shape) != (C,):
            raise ShapeError(f"wkv: {name} must have shape ({C},) (one value per channel of k), got {tuple(p.shape)}")
    if not (k.is_floating_point() and v.is_floating_point()):
        raise ShapeError(f"wkv: k and v must be floating point, got {k.dtype} and {v.dtype}")
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ShapeError("wkv: state must be a tuple (numerator, denominator, max exponent) of (B, C) tensors")
        for name, s in zip(("numerator", "denominator", "max exponent"), state):
            if tuple(s.shape) != (B, C):
                raise ShapeError(f"wkv: state {name} must have shape {(B, C)}, got {tuple(s.shape)} (state from another batch or model?)")
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ShapeError(f"wkv: mask must have shape {(B, T)}, got {tuple(mask.shape)}")


def _state32(state, B: int, C: int, device, dtype=torch.float32) -> WKVState:
    if state is None:
        return tuple(s.to(dtype) for s in init_wkv_state(B, C, device))  # type: ignore[return-value]
    return tuple(s.to(dtype) for s in state)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Reference form: the loop (the spec)


def wkv_step(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state: WKVState, mask: Tensor | None = None):
    """One step of the stable recurrence. k, v: (B, C) -> (out (B, C) fp32, new state).

    Output (eq. 14 at one t): ``q = max(p, u + k)``,
    ``out = (e^{p-q} a + e^{u+k-q} v) / (e^{p-q} b + e^{u+k-q})``.
    Update: ``q' = max(p - w, k)``, ``a' = e^{p-w-q'} a + e^{k-q'} v``, ``b' = e^{p-w-q'} b + e^{k-q'}``,
    ``p' = q'``. Rows with ``mask == False`` keep their state.
    """
    a, b, p = state
    acc = compute_dtype(k.dtype)
    k, v = k.to(acc), v.to(acc)
    neg_w = -torch.exp(time_decay.to(acc))
    u = time_first.to(acc)
    ww = u + k
    q = torch.maximum(p, ww)
    e1 = torch.exp(p - q)
    e2 = torch.exp(ww - q)
    out = (e1 * a + e2 * v) / (e1 * b + e2)
    ww = p + neg_w
    q = torch.maximum(ww, k)
    e1 = torch.exp(ww - q)
    e2 = torch.exp(k - q)
    new = (e1 * a + e2 * v, e1 * b + e2, q)
    if mask is not None:
        m = mask.view(-1, 1).to(torch.bool)
        new = tuple(torch.where(m, n, o) for n, o in zip(new, (a, b, p)))
    return out, new


def wkv_ref(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state=None, mask: Tensor | None = None):
    """Reference: ``wkv_step`` in a Python loop over T. Returns (out (B, T, C) in v's dtype, state)."""
    _check(time_decay, time_first, k, v, state, mask)
    B, T, C = k.shape
    st = _state32(state, B, C, k.device, compute_dtype(k.dtype))
    outs = []
    for t in range(T):
        y, st = wkv_step(time_decay, time_first, k[:, t], v[:, t], st, None if mask is None else mask[:, t])
        outs.append(y)
    out = torch.stack(outs, 1) if outs else k.new_zeros(B, 0, C)
    return out.to(v.dtype), st


# ----------------------------------------------------------------------------------------------
# Fast form: closed-form max exponents + chunked linear scan


_GRAIN = 32768  # ATen's parallel grain size: smaller element-wise ops run on one thread


def _chunks(T: int, chunk: int | None, row: int = 1) -> tuple[int, int]:
    """Chunk length L and count N for a scan over T steps whose per-step slices have ``row`` elements.

    L ~ sqrt(T) minimises the L + N sequential steps. When N chunks side by side would make each
    step's op big enough to be split across threads (``N * row > _GRAIN``) we take fewer, longer
    chunks (up to 2x the steps): on a busy machine every multi-threaded tiny op waits for a thread.
    """
    if chunk:
        return chunk, -(-T // chunk)
    L = max(1, math.isqrt(max(T - 1, 0)) + 1)
    N = -(-T // L)
    cap = max(1, _GRAIN // max(row, 1))
    if N > cap and -(-T // cap) <= 2 * L:
        L = -(-T // cap)
        N = -(-T // L)
    return L, N


def _pad_time(t: Tensor, pad: int, value: float) -> Tensor:
    return torch.cat([t, t.new_full((t.shape[0], pad, *t.shape[2:]), value)], 1) if pad else t


def _linear_scan(f: Tensor, x: Tensor, h0: Tensor, chunk: int | None = None) -> Tensor:
    """Forward of ``linear_scan`` (no autograd)."""
    B, T = x.shape[:2]
    L, N = _chunks(T, chunk, x[:, 0].numel())
    pad = N * L - T  # padded steps carry the state through unchanged (f = 1, x = 0)
    f = _pad_time(f, pad, 1.0).reshape(B, N, L, *f.shape[2:])  # (B, N, L, ...) broadcastable against x
    x = _pad_time(x, pad, 0.0).reshape(B, N, L, *x.shape[2:])
    hl = torch.empty(torch.broadcast_shapes(f.shape, x.shape), dtype=x.dtype, device=x.device)  # (B, N, L, ...)
    hl[:, :, 0] = x[:, :, 0]
    for s in range(1, L):  # scan inside every chunk at once, from a zero state
        torch.addcmul(x[:, :, s], f[:, :, s], hl[:, :, s - 1], out=hl[:, :, s])
    fc = torch.cumprod(f, 2)  # (B, N, L, ...) decay from the chunk start to each step
    carry = torch.empty_like(hl[:, :, 0])  # (B, N, ...) state entering each chunk
    h = h0.expand_as(carry[:, 0])
    for n in range(N):  # carry the state across chunks
        carry[:, n] = h
        h = torch.addcmul(hl[:, n, -1], fc[:, n, -1], h)
    out = hl.addcmul_(fc, carry[:, :, None])  # (B, N, L, ...)
    return out.reshape(B, N * L, *out.shape[3:])[:, :T]


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    while t.dim() > len(shape):
        t = t.sum(0)
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dims, keepdim=True) if dims else t


class _LinearScan(torch.autograd.Function):
    """``h_t = f_t h_{t-1} + x_t`` with a hand-written backward: the adjoint is the same scan reversed,
    ``lam_t = g_t + f_{t+1} lam_{t+1}``; then ``dx = lam``, ``df_t = lam_t h_{t-1}``, ``dh0 = f_0 lam_0``."""

    @staticmethod
    def forward(ctx, f, x, h0, chunk):
        h = _linear_scan(f, x, h0, chunk)
        ctx.save_for_backward(f, h, h0)
        ctx.chunk, ctx.x_shape = chunk, x.shape
        return h

    @staticmethod
    def backward(ctx, g):
        f, h, h0 = ctx.saved_tensors
        f_next = torch.cat([f[:, 1:], torch.zeros_like(f[:, :1])], 1)  # (B, T, ...) f_{t+1}
        lam = _linear_scan(f_next.flip(1), g.flip(1), torch.zeros_like(g[:, 0]), ctx.chunk).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1).expand_as(h[:, :1]), h[:, :-1]], 1)
        df = _sum_to(lam * h_prev, f.shape) if ctx.needs_input_grad[0] else None
        dx = _sum_to(lam, ctx.x_shape) if ctx.needs_input_grad[1] else None
        dh0 = _sum_to(f[:, 0] * lam[:, 0], h0.shape) if ctx.needs_input_grad[2] else None
        return df, dx, dh0, None


def linear_scan(f: Tensor, x: Tensor, h0: Tensor, chunk: int | None = None) -> Tensor:
    """All states of ``h_t = f_t * h_{t-1} + x_t`` along dim 1. f, x: (B, T, ...); h0: (B, ...).

    Chunked: a loop of ``L`` steps inside chunks (vectorised over the ``N`` chunks), the in-chunk
    products ``cumprod(f)``, then a loop of ``N`` steps over chunk carries; ``L ~ N ~ sqrt(T)``.
    Stable for ``0 <= f <= 1`` (products only shrink). Differentiable in f, x and h0 (the
    backward is the reversed scan). Returns (B, T, ...) with x's shape.
    """
    if x.shape[1] == 0:
        return x
    return _LinearScan.apply(f, x, h0, chunk)


@torch.no_grad()
def max_plus_scan(d: Tensor, k: Tensor, p0: Tensor, chunk: int | None = None) -> Tensor:
    """All of ``p_t = max(p_{t-1} - d_t, k_t)`` along dim 1 (the WKV max exponents), chunked.

    d: (C,) or (B, T, C) decay per step; k: (B, T, C); p0: (B, C). Inside a chunk
    ``p_s = max(local_s, p_in - D_s)`` with ``D_s`` the in-chunk cumulative decay. No gradient.
    """
    B, T, C = k.shape
    L, N = _chunks(T, chunk, B * C)
    pad = N * L - T
    d = d.expand(B, T, C) if d.dim() == 1 else d
    d = _pad_time(d, pad, 0.0).reshape(B, N, L, C)  # (B, N, L, C)
    kk = _pad_time(k, pad, float("-inf")).reshape(B, N, L, C)
    local = torch.empty_like(kk)
    local[:, :, 0] = kk[:, :, 0]
    for s in range(1, L):
        torch.maximum(local[:, :, s - 1] - d[:, :, s], kk[:, :, s], out=local[:, :, s])
    D = d.cumsum(2)  # (B, N, L, C)
    carry = torch.empty_like(local[:, :, 0])  # (B, N, C)
    p = p0
    for n in range(N):
        carry[:, n] = p
        p = torch.maximum(local[:, n, -1], p - D[:, n, -1])
    out = torch.maximum(local, carry[:, :, None] - D)
    return out.reshape(B, N * L, C)[:, :T]


def wkv_chunked(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state=None, mask: Tensor | None = None, chunk: int | None = None):
    """Fast form (see module docstring). Same arguments and results as ``wkv_ref``."""
    _check(time_decay, time_first, k, v, state, mask)
    B, T, C = k.shape
    acc = compute_dtype(k.dtype)
    a0, b0, p0 = _state32(state, B, C, k.device, acc)
    if T == 0:
        return v.new_zeros(B, 0, C), (a0, b0, p0)
    p0 = p0.clamp_min(EMPTY_MAX)  # -inf behaves like -1e38 but keeps differences finite
    kf, vf = k.to(acc), v.to(acc)
    w = torch.exp(time_decay.to(acc))  # (C,)
    u = time_first.to(acc)
    live = None if mask is None else mask.to(torch.bool)[..., None]  # (B, T, 1)
    decay = w if live is None else w * live  # (C,) or (B, T, C): padded steps do not decay
    k_live = kf if live is None else kf.masked_fill(~live, float("-inf"))  # padded steps add nothing

    # Max exponents p_t = max(p_{t-1} - w, k_t) (the stabiliser; no gradient flows through it).
    p_hat = max_plus_scan(decay.detach(), k_live.detach(), p0.detach(), chunk)  # (B, T, C)
    p_prev = torch.cat([p0[:, None], p_hat[:, :-1]], 1)  # (B, T, C); p0 keeps its gradient

    # Scaled state a_t = A_t e^{-p_t}:  a_t = f_t a_{t-1} + g_t v_t  with f = e^{p_{t-1} - w - p_t}, g = e^{k_t - p_t}.
    f = torch.exp(p_prev - decay - p_hat)  # (B, T, C)
    g = torch.exp(k_live - p_hat)
    h0 = torch.stack([a0, b0], 1)  # (B, 2, C)
    h = linear_scan(f[:, :, None], torch.stack([g * vf, g], 2), h0, chunk)  # (B, T, 2, C)

    # Outputs from the state before each step, stabilised by q = max(p_{t-1}, u + k_t) (no gradient needed).
    h_prev = torch.cat([h0[:, None], h[:, :-1]], 1)  # (B, T, 2, C)
    uk = u + kf
    q = torch.maximum(p_prev, uk).detach()
    e1 = torch.exp(p_prev - q)
    e2 = torch.exp(uk - q)
    out = (e1 * h_prev[:, :, 0] + e2 * vf) / (e1 * h_prev[:, :, 1] + e2)

    # Final state: re-attach the differentiable max exponent p_T = k_i* - (n_T - n_i*) w (or p0 - n_T w),
    # n_t = live steps in 0..t. i* maximises k_i - (n_T - n_i) w, measured from the end so that every
    # candidate near the maximum is a small number (no cancellation in float32).
    with torch.no_grad():
        steps = torch.arange(1, T + 1, device=k.device, dtype=acc)[None, :, None] if live is None else live.to(acc).cumsum(1)
        n_T = steps[:, -1:]  # (1 or B, 1, 1)
        best, last_idx = torch.addcmul(k_live, n_T - steps, w, value=-1.0).max(1, keepdim=True)  # (B, 1, C)
        from_init = (p0[:, None] - n_T * w) > best  # (B, 1, C) the initial state still holds the max
        n_i = steps.expand(B, T, C).gather(1, last_idx)  # (B, 1, C)
    p_tok = kf.gather(1, last_idx) - (n_T - n_i) * w  # (B, 1, C)
    p_fin = torch.where(from_init, p0[:, None] - n_T * w, p_tok)[:, 0]  # (B, C)
    scale = torch.exp(p_hat[:, -1] - p_fin)  # == 1 up to rounding; carries d/dp_fin
    return out.to(v.dtype), (h[:, -1, 0] * scale, h[:, -1, 1] * scale, p_fin)


# ----------------------------------------------------------------------------------------------
# Dispatch


def wkv(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state=None, mask: Tensor | None = None, *, backend: str | None = None):
    """WKV over a sequence (eq. 14), continuing from ``state``.

    Args:
        time_decay: (C,) log of the decay rate ``w`` (per-step factor ``exp(-exp(time_decay))``).
        time_first: (C,) bonus ``u`` for the current token.
        k, v: (B, T, C), any float dtype; any T >= 0.
        state: ``(numerator, denominator, max exponent)``, each (B, C), or None for the empty prefix.
        mask: optional (B, T) bool, False = padding (the state skips that step).
        backend: ``"reference"`` (``wkv_ref``) or ``"fast"`` (``wkv_chunked``) for T > 1; ``None``
            uses the default of op ``"wkv"`` (``rizzearch.ops.backends``).

    Returns:
        ``(out, state)``: out (B, T, C) in v's dtype; the final state in float32.
    """
    _check(time_decay, time_first, k, v, state, mask)
    fast = backends.resolve("wkv", backend) == "fast"
    B, T, C = k.shape
    if T == 1:
        st = _state32(state, B, C, k.device, compute_dtype(k.dtype))
        y, st = wkv_step(time_decay, time_first, k[:, 0], v[:, 0], st, None if mask is None else mask[:, 0])
        return y[:, None].to(v.dtype), st
    fn = wkv_chunked if fast else wkv_ref
    return fn(time_decay, time_first, k, v, state, mask)
