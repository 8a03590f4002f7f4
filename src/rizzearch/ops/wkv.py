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

``wkv`` dispatches: the fast form is chosen at import (override with the environment variable
``RIZZ_WKV_FORM=reference|chunked`` or ``set_wkv_form``/``wkv(..., form=...)`` in tests).

An optional ``mask[B, T]`` (False = padding) makes padded steps leave the state untouched (no
decay, no contribution); their outputs are finite but meaningless.

The end of the module holds a fused CPU kernel for decoding (one token through the whole RWKV-4
model in one C call, multi-threaded with OpenMP, compiled with the system C compiler on first use
and cached; ``RWKV`` falls back to its eager step when it is unavailable or
``RIZZ_RWKV_DECODE=eager``).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
from torch import Tensor

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.ops._common import build_c_library, c_compiler, compute_dtype

WKVState = tuple[Tensor, Tensor, Tensor]  # (numerator a, denominator b, max exponent p), each (B, C) fp32

EMPTY_MAX = -1e38  # p of the empty prefix (e^p == 0 in float32)

FORMS = ("reference", "chunked")


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


def _check_form(form: str, where: str = "wkv form") -> str:
    if form not in FORMS:
        raise ConfigError(f"{where}: expected one of {list(FORMS)}, got {form!r}")
    return form


_FORM = _check_form(os.environ.get("RIZZ_WKV_FORM", "chunked"), "RIZZ_WKV_FORM")


def set_wkv_form(form: str) -> None:
    """Choose the form ``wkv`` uses for T > 1 ("reference" or "chunked")."""
    global _FORM
    _FORM = _check_form(form)


@contextmanager
def wkv_form(form: str):
    """Temporarily use another form (tests, benchmarks)."""
    old = _FORM
    set_wkv_form(form)
    try:
        yield
    finally:
        set_wkv_form(old)


def wkv(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state=None, mask: Tensor | None = None, *, form: str | None = None):
    """WKV over a sequence (eq. 14), continuing from ``state``.

    Args:
        time_decay: (C,) log of the decay rate ``w`` (per-step factor ``exp(-exp(time_decay))``).
        time_first: (C,) bonus ``u`` for the current token.
        k, v: (B, T, C), any float dtype; any T >= 0.
        state: ``(numerator, denominator, max exponent)``, each (B, C), or None for the empty prefix.
        mask: optional (B, T) bool, False = padding (the state skips that step).
        form: force "reference" or "chunked" (default: chosen at import).

    Returns:
        ``(out, state)``: out (B, T, C) in v's dtype; the final state in float32.
    """
    _check(time_decay, time_first, k, v, state, mask)
    B, T, C = k.shape
    if T == 1:
        st = _state32(state, B, C, k.device, compute_dtype(k.dtype))
        y, st = wkv_step(time_decay, time_first, k[:, 0], v[:, 0], st, None if mask is None else mask[:, 0])
        return y[:, None].to(v.dtype), st
    fn = wkv_chunked if _check_form(form or _FORM) == "chunked" else wkv_ref
    return fn(time_decay, time_first, k, v, state, mask)


# ----------------------------------------------------------------------------------------------
# Fused CPU decoding step (one token through the whole RWKV-4 model), C compiled on first use
#
# Batch-1 decoding is dominated by per-op overhead and by streaming the weights once per token;
# eager PyTorch spends ~30 small kernels per layer on the glue around 5 matrix-vector products.
# This kernel runs the whole token (embedding, ln0, every layer's ln1, token-shift mixes, r/k/v,
# the WKV step of ``wkv_step``, the sigmoid gate, output, ln2 and channel mix, then ln_out and the
# head) in one C call, reading each weight matrix once for all rows of the batch, straight from
# the parameters (nn.Linear's (out, in) layout: every output is one dot product, no weight copies).
#
# Threads: with OpenMP (gcc/clang ``-fopenmp``) the call opens one parallel region; every matrix
# product splits its *outputs* across the threads (each thread streams its own rows of every
# weight matrix, the same rows every token), and the element-wise work follows the same split. The
# small row-wide steps (the LayerNorms and token-shift mixes, ~1 us) are computed by every thread
# into private buffers instead of being shared, so a layer needs three barriers: after the WKV
# gate (the output product reads all channels), after the output product (ln2 reads the whole
# residual) and after the channel mix (the next ln1). Torch's own OpenMP runtime is reused (same
# ``libgomp.so.1``), so the thread count follows ``torch.set_num_threads``. Without OpenMP the
# pragmas are ignored and the kernel runs on one thread. Float32, CPU, contiguous tensors only;
# ``RWKV`` falls back to its eager decoding path whenever the kernel cannot be built (no C compiler)
# or does not apply. The arithmetic is the same as the eager step up to summation order (tests
# compare them, on 1, 2 and 3 threads).

_DECODE_C = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vf __attribute__((vector_size(64)));  /* 16 floats; narrower CPUs split it */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

static inline float vsum(vf v) {
    float t[16];
    memcpy(t, &v, sizeof t);
    for (int l = 0; l < 8; l++) t[l] += t[l + 8];
    for (int l = 0; l < 4; l++) t[l] += t[l + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}

typedef struct {
    float eps1, eps2;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *mix_r, *mix_k, *mix_v;   /* (C) */
    const float *w_r, *w_k, *w_v;         /* (A, C): nn.Linear layout, row j = output j */
    const float *w_o;                     /* (C, A) */
    const float *u, *neg_w;               /* (A) time_first, -exp(time_decay) */
    const float *fmix_k, *fmix_r;         /* (C) */
    const float *w_fk;                    /* (F, C) */
    const float *w_fr;                    /* (C, C) */
    const float *w_fv;                    /* (C, F) */
} Layer;

typedef struct {
    int L, C, A, F, V, n_emb;
    float eps0, eps_out;
    const float *emb;                     /* (n_emb, C) */
    const float *ln0_w, *ln0_b, *lnout_w, *lnout_b;
    const float *head;                    /* (V, C) */
    const Layer *layers;                  /* (L) */
} Model;

static void layer_norm(const float *x, const float *w, const float *b, float eps, int n, float *out) {
    float mean = 0.f, var = 0.f;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) { float d = x[i] - mean; var += d * d; }
    var /= n;
    const float r = 1.f / sqrtf(var + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * r * w[i] + b[i];  /* in place is fine */
}

/* Y[b, j] = W[j, :] . X[b, :] for j in [j0, j1), b < B. W (n_out, n_in) row-major, X (B, n_in),
   Y rows ldy apart. Four weight rows at a time (four independent sums; X loaded once for them);
   the rows stay in cache while every row of X goes through them. */
static void dots(const float *W, int n_in, const float *X, int B, int j0, int j1, float *Y, int ldy) {
    const int n16 = n_in & ~15;
    int j = j0;
    for (; j + 4 <= j1; j += 4) {
        const float *w0 = W + (size_t)j * n_in, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
        for (int b = 0; b < B; b++) {
            const float *x = X + (size_t)b * n_in;
            vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (int i = 0; i < n16; i += 16) {
                const vf xv = vload(x + i);
                s0 += vload(w0 + i) * xv;
                s1 += vload(w1 + i) * xv;
                s2 += vload(w2 + i) * xv;
                s3 += vload(w3 + i) * xv;
            }
            float t0 = vsum(s0), t1 = vsum(s1), t2 = vsum(s2), t3 = vsum(s3);
            for (int i = n16; i < n_in; i++) { t0 += w0[i] * x[i]; t1 += w1[i] * x[i]; t2 += w2[i] * x[i]; t3 += w3[i] * x[i]; }
            float *y = Y + (size_t)b * ldy + j;
            y[0] = t0; y[1] = t1; y[2] = t2; y[3] = t3;
        }
    }
    for (; j < j1; j++) {
        const float *w0 = W + (size_t)j * n_in;
        for (int b = 0; b < B; b++) {
            const float *x = X + (size_t)b * n_in;
            vf s0 = {0};
            for (int i = 0; i < n16; i += 16) s0 += vload(w0 + i) * vload(x + i);
            float t0 = vsum(s0);
            for (int i = n16; i < n_in; i++) t0 += w0[i] * x[i];
            Y[(size_t)b * ldy + j] = t0;
        }
    }
}

/* This thread's share [lo, hi) of n outputs: contiguous, cut at multiples of 16 (cache lines). */
static void share(int n, int nt, int t, int *lo, int *hi) {
    const int chunk = ((n + nt - 1) / nt + 15) & ~15;
    int a = t * chunk, b = a + chunk;
    *lo = a < n ? a : n;
    *hi = b < n ? b : n;
}

int rwkv_threads_available(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* One token for B rows through the whole model.
   st_in: 5 * L pointers (att_x[0..L), num[0..L), den, max, ffn_x), each (B, C) or (B, A), read only.
   out_*: (L, B, C) or (L, B, A), written (must not alias the inputs). logits: (B, V).
   scratch: B * (3C + 4A + F) + nthreads * 4 * B * C floats.
   Returns 0, or 1 + the first row whose token is outside [0, n_emb) (nothing is computed). */
int rwkv_step(const Model *M, int B, int nthreads, const int64_t *tokens, float *const *st_in,
              float *out_att, float *out_num, float *out_den, float *out_max, float *out_ffn,
              float *logits, float *scratch) {
    const int L = M->L, C = M->C, A = M->A, F = M->F, V = M->V;
    for (int b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= M->n_emb) return b + 1;
    const size_t BC = (size_t)B * C, BA = (size_t)B * A;
    /* shared: residual x, its update y, channel-mix gate rr (B, C); r, k, v, gated wkv g (B, A); kf (B, F) */
    float *x = scratch, *y = x + BC, *rr = y + BC, *r = rr + BC, *k = r + BA, *v = k + BA, *g = v + BA;
    float *kf = g + BA, *priv = kf + (size_t)B * F;
#pragma omp parallel num_threads(nthreads)
    {
        int nt = 1, tid = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        tid = omp_get_thread_num();
#endif
        float *xx = priv + (size_t)tid * 4 * BC, *m0 = xx + BC, *m1 = m0 + BC, *m2 = m1 + BC;
        int c0, c1, a0, a1, f0, f1, v0, v1;
        share(C, nt, tid, &c0, &c1);
        share(A, nt, tid, &a0, &a1);
        share(F, nt, tid, &f0, &f1);
        share(V, nt, tid, &v0, &v1);
        /* x = ln0(emb[token]): every thread computes all of it privately and writes its columns */
        for (int b = 0; b < B; b++) {
            layer_norm(M->emb + (size_t)tokens[b] * C, M->ln0_w, M->ln0_b, M->eps0, C, xx + b * C);
            memcpy(x + b * C + c0, xx + b * C + c0, sizeof(float) * (c1 - c0));
        }
        for (int l = 0; l < L; l++) {
            const Layer *P = M->layers + l;
            const float *sx = st_in[l], *num = st_in[L + l], *den = st_in[2 * L + l], *mx = st_in[3 * L + l];
            const float *sf = st_in[4 * L + l];
            float *num_o = out_num + l * BA, *den_o = out_den + l * BA, *mx_o = out_max + l * BA;
            /* time mix: ln1 and the token-shift lerps (private), r/k/v for this thread's channels */
            for (int b = 0; b < B; b++) {
                layer_norm(l == 0 ? xx + b * C : x + b * C, P->ln1_w, P->ln1_b, P->eps1, C, xx + b * C);
                for (int c = 0; c < C; c++) {
                    const size_t i = (size_t)b * C + c;
                    const float d = xx[i] - sx[i];
                    m0[i] = sx[i] + P->mix_r[c] * d;
                    m1[i] = sx[i] + P->mix_k[c] * d;
                    m2[i] = sx[i] + P->mix_v[c] * d;
                }
            }
            if (tid == 0) memcpy(out_att + l * BC, xx, sizeof(float) * BC);
            dots(P->w_r, C, m0, B, a0, a1, r, A);
            dots(P->w_k, C, m1, B, a0, a1, k, A);
            dots(P->w_v, C, m2, B, a0, a1, v, A);
            for (int b = 0; b < B; b++) {
                for (int a = a0; a < a1; a++) {  /* eq. 14, one step (wkv_step) */
                    const size_t i = (size_t)b * A + a;
                    const float pp = mx[i], kk = k[i], vv = v[i], aa = num[i], bb = den[i];
                    float ww = P->u[a] + kk, q = pp > ww ? pp : ww;
                    float e1 = expf(pp - q), e2 = expf(ww - q);
                    const float out = (e1 * aa + e2 * vv) / (e1 * bb + e2);
                    ww = pp + P->neg_w[a];
                    q = ww > kk ? ww : kk;
                    e1 = expf(ww - q);
                    e2 = expf(kk - q);
                    num_o[i] = e1 * aa + e2 * vv;
                    den_o[i] = e1 * bb + e2;
                    mx_o[i] = q;
                    g[i] = out / (1.f + expf(-r[i]));
                }
            }
#pragma omp barrier
            dots(P->w_o, A, g, B, c0, c1, y, C);
            for (int b = 0; b < B; b++)
                for (int c = c0; c < c1; c++) x[(size_t)b * C + c] += y[(size_t)b * C + c];
#pragma omp barrier
            /* channel mix: ln2 and lerps (private), squared-ReLU keys and receptance for this thread's share */
            for (int b = 0; b < B; b++) {
                layer_norm(x + b * C, P->ln2_w, P->ln2_b, P->eps2, C, xx + b * C);
                for (int c = 0; c < C; c++) {
                    const size_t i = (size_t)b * C + c;
                    const float d = xx[i] - sf[i];
                    m0[i] = sf[i] + P->fmix_k[c] * d;
                    m1[i] = sf[i] + P->fmix_r[c] * d;
                }
            }
            if (tid == 0) memcpy(out_ffn + l * BC, xx, sizeof(float) * BC);
            dots(P->w_fk, C, m0, B, f0, f1, kf, F);
            for (int b = 0; b < B; b++)
                for (int f = f0; f < f1; f++) { const float t = kf[(size_t)b * F + f] > 0.f ? kf[(size_t)b * F + f] : 0.f; kf[(size_t)b * F + f] = t * t; }
            dots(P->w_fr, C, m1, B, c0, c1, rr, C);
#pragma omp barrier
            dots(P->w_fv, F, kf, B, c0, c1, y, C);
            for (int b = 0; b < B; b++)
                for (int c = c0; c < c1; c++) {
                    const size_t i = (size_t)b * C + c;
                    x[i] += y[i] / (1.f + expf(-rr[i]));
                }
#pragma omp barrier
        }
        for (int b = 0; b < B; b++) layer_norm(x + b * C, M->lnout_w, M->lnout_b, M->eps_out, C, xx + b * C);
        dots(M->head, C, xx, B, v0, v1, logits, V);
    }
    return 0;
}
"""

_DECODE_LIB = None  # ctypes library; False once building failed or disabled
MAX_FUSED_BATCH = 16  # larger batches are better served by BLAS matrix-matrix products (eager path)
# Below this many matrix weights per layer a token takes a few microseconds per layer and the
# barriers of a multi-threaded call cost more than they save: such models decode on one thread.
THREADED_MIN_ELEMENTS = 200_000
_DECODE_THREADS: int | None = None  # forced thread count (tests, benchmarks); None = the policy above


def decode_library():
    """Build (once, cached on disk) and load the fused decoding kernel; None when unavailable.

    Compiled with OpenMP when the compiler supports it (``-fopenmp``), else single-threaded.
    """
    global _DECODE_LIB
    if _DECODE_LIB is not None:
        return _DECODE_LIB or None
    if os.environ.get("RIZZ_RWKV_DECODE", "fused") != "fused":
        _DECODE_LIB = False
        return None
    import ctypes
    import platform
    import subprocess

    try:
        cc = c_compiler()
        if cc is None:
            raise OSError("no C compiler")
        base = ["-O3", "-march=native", "-fno-math-errno"]
        cpu = platform.machine() + platform.processor()  # -march=native: one build per CPU model
        try:
            with open("/proc/cpuinfo") as f:
                cpu += next((line for line in f if line.startswith("model name")), "")
        except OSError:
            pass
        try:
            lib_path = build_c_library(_DECODE_C, "rwkv_decode", cc, [*base, "-fopenmp"], tag_extra=cpu)
        except (OSError, subprocess.SubprocessError):  # no OpenMP (e.g. Apple clang): one thread
            lib_path = build_c_library(_DECODE_C, "rwkv_decode", cc, base, tag_extra=cpu)
        lib = ctypes.CDLL(str(lib_path))
        fn = lib.rwkv_step
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 9
        lib.rwkv_threads_available.restype = ctypes.c_int
        lib.openmp = bool(lib.rwkv_threads_available())
        _DECODE_LIB = lib
    except (OSError, subprocess.SubprocessError):
        _DECODE_LIB = False
    return _DECODE_LIB or None


class FusedModel:
    """Pointers to an RWKV-4 model's float32 weights (used in place, no copies) + the C structs.

    Built from a ``rizzearch.models.rwkv.RWKV`` (its ``emb``, ``ln0``, ``blocks``, ``ln_out``,
    ``head``). Parameters are read in place, so in-place updates are seen; the model rebuilds this
    when a parameter gets new storage or ``is_current()`` is False (a derived or copied value is stale).
    """

    def __init__(self, model) -> None:
        import ctypes

        derived: list[tuple[Tensor, int]] = []  # (parameter, version) of every value computed from one

        def f32(t):  # the parameter itself when already float32 and contiguous, else a copy
            out = t.detach().float().contiguous()
            if out.data_ptr() != t.data_ptr():
                derived.append((t, t._version))
            return out

        keep: list[Tensor] = []  # keeps every pointed-to tensor alive

        def ptr(t):
            keep.append(t)
            return t.data_ptr()

        p = ctypes.c_void_p
        layer_fields = ["ln1_w", "ln1_b", "ln2_w", "ln2_b", "mix_r", "mix_k", "mix_v", "w_r", "w_k", "w_v", "w_o",
                        "u", "neg_w", "fmix_k", "fmix_r", "w_fk", "w_fr", "w_fv"]  # fmt: skip

        class Layer(ctypes.Structure):
            _fields_ = [("eps1", ctypes.c_float), ("eps2", ctypes.c_float)] + [(n, p) for n in layer_fields]

        class Model(ctypes.Structure):
            _fields_ = [(n, ctypes.c_int) for n in ("L", "C", "A", "F", "V", "n_emb")]
            _fields_ += [("eps0", ctypes.c_float), ("eps_out", ctypes.c_float)]
            _fields_ += [(n, p) for n in ("emb", "ln0_w", "ln0_b", "lnout_w", "lnout_b", "head", "layers")]

        layers = (Layer * len(model.blocks))()
        for i, block in enumerate(model.blocks):
            att, ffn = block.att, block.ffn
            w = {
                "ln1_w": block.ln1.weight, "ln1_b": block.ln1.bias, "ln2_w": block.ln2.weight, "ln2_b": block.ln2.bias,
                "mix_r": att.time_mix_r, "mix_k": att.time_mix_k, "mix_v": att.time_mix_v,
                "w_r": att.receptance.weight, "w_k": att.key.weight, "w_v": att.value.weight, "w_o": att.output.weight,
                "u": att.time_first, "neg_w": -torch.exp(att.time_decay.detach().float()),  # derived: see below
                "fmix_k": ffn.time_mix_k, "fmix_r": ffn.time_mix_r,
                "w_fk": ffn.key.weight, "w_fr": ffn.receptance.weight, "w_fv": ffn.value.weight,
            }  # fmt: skip
            layers[i] = Layer(block.ln1.eps, block.ln2.eps, *(ptr(f32(w[n])) for n in layer_fields))
            derived.append((att.time_decay, att.time_decay._version))
        blk = model.blocks[0]
        self.C, self.A, self.F = blk.att.key.in_features, blk.att.key.out_features, blk.ffn.key.out_features
        self.L, self.V = len(model.blocks), model.head.out_features
        self.struct = Model(
            self.L, self.C, self.A, self.F, self.V, model.emb.num_embeddings, model.ln0.eps, model.ln_out.eps,
            ptr(f32(model.emb.weight)), ptr(f32(model.ln0.weight)), ptr(f32(model.ln0.bias)),
            ptr(f32(model.ln_out.weight)), ptr(f32(model.ln_out.bias)), ptr(f32(model.head.weight)),
            ctypes.cast(layers, p),
        )  # fmt: skip
        self.layers = layers
        self.keep = keep
        self.derived = derived
        self.ref = ctypes.byref(self.struct)
        self.scratch = torch.empty(0, dtype=torch.float32)
        self.layer_elements = self.C * (4 * self.A + 2 * self.F + self.C)  # matrix weights per layer

    def is_current(self) -> bool:
        """False once a parameter that a copied or derived value came from was changed in place."""
        return all(p._version == v for p, v in self.derived)


def decode_threads(fm: FusedModel) -> int:
    """Threads for one fused call: torch's thread count for layers big enough to gain, else 1."""
    if _DECODE_THREADS is not None:
        return _DECODE_THREADS
    n = torch.get_num_threads()
    return n if n > 1 and fm.layer_elements >= THREADED_MIN_ELEMENTS and _DECODE_LIB and _DECODE_LIB.openmp else 1


def fused_step(lib, fm: FusedModel, tokens: Tensor, state: dict, threads: int | None = None):
    """One token per row through the whole model in one C call.

    tokens: (B,) int64; state: the RWKV state dict (lists of (B, C)/(B, A) tensors per layer,
    float32). Returns (logits (B, V) float32, new state); the new state's per-layer tensors are
    views of one (L, B, width) buffer per key. Raises IndexError for a token outside the
    embedding table (like ``nn.Embedding``).
    """
    import ctypes

    B = tokens.shape[0]
    L, C, A = fm.L, fm.C, fm.A
    nt = threads if threads is not None else decode_threads(fm)
    need = B * (3 * C + 4 * A + fm.F) + nt * 4 * B * C
    if fm.scratch.numel() < need:  # working memory, reused across calls
        fm.scratch = torch.empty(need, dtype=torch.float32)
    f32 = torch.float32
    ins = []
    for key in ("att_x", "num", "den", "max", "ffn_x"):
        for t in state[key]:
            ins.append(t if t.dtype == f32 and t.is_contiguous() else t.to(f32).contiguous())
    ptrs = (ctypes.c_void_p * len(ins))(*[t.data_ptr() for t in ins])
    tok = tokens if tokens.dtype == torch.int64 and tokens.is_contiguous() else tokens.to(torch.int64).contiguous()
    outs = [torch.empty(L, B, C, dtype=f32), torch.empty(L, B, A, dtype=f32), torch.empty(L, B, A, dtype=f32),
            torch.empty(L, B, A, dtype=f32), torch.empty(L, B, C, dtype=f32)]  # fmt: skip
    logits = torch.empty(B, fm.V, dtype=f32)
    bad = lib.rwkv_step(fm.ref, B, nt, tok.data_ptr(), ptrs, *[t.data_ptr() for t in outs], logits.data_ptr(), fm.scratch.data_ptr())
    if bad:
        raise IndexError(f"token {int(tok[bad - 1])} in row {bad - 1} is outside the vocabulary [0, {fm.struct.n_emb})")
    new = {key: list(t.unbind(0)) for key, t in zip(("att_x", "num", "den", "max", "ffn_x"), outs)}
    return logits, new


@contextmanager
def fused_decode(enabled: bool, threads: int | None = None):
    """Temporarily enable/disable the fused C decoding kernel (tests, benchmarks); ``threads``
    forces its thread count (default: ``decode_threads``)."""
    global _DECODE_LIB, _DECODE_THREADS
    old, old_threads = _DECODE_LIB, _DECODE_THREADS
    if enabled:
        _DECODE_LIB = None if old is False else old
        lib = decode_library()
        if lib is None:
            _DECODE_LIB = old
            raise RuntimeError("the fused decoding kernel cannot be built here (no C compiler, or RIZZ_RWKV_DECODE is set)")
        _DECODE_THREADS = threads
    else:
        _DECODE_LIB = False
    try:
        yield
    finally:
        _DECODE_LIB, _DECODE_THREADS = old, old_threads
