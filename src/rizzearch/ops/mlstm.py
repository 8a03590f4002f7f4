"""The mLSTM (matrix-memory LSTM) of Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory".

One recurrence, three forms that compute the same numbers:

- ``mlstm_parallel``: the quadratic form (paper, appendix "Parallel Formulation"): a log-space
  decay matrix ``log D[t, s] = F_t - F_s + i_s`` (``F`` = cumulative log forget gate), stabilised
  by its row-wise maximum.
- ``mlstm_chunkwise``: chunk-level states ``(C, n, m)`` carried from chunk to chunk plus the
  parallel form inside each chunk; any ``T`` (the last chunk may be short), an initial state in,
  the final state out. ``backend="reference"`` is the spec (a loop of ``mlstm_parallel`` calls with
  autograd); ``backend="fused"`` is one custom autograd Function over all chunks at once (no
  Python loop over chunks) with a hand-derived backward (``_MLSTMChunkwiseFn``).
- ``mlstm_step``: one token of the recurrent form (paper eqs. 19-27); ``backend="fused"`` runs a
  small C kernel for decoding (no gradient, float32, CPU) and batched torch ops otherwise.

The recurrence, per batch row and head, with ``k`` scaled by ``1/sqrt(Dqk)`` (paper eq. 22):

    m_t = max(log f_t + m_{t-1}, i_t)                      stabiliser (paper eq. 15, appendix)
    i'_t = exp(i_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t),  log f_t = logsigmoid(f~_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T                     (eq. 19)
    n_t = f'_t n_{t-1} + i'_t k_t                           (eq. 20)
    h_t = C_t^T q_t / max(|n_t^T q_t|, exp(-m_t))           (eq. 21 with the stabilised "1")

Numerics. States and stabilisers are kept in fp32 (fp64 inputs stay fp64) whatever the input
dtype; ``h`` is returned in the dtype of ``q``. The *empty* state is ``C = 0, n = 0, m = -inf``
(an exponent of minus infinity is a weight of zero), so ``initial_state=None`` and an explicit
empty state give identical numbers and the first token sets ``m_1 = i_1`` exactly like the
row-wise maximum of the parallel form. Unlike the official package we add no ``eps`` to the
normaliser: ``max(|n^T q|, exp(-m))`` is already positive, and without ``eps`` the output is
exactly invariant to the choice of stabiliser, so the three forms agree to rounding (the official
``+ 1e-6`` makes ``h`` depend on ``m``; a per-(row, head) scale that the model's group norm
removes, see ``docs/xlstm.md``).

Shapes: ``q, k: (B, NH, T, Dqk)``, ``v: (B, NH, T, Dv)``, gate pre-activations ``i, f: (B, NH, T)``;
state ``C: (B, NH, Dqk, Dv)``, ``n: (B, NH, Dqk)``, ``m: (B, NH)``.

Backend selection. ``BACKEND`` is chosen at import: ``"fused"`` after a tiny self-check against the
reference (falling back to ``"reference"`` if the check fails), overridable with the environment
variable ``RIZZ_MLSTM_BACKEND``, with ``set_backend()`` / ``use_backend()`` or with the
``backend=`` argument of each call (what the tests use).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ShapeError
from rizzearch.ops._common import backend_switch, build_c_library, c_compiler, compute_dtype, default_backend, no_autocast

__all__ = [
    "mlstm_parallel",
    "mlstm_chunkwise",
    "mlstm_step",
    "empty_state",
    "set_backend",
    "use_backend",
    "BACKENDS",
]

BACKENDS = ("reference", "fused")
BACKEND = "reference"  # replaced at import by default_backend()

State = tuple[Tensor, Tensor, Tensor]


# ----------------------------------------------------------------------------------------------
# Validation and small helpers


def _check_inputs(q, k, v, i, f, state, *, step: bool, name: str) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes; returns (B, NH, T, Dqk, Dv) (T = 1 for a step)."""
    for tname, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(t, Tensor):
            raise ShapeError(f"{name}: {tname} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ShapeError(f"{name}: {tname} must be a floating-point tensor, got {t.dtype}")
    nd = 3 if step else 4
    if q.dim() != nd:
        want = "(B, NH, Dqk)" if step else "(B, NH, T, Dqk)"
        raise ShapeError(f"{name}: q: expected shape {want}, got {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ShapeError(f"{name}: k: expected shape {tuple(q.shape)} (same as q), got {tuple(k.shape)}")
    if v.dim() != nd or v.shape[:-1] != q.shape[:-1]:
        want = "(" + ", ".join(str(d) for d in q.shape[:-1]) + ", Dv)"
        raise ShapeError(f"{name}: v: expected shape {want} (q's leading dims), got {tuple(v.shape)}")
    gate_shape = tuple(q.shape[:-1])
    for tname, t in (("i", i), ("f", f)):
        if tuple(t.shape) != gate_shape:
            raise ShapeError(f"{name}: {tname} (gate pre-activations): expected shape {gate_shape}, got {tuple(t.shape)}")
    for tname, t in (("k", k), ("v", v), ("i", i), ("f", f)):
        if t.device != q.device:
            raise ShapeError(f"{name}: {tname} is on {t.device} but q is on {q.device}")
    B, NH = q.shape[0], q.shape[1]
    T = 1 if step else q.shape[2]
    Dqk, Dv = q.shape[-1], v.shape[-1]
    if state is not None:
        _check_state(state, B, NH, Dqk, Dv, q.device, name)
    return B, NH, T, Dqk, Dv


def _check_state(state, B, NH, Dqk, Dv, device, name) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ShapeError(f"{name}: state must be a tuple (C, n, m), got {type(state).__name__}")
    for sname, t, want in (("C", state[0], (B, NH, Dqk, Dv)), ("n", state[1], (B, NH, Dqk)), ("m", state[2], (B, NH))):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ShapeError(f"{name}: state {sname} must be a floating-point tensor")
        if tuple(t.shape) != want:
            raise ShapeError(
                f"{name}: state {sname}: expected shape {want}, got {tuple(t.shape)} (state from another config or batch?)"
            )
        if t.device != device:
            raise ShapeError(f"{name}: state {sname} is on {t.device} but q is on {device}")


def empty_state(B: int, NH: int, Dqk: int, Dv: int, device=None, dtype=torch.float32) -> State:
    """The state before any token: ``C = 0, n = 0, m = -inf`` (a log-weight of minus infinity)."""
    return (
        torch.zeros(B, NH, Dqk, Dv, device=device, dtype=dtype),
        torch.zeros(B, NH, Dqk, device=device, dtype=dtype),
        torch.full((B, NH), float("-inf"), device=device, dtype=dtype),
    )


_resolve, set_backend, use_backend = backend_switch(__name__, "mLSTM")


# ----------------------------------------------------------------------------------------------
# Reference forms (the spec; differentiated by autograd)


@no_autocast
def mlstm_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    initial_state: State | None = None,
    return_state: bool = False,
):
    """Quadratic (parallel) mLSTM over a whole sequence.

    The decay matrix in log space (paper, appendix "parallel formulation"):
    ``log D[t, s] = F_t - F_s + i_s`` for ``s <= t`` (``-inf`` above the diagonal), where
    ``F_t = sum_{r <= t} logsigmoid(f_r)``. An initial state enters as one more column with
    log-weight ``m_0 + F_t``. Each row is stabilised by its maximum ``m_t`` (which equals the
    recurrent stabiliser), then ``h_t = sum_s D'_ts (q_t . k_s) v_s / max(|sum_s D'_ts q_t . k_s|, exp(-m_t))``.

    Args:
        q, k: (B, NH, T, Dqk) queries and keys (keys are scaled by 1/sqrt(Dqk) here).
        v: (B, NH, T, Dv) values.
        i, f: (B, NH, T) input and forget gate pre-activations.
        initial_state: optional (C, n, m) with shapes (B, NH, Dqk, Dv), (B, NH, Dqk), (B, NH).
        return_state: also return the final state (C, n, m) in fp32.

    Returns:
        h (B, NH, T, Dv) in q's dtype, and the final state when ``return_state``.
    """
    B, NH, T, Dqk, Dv = _check_inputs(q, k, v, i, f, initial_state, step=False, name="mlstm_parallel")
    dt = compute_dtype(q.dtype)
    if T == 0:
        h = q.new_zeros(B, NH, 0, Dv)
        st = initial_state if initial_state is not None else empty_state(B, NH, Dqk, Dv, q.device, dt)
        return (h, tuple(s.to(dt) for s in st)) if return_state else h
    qf, vf = q.to(dt), v.to(dt)
    kf = k.to(dt) / math.sqrt(Dqk)
    logf = F.logsigmoid(f.to(dt))
    Fc = logf.cumsum(-1)  # (B, NH, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    logD = Fc[..., :, None] - Fc[..., None, :] + i.to(dt)[..., None, :]  # (B, NH, T, T)
    logD = torch.where(causal, logD, torch.full_like(logD, float("-inf")))
    m = logD.amax(-1)  # (B, NH, T)
    if initial_state is not None:
        C0, n0, m0 = (s.to(dt) for s in initial_state)
        a = m0[..., None] + Fc  # (B, NH, T) log-weight of the initial state
        m = torch.maximum(m, a)
        w = torch.exp(a - m)
    P = torch.exp(logD - m[..., None])  # (B, NH, T, T)
    A = (qf @ kf.transpose(-1, -2)) * P  # (B, NH, T, T)
    num = A @ vf  # (B, NH, T, Dv)
    den = A.sum(-1)  # (B, NH, T)
    if initial_state is not None:
        num = num + w[..., None] * (qf @ C0)
        den = den + w * (qf @ n0[..., None])[..., 0]
    h = num / torch.maximum(den.abs(), torch.exp(-m))[..., None]
    if not return_state:
        return h.to(q.dtype)
    wT = P[..., -1, :]  # (B, NH, T): weights of every input at the last step
    C = (kf * wT[..., None]).transpose(-1, -2) @ vf  # (B, NH, Dqk, Dv)
    n = (kf * wT[..., None]).sum(-2)  # (B, NH, Dqk)
    if initial_state is not None:
        C = C + w[..., -1, None, None] * C0
        n = n + w[..., -1, None] * n0
    return h.to(q.dtype), (C, n, m[..., -1])


def _mlstm_chunkwise_reference(q, k, v, i, f, initial_state, chunk_size):
    """Spec of the chunkwise form: the parallel form inside each chunk, states between chunks."""
    B, NH, T, Dqk = q.shape
    state = initial_state
    hs = []
    for s in range(0, T, chunk_size):
        sl = slice(s, s + chunk_size)
        h, state = mlstm_parallel(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl], f[:, :, sl], initial_state=state, return_state=True)
        hs.append(h)
    return torch.cat(hs, 2), state


def _mlstm_step_reference(q, k, v, i, f, state):
    """One recurrent step, written as in the paper (eqs. 19-21 with the stabiliser)."""
    dt = compute_dtype(q.dtype)
    Dqk = q.shape[-1]
    C, n, m = (s.to(dt) for s in state)
    qf, vf = q.to(dt), v.to(dt)
    kf = k.to(dt) / math.sqrt(Dqk)
    logf = F.logsigmoid(f.to(dt))
    m_new = torch.maximum(logf + m, i.to(dt))  # (B, NH)
    fp = torch.exp(logf + m - m_new)
    ip = torch.exp(i.to(dt) - m_new)
    C_new = fp[..., None, None] * C + ip[..., None, None] * (kf[..., :, None] * vf[..., None, :])  # (B, NH, Dqk, Dv)
    n_new = fp[..., None] * n + ip[..., None] * kf  # (B, NH, Dqk)
    num = (qf[..., None, :] @ C_new)[..., 0, :]  # (B, NH, Dv)
    den = (qf * n_new).sum(-1)  # (B, NH)
    h = num / torch.maximum(den.abs(), torch.exp(-m_new))[..., None]
    return h.to(q.dtype), (C_new, n_new, m_new)


def _mlstm_step_fused(q, k, v, i, f, state):
    """The same step with fewer kernels: batched matmuls (baddbmm) on (B*NH) matrices."""
    dt = compute_dtype(q.dtype)
    B, NH, Dqk = q.shape
    Dv = v.shape[-1]
    C, n, m = (s.to(dt) for s in state)
    logf = F.logsigmoid(f.to(dt))
    i = i.to(dt)
    m_new = torch.maximum(logf + m, i)
    fp = torch.exp(logf + m - m_new).reshape(B * NH, 1, 1)
    ip = torch.exp(i - m_new)
    ks = (k.to(dt) * (ip / math.sqrt(Dqk))[..., None]).reshape(B * NH, Dqk, 1)  # i' k / sqrt(d)
    C_new = torch.baddbmm(C.reshape(B * NH, Dqk, Dv) * fp, ks, v.to(dt).reshape(B * NH, 1, Dv))  # (BH, Dqk, Dv)
    n_new = torch.addcmul(ks[..., 0], fp[..., 0], n.reshape(B * NH, Dqk))  # (BH, Dqk)
    qf = q.to(dt).reshape(B * NH, 1, Dqk)
    num = torch.bmm(qf, C_new)[:, 0]  # (BH, Dv)
    den = torch.bmm(qf, n_new[..., None])[:, 0]  # (BH, 1)
    h = num / torch.maximum(den.abs(), torch.exp(-m_new).reshape(B * NH, 1))
    return h.view(B, NH, Dv).to(q.dtype), (C_new.view(B, NH, Dqk, Dv), n_new.view(B, NH, Dqk), m_new)


# ----------------------------------------------------------------------------------------------
# Native decode step: a few lines of C, compiled once with the system C compiler (no torch headers,
# so it builds in well under a second), cached per user, called through ctypes. Inference only
# (no autograd), CPU, float32; anything else takes the torch step. One pass over C per head
# instead of ~15 separate kernels.

_STEP_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
/* one stabilised mLSTM step for BH independent heads (float32, contiguous); see mlstm.py */
void mlstm_step_f32(int64_t BH, int64_t D, int64_t E, float scale,
                    const float* q, const float* k, const float* v, const float* ig, const float* fg,
                    const float* C, const float* n, const float* m,
                    float* h, float* C_out, float* n_out, float* m_out) {
  for (int64_t b = 0; b < BH; ++b) {
    const float *qb = q + b * D, *kb = k + b * D, *vb = v + b * E, *Cb = C + b * D * E, *nb = n + b * D;
    float *hb = h + b * E, *Co = C_out + b * D * E, *no = n_out + b * D;
    float f = fg[b], i = ig[b];
    float logf = f >= 0.0f ? -log1pf(expf(-f)) : f - log1pf(expf(f));  /* logsigmoid */
    float a = logf + m[b];                                               /* -inf for the empty state */
    float mn = a > i ? a : i;
    float fp = expf(a - mn), ip = expf(i - mn) * scale, den = 0.0f;
    for (int64_t e = 0; e < E; ++e) hb[e] = 0.0f;
    for (int64_t r = 0; r < D; ++r) {
      float kk = kb[r] * ip, qr = qb[r];
      float nn = fp * nb[r] + kk;
      no[r] = nn;
      den += qr * nn;
      const float* Cr = Cb + r * E;
      float* Cor = Co + r * E;
      for (int64_t e = 0; e < E; ++e) {
        float c = fp * Cr[e] + kk * vb[e];
        Cor[e] = c;
        hb[e] += qr * c;
      }
    }
    float lo = expf(-mn), ad = fabsf(den), norm = ad > lo ? ad : lo;
    for (int64_t e = 0; e < E; ++e) hb[e] /= norm;
    m_out[b] = mn;
  }
}
"""

_native_lib = None  # ctypes handle, False after a failed build


def _native_step_lib():
    """Build (once per user and source version) and load the C step kernel; None if unavailable."""
    global _native_lib
    if _native_lib is not None:
        return _native_lib or None
    _native_lib = False
    cc = c_compiler()
    if not cc or os.environ.get("RIZZ_NO_NATIVE"):
        return None
    try:
        import ctypes

        handle = ctypes.CDLL(str(build_c_library(_STEP_C_SOURCE, "mlstm_step", cc, ["-O3"])))
        fn = handle.mlstm_step_f32
        fn.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 12
        fn.restype = None
        _native_lib = fn
    except Exception as e:  # no compiler, read-only home, ...: the torch step is always there
        warnings.warn(f"mLSTM native step unavailable ({type(e).__name__}: {e}); using the torch step", stacklevel=2)
    return _native_lib or None


def _native_ok(*tensors) -> bool:
    return (
        not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
    ) and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _mlstm_step_native(q, k, v, i, f, state):
    """The step through the C kernel (q, k, v, i, f and the state all float32 on the CPU)."""
    fn = _native_step_lib()
    B, NH, Dqk = q.shape
    Dv = v.shape[-1]
    ins = [t.contiguous() for t in (q, k, v, i, f, *state)]
    h = torch.empty(B, NH, Dv)
    C_out, n_out, m_out = torch.empty(B, NH, Dqk, Dv), torch.empty(B, NH, Dqk), torch.empty(B, NH)
    fn(B * NH, Dqk, Dv, 1.0 / math.sqrt(Dqk), *(t.data_ptr() for t in ins), h.data_ptr(), C_out.data_ptr(), n_out.data_ptr(), m_out.data_ptr())
    return h, (C_out, n_out, m_out)


# ----------------------------------------------------------------------------------------------
# Fused chunkwise: one autograd Function, hand-derived backward


def _chunk_view(x: Tensor, NC: int, L: int) -> Tensor:
    """(BH, T_pad, ...) -> (BH, NC, L, ...)."""
    return x.view(x.shape[0], NC, L, *x.shape[2:])


_EXP_FLOOR = -80.0  # exponents are clamped here before exp(): still a normal float32 (1.8e-35)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """sum_e x[..., e] y[..., e] as one batched (1 x n)(n x 1) matmul: one pass, no temporary
    (what einsum lowers it to, without einsum's parsing overhead)."""
    n = x.shape[-1]
    return torch.bmm(x.reshape(-1, 1, n), y.reshape(-1, n, 1)).view(x.shape[:-1])


def _segsum(x: Tensor) -> Tensor:
    """S[..., c, c'] = sum_{c' < r <= c} x[..., r] for c' <= c, -inf above the diagonal. x: (..., NC).

    Accumulated column by column (a cumsum of a masked matrix), so every entry is a short sum of
    the entries it spans, never a difference of two long prefix sums.
    """
    not_strict, upper = _segsum_masks(x.shape[-1], x.device)
    S = x[..., :, None].expand(*x.shape, x.shape[-1]).masked_fill(not_strict, 0.0).cumsum(-2)  # (..., NC, NC): rows c, cols c'
    return S.masked_fill(upper, float("-inf"))


@functools.lru_cache(maxsize=32)
def _segsum_masks(NC: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(r <= c' : not strictly below the diagonal, c' > c : above the diagonal), both (NC, NC) bool; read only."""
    ones = torch.ones(NC, NC, dtype=torch.bool, device=device)
    return ~ones.tril(-1), ~ones.tril()


def _decay_matrix(rb: Tensor, cg: Tensor, scale: float) -> Tensor:
    """P[..., j, l] = scale * exp(b_j - mrow_j - b_l + i_l) for l <= j, 0 above the diagonal.

    ``rb = b - mrow + log(scale)`` (row part), ``cg = i - b`` (column part), both (BH, NC, L).
    exp() takes a slow path (10x+) for -inf and for results below the normal range, so the
    exponent is clamped to [_EXP_FLOOR, 0] + log(scale) first (entries are <= 0 up to rounding;
    e^-80 ~ 1e-35 is negligible next to each row's maximum of 1), then the upper triangle is zeroed.
    """
    ls = math.log(scale)
    return torch.add(rb[..., :, None], cg[..., None, :]).clamp_(_EXP_FLOOR + ls, ls).exp_().tril_()  # (BH, NC, L, L)


def _chunk_starts(Wp: Tensor, W0p: Tensor, KV: Tensor, C0p: Tensor | None) -> Tensor:
    """Start state [C | n] of every chunk: ``Wp @ KV + W0p C0'`` -> (BH, NC, d, e1) (``C0p=None``: empty)."""
    BH, NC, d, e1 = KV.shape
    Cp = torch.matmul(Wp, KV.view(BH, NC, d * e1)).view(BH, NC, d, e1)
    return Cp if C0p is None else Cp.addcmul_(W0p[..., None, None], C0p[:, None])


class _MLSTMChunkwiseFn(torch.autograd.Function):
    """mLSTM chunkwise forward over all chunks at once; backward derived by hand (docs/xlstm.md).

    Inputs are fp32/fp64, already flattened to (BH, T, .), ``k`` unscaled (``scale`` = 1/sqrt(Dqk)
    is applied inside), ``logf`` already ``logsigmoid(f)``. The normaliser rides along as one more
    value column: with ``v' = [v | 1]`` the state ``C' = [C | n]`` (Dqk x (Dv + 1)) holds both
    eq. 19 and eq. 20, and every product with ``v'`` or ``C'`` yields the numerator and the
    denominator of eq. 21 at once. Per chunk, with ``b`` the within-chunk cumulative log forget gate:

        log D_jl = b_j - b_l + i_l  (l <= j)        row stabiliser mrow_j = max(max_l log D_jl, m_prev + b_j)
        P = exp(log D - mrow),  A = (q k^T) * P,   w_j = exp(m_prev + b_j - mrow_j)
        [num | den] = A v' + w q^T C'_prev,        h = num / max(|den|, exp(-mrow))

    The row maximum is a prefix maximum, ``b_j + cummax_l(i_l - b_l)``, so the L x L matrix is
    built in a few in-place passes (add, clamp, exp, tril) and never searched. Between chunks there
    is no Python loop: each chunk's input is summarised as ``KV_c = K^T diag(exp(g - mloc_c)) V'``
    (``g`` the log-weights at the chunk end, ``mloc_c`` their max), and the end state of every
    chunk is one matrix product over chunks, ``C_c = sum_{c' <= c} W[c, c'] KV_c' + W0[c] C_0``
    with ``W[c, c'] = exp(mloc_c' + sum_{c' < r <= c} B_r - m_c)`` (``B_r`` = total log forget of
    chunk r, ``m_c`` the row maximum = the recurrent stabiliser). The start states of the chunks
    come straight out of that product with ``W`` shifted down one row (no concatenation), and its
    backward needs no reverse scan either.

    Stabilisers are constants in the backward: ``h`` and the true (unstabilised) states do not
    depend on them, so their gradient paths cancel exactly; the one exception is the returned
    final ``m``, whose gradient (plus the implied rescaling of the returned ``C``, ``n``) is routed
    to the entry that attains the maximum.

    Speed (CPU): the work is twelve L x L x D batched matmuls (four forward, eight backward) plus
    small products over chunks and about twenty elementwise passes. What costs as much as the
    matmuls is memory: glibc hands large freed blocks back to the kernel, so every megabyte the
    call's peak footprint grows costs ~256 page faults (~0.5 ms on a VM) on each call. So the
    forward keeps only ``v'``, the chunk summaries ``KV`` and ``A``; the backward recomputes the
    cheap ``P``, gate-weighted keys and chunk-start states when it needs them, works in place and
    frees each temporary as soon as it is dead.

    Memory kept for the backward: ``v'``, ``KV`` (NC x Dqk x (Dv + 1) per head) and ``A`` (T L per
    head), never a T x T matrix.
    """

    @staticmethod
    def forward(ctx, q, k, v, ig, logf, C0, n0, m0, L: int, has_state: bool, scale: float, need_state: bool):
        ctx.set_materialize_grads(False)  # unused outputs (often the final state) arrive as None
        BH, T, d = q.shape
        e = v.shape[-1]
        e1 = e + 1
        NC = -(-T // L)
        pad = NC * L - T
        if pad:  # neutral tail: no input (i = -inf), no decay (log f = 0)
            q = F.pad(q, (0, 0, 0, pad))
            k = F.pad(k, (0, 0, 0, pad))
            ig = F.pad(ig, (0, pad), value=float("-inf"))
            logf = F.pad(logf, (0, pad), value=0.0)
        vp = q.new_empty(BH, NC * L, e1)  # v' = [v | 1]: the normaliser as one more value column
        vp[:, :T, :e] = v
        if pad:
            vp[:, T:, :e] = 0.0
        vp[..., e] = 1.0
        qc, kc, vpc = _chunk_view(q, NC, L), _chunk_view(k, NC, L), _chunk_view(vp, NC, L)
        b = logf.view(BH, NC, L).cumsum(-1)  # (BH, NC, L) within-chunk cumulative log forget
        Bc = b[..., -1]  # (BH, NC) total log forget of each chunk
        cg = ig.view(BH, NC, L) - b  # i_l - b_l
        g = cg + Bc[..., None]  # (BH, NC, L) log-weight of each input at its chunk end
        mloc = g.amax(-1)  # (BH, NC)
        # chunk-end states as one product over chunks
        logW = _segsum(Bc).add_(mloc[:, None, :])  # (BH, NC, NC)
        logW0 = m0[:, None] + Bc.cumsum(-1)  # (BH, NC) log-weight of the initial state at each chunk end
        mend = torch.maximum(logW.amax(-1), logW0)  # (BH, NC) = m_c
        W = logW.sub_(mend[..., None]).exp_()  # (BH, NC, NC)
        W0 = logW0.sub_(mend).exp_()  # (BH, NC); exactly 0 without an initial state (m0 = -inf)
        u = torch.exp(g - mloc[..., None]).mul_(scale)  # (BH, NC, L), the key scale 1/sqrt(Dqk) folded in
        KV = torch.matmul((kc * u[..., None]).transpose(-1, -2), vpc)  # (BH, NC, d, e1) chunk summaries [K^T U V | K^T u]
        C0p = torch.cat([C0, n0[..., None]], -1) if has_state else None  # (BH, d, e1) = [C0 | n0]
        # start state of chunk c = end state of chunk c - 1 (the initial state for c = 0)
        Wp = F.pad(W[:, :-1], (0, 0, 1, 0))  # (BH, NC, NC): W shifted down one row
        W0p = torch.cat([torch.ones_like(W0[:, :1]), W0[:, :-1]], 1)  # (BH, NC)
        use_inter = has_state or NC > 1  # else the only chunk starts from the empty state: no inter-chunk term
        mp = torch.cat([m0[:, None], mend[:, :-1]], 1)  # (BH, NC) chunk-start stabilisers
        # intra-chunk matrices
        a = mp[..., None] + b  # (BH, NC, L) log-weight of the chunk-start state
        mrow = torch.maximum(b + cg.cummax(-1).values, a)  # row maxima of log D, then the state
        w = torch.exp(a - mrow)
        rb = (b - mrow).add_(math.log(scale))  # row part of log P (the key scale as log(scale): k stays unscaled)
        A = torch.matmul(qc, kc.transpose(-1, -2)).mul_(_decay_matrix(rb, cg, scale))  # (BH, NC, L, L)
        if use_inter:  # [num | den] = w q^T C'_prev + A v'
            num = torch.matmul(qc, _chunk_starts(Wp, W0p, KV, C0p)).mul_(w[..., None])  # (BH, NC, L, e1)
            num.view(BH * NC, L, e1).baddbmm_(A.view(BH * NC, L, L), vp.view(BH * NC, L, e1))
        else:
            num = torch.matmul(A, vpc)
        den = num[..., e]
        lo = torch.exp(-mrow)
        N = torch.maximum(den.abs(), lo)
        h = torch.div(num[..., :e], N[..., None])  # (BH, NC, L, e) contiguous
        # d N / d den: sign(den) where |den| wins the max, 0 where exp(-m) wins
        dN = torch.sign(den).mul_(den.abs() > lo)
        del num, den
        Cfin = None
        if need_state:  # C'_T = W[-1] KV + W0[-1] C0'
            Cfin = torch.matmul(W[:, -1:], KV.view(BH, NC, d * e1)).view(BH, d, e1)
            if has_state:
                Cfin.addcmul_(W0[:, -1, None, None], C0p)
        ctx.save_for_backward(q, k, vp, g, cg, rb, Bc, mloc, C0p, m0, Cfin, W, W0, Wp, W0p, u, KV, A, w, h, N, dN)
        ctx.shape = (BH, T, d, e, NC, L, pad, use_inter, scale)
        hT = h.view(BH, NC * L, e)[:, :T]
        if not need_state:
            return hT, None, None, None
        return hT, Cfin[..., :e].contiguous(), Cfin[..., e].contiguous(), mend[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, gCT, gnT, gmT):
        (q, k, vp, g, cg, rb, Bc, mloc, C0p, m0, Cfin, W, W0, Wp, W0p, u, KV, A, w, h, N, dN) = ctx.saved_tensors
        BH, T, d, e, NC, L, pad, use_inter, scale = ctx.shape
        e1 = e + 1
        de1 = d * e1
        has_state = C0p is not None
        state_out = gCT is not None or gnT is not None  # are the returned C, n in the loss?
        gCfin = None  # d loss / d [C_T | n_T]
        if state_out:
            gCfin = h.new_zeros(BH, d, e1)
            if gCT is not None:
                gCfin[..., :e] = gCT
            if gnT is not None:
                gCfin[..., e] = gnT
        qc, kc, vpc = _chunk_view(q, NC, L), _chunk_view(k, NC, L), _chunk_view(vp, NC, L)
        gm0 = torch.zeros_like(m0)
        gC0p = None

        # h = num / N,  N = max(|den|, exp(-m))  (the exp(-m) branch carries no gradient)
        # gnum' = [gh / N | -(gh . h) / N * dN]: the gradients of [num | den]
        gnum = h.new_empty(BH, NC * L, e1)
        if gh is None:
            gnum.zero_()
        else:
            torch.div(gh, N.view(BH, NC * L)[:, :T, None], out=gnum[:, :T, :e])
            if pad:
                gnum[:, T:, :e] = 0.0
        gnum = _chunk_view(gnum, NC, L)
        gnum[..., e] = _rowdot(gnum[..., :e], h).mul_(dN).neg_()
        # [num | den] = A v' + w q^T C'_prev
        gA = torch.matmul(gnum, vpc.transpose(-1, -2))  # (BH, NC, L, L)
        gv = torch.matmul(A.transpose(-1, -2), gnum[..., :e])  # (BH, NC, L, e)
        gq = gk = None
        gb = torch.zeros_like(g)
        gig = torch.zeros_like(g)
        gB = torch.zeros_like(Bc)
        if use_inter:  # the chunk-start states feed every chunk's output
            gq = torch.matmul(gnum, _chunk_starts(Wp, W0p, KV, C0p).transpose(-1, -2))  # (BH, NC, L, d) = gnum' C'_prev^T
            ga = _rowdot(qc, gq).mul_(w)  # d/da, a = m_prev + b (w = exp(a - mrow))
            gq.mul_(w[..., None])
            gCp = torch.matmul(qc.transpose(-1, -2), gnum.mul_(w[..., None]))  # (BH, NC, d, e1)
            gb.add_(ga)
            if has_state:
                gm0 = gm0 + ga[:, 0].sum(-1)  # a = m_prev + b; m_prev of chunk 0 is m0
        del gnum
        if use_inter or state_out:
            gKV = None
            KVf = KV.view(BH, NC, de1)
            if use_inter:
                # Cp = Wp KV + W0p C0' ;  C'_T = W[-1] KV + W0[-1] C0'
                gCpf = gCp.view(BH, NC, de1)
                gKV = torch.matmul(Wp.transpose(-1, -2), gCpf)  # (BH, NC, de1)
                # d log W[c, c'] = (gC_c . KV_c') W[c, c'], gC_c = gradient of the end state of chunk c
                # (= start state of chunk c + 1, then the final state)
                gWe = F.pad(torch.matmul(gCpf[:, 1:], KVf.transpose(-1, -2)), (0, 0, 0, 1))  # (BH, NC, NC)
                if has_state:
                    gC0p = torch.matmul(W0p[:, None, :], gCpf).view(BH, d, e1)
                    gW0e = F.pad(torch.matmul(gCpf[:, 1:], C0p.view(BH, de1, 1))[..., 0], (0, 1))  # (BH, NC)
                del gCp, gCpf
            else:
                gWe = W.new_zeros(BH, NC, NC)
                gW0e = W0.new_zeros(BH, NC)
            if state_out:
                gCff = gCfin.view(BH, 1, de1)
                gKV = torch.matmul(W[:, -1, :, None], gCff) if gKV is None else gKV.baddbmm_(W[:, -1, :, None], gCff)
                gWe[:, -1] = torch.matmul(gCff, KVf.transpose(-1, -2))[:, 0]
                if has_state:
                    gC0p = gCfin * W0[:, -1, None, None] if gC0p is None else gC0p.addcmul_(W0[:, -1, None, None], gCfin)
                    gW0e[:, -1] = (gCfin * C0p).sum((-1, -2))
            glogW = gWe.mul_(W)  # (BH, NC, NC)
            gKV = gKV.view(BH, NC, d, e1)
            # KV = K^T diag(u) V' ;  u = exp(g - mloc) scale
            ku = kc * u[..., None]  # (BH, NC, L, d)
            gv.view(BH * NC, L, e).baddbmm_(ku.view(BH * NC, L, d), gKV.view(BH * NC, d, e1)[..., :e])
            gk = torch.matmul(vpc, gKV.transpose(-1, -2))  # (BH, NC, L, d) = v' gKV^T
            del gKV
            gg = _rowdot(ku, gk)  # d/dg, g = i - b + B
            del ku
            gk.mul_(u[..., None])
            # log W[c, c'] = mloc_c' + sum_{c' < r <= c} B_r ;  log W0[c] = m0 + sum_{r <= c} B_r
            # (mloc and m_c are stabilisers: constants)
            cum_excl = glogW.cumsum(-1) - glogW  # [c, r] = sum_{c' < r} glogW[c, c']
            gB = cum_excl.tril().sum(-2) + gg.sum(-1)  # sum over c >= r
            if has_state:
                glogW0 = gW0e.mul_(W0)  # (BH, NC)
                gB = gB + glogW0.flip(-1).cumsum(-1).flip(-1)
                gm0 = gm0 + glogW0.sum(-1)
            gig.add_(gg)
            gb.sub_(gg)
        # A = (q k^T) * P ;  P = exp(log D - mrow)  =>  d (q k^T) = gA * P,  d log D = gA * A
        gS = _decay_matrix(rb, cg, scale).mul_(gA)
        gq = torch.matmul(gS, kc) if gq is None else gq.view(BH * NC, L, d).baddbmm_(gS.view(BH * NC, L, L), kc.reshape(BH * NC, L, d)).view(BH, NC, L, d)
        gk = torch.matmul(gS.transpose(-1, -2), qc) if gk is None else gk.view(BH * NC, L, d).baddbmm_(gS.view(BH * NC, L, L).transpose(-1, -2), qc.reshape(BH * NC, L, d)).view(BH, NC, L, d)
        del gS
        glogD = gA.mul_(A)
        col = glogD.sum(-2)  # (BH, NC, L): sum over rows j for each input l
        gig.add_(col)
        gb.add_(glogD.sum(-1)).sub_(col)
        del gA, glogD
        # The returned final m: its own gradient plus the rescaling of the returned C, n, routed to
        # the entry attaining m_T = max(m0 + sum_r B_r, max_c' [mloc_c' + sum_{r > c'} B_r]).
        G = -(gCfin * Cfin).sum((-1, -2)) if state_out else None  # (BH,)
        if gmT is not None:
            G = gmT if G is None else G + gmT
        if G is not None and bool((G != 0).any()):
            # the last row of the forward's max, recomputed exactly as there
            cand = torch.cat([_segsum(Bc)[:, -1] + mloc, (m0 + Bc.cumsum(-1)[:, -1])[:, None]], 1)  # (BH, NC + 1)
            win = cand.argmax(-1)  # (BH,) in 0..NC (NC = the initial state)
            r = torch.arange(NC, device=G.device)
            from_state = win == NC
            gm0 = gm0 + torch.where(from_state, G, torch.zeros_like(G))
            gB = gB + G[:, None] * ((r[None, :] > win[:, None]) | from_state[:, None]).to(G.dtype)  # decays on the path
            hit = (r[None, :] == win[:, None]).to(G.dtype) * G[:, None]  # (BH, NC): chunk c* wins via mloc_c*
            onehot = torch.zeros_like(g).scatter_(-1, g.argmax(-1, keepdim=True), 1.0)  # l* with g_{l*} = mloc
            gig = gig.addcmul_(onehot, hit[..., None])  # g_{l*} = i_{l*} - b_{l*} + B
            gb = gb.addcmul_(onehot, hit[..., None], value=-1.0)
            gB = gB + hit
        gb[..., -1] += gB
        glogf = gb.flip(-1).cumsum(-1).flip(-1)  # b = cumsum(log f)
        gq = gq.view(BH, NC * L, d)[:, :T]
        gk = gk.view(BH, NC * L, d)[:, :T]
        gv = gv.view(BH, NC * L, e)[:, :T]
        gig = gig.reshape(BH, NC * L)[:, :T]
        glogf = glogf.reshape(BH, NC * L)[:, :T]
        gC0, gn0 = (gC0p[..., :e], gC0p[..., e]) if gC0p is not None else (None, None)
        return gq, gk, gv, gig, glogf, gC0, gn0, gm0 if has_state else None, None, None, None, None


def _mlstm_chunkwise_fused(q, k, v, i, f, initial_state, chunk_size, need_state=True):
    B, NH, T, Dqk = q.shape
    Dv = v.shape[-1]
    dt = compute_dtype(q.dtype)
    if initial_state is None:
        C0, n0, m0 = empty_state(B * NH, 1, Dqk, Dv, q.device, dt)
        C0, n0, m0 = C0[:, 0], n0[:, 0], m0[:, 0]
    else:
        C0 = initial_state[0].to(dt).reshape(B * NH, Dqk, Dv)
        n0 = initial_state[1].to(dt).reshape(B * NH, Dqk)
        m0 = initial_state[2].to(dt).reshape(B * NH)
    qf = q.to(dt).reshape(B * NH, T, Dqk)
    kf = k.to(dt).reshape(B * NH, T, Dqk)  # unscaled: the Function applies 1/sqrt(Dqk) itself
    vf = v.to(dt).reshape(B * NH, T, Dv)
    ig = i.to(dt).reshape(B * NH, T)
    logf = F.logsigmoid(f.to(dt)).reshape(B * NH, T)
    L = max(1, min(chunk_size, T))
    h, C, n, m = _MLSTMChunkwiseFn.apply(qf, kf, vf, ig, logf, C0, n0, m0, L, initial_state is not None, 1.0 / math.sqrt(Dqk), need_state)
    state = (C.view(B, NH, Dqk, Dv), n.view(B, NH, Dqk), m.view(B, NH)) if need_state else None
    return h.reshape(B, NH, T, Dv).to(q.dtype), state


# ----------------------------------------------------------------------------------------------
# Public entry points


@no_autocast
def mlstm_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    initial_state: State | None = None,
    return_state: bool = False,
    chunk_size: int = 64,
    backend: str | None = None,
):
    """Chunkwise mLSTM: states between chunks, the parallel form within each chunk. Any T.

    Args:
        q, k: (B, NH, T, Dqk) queries and keys (keys are scaled by 1/sqrt(Dqk) here).
        v: (B, NH, T, Dv) values.
        i, f: (B, NH, T) input and forget gate pre-activations.
        initial_state: optional (C, n, m) with shapes (B, NH, Dqk, Dv), (B, NH, Dqk), (B, NH);
            ``None`` is the empty state.
        return_state: also return the final state (C, n, m) in fp32.
        chunk_size: tokens per chunk; the last chunk holds the remainder.
        backend: ``"reference"`` or ``"fused"``; ``None`` uses the module default ``BACKEND``.

    Returns:
        h (B, NH, T, Dv) in q's dtype, and the final state when ``return_state``.
    """
    B, NH, T, Dqk, Dv = _check_inputs(q, k, v, i, f, initial_state, step=False, name="mlstm_chunkwise")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ShapeError(f"mlstm_chunkwise: chunk_size must be a positive int, got {chunk_size!r}")
    if T == 0:
        return mlstm_parallel(q, k, v, i, f, initial_state=initial_state, return_state=return_state)
    if _resolve(backend) == "fused":
        h, state = _mlstm_chunkwise_fused(q, k, v, i, f, initial_state, chunk_size, need_state=return_state)
    else:
        h, state = _mlstm_chunkwise_reference(q, k, v, i, f, initial_state, chunk_size)
    return (h, state) if return_state else h


@no_autocast
def mlstm_step(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None = None, *, backend: str | None = None):
    """One recurrent mLSTM step (paper eqs. 19-21, stabilised).

    Args:
        q, k: (B, NH, Dqk) the token's query and key (the key is scaled by 1/sqrt(Dqk) here).
        v: (B, NH, Dv) its value.
        i, f: (B, NH) input and forget gate pre-activations.
        state: (C, n, m) with shapes (B, NH, Dqk, Dv), (B, NH, Dqk), (B, NH); ``None`` = empty.
        backend: ``"reference"`` or ``"fused"``; ``None`` uses the module default ``BACKEND``.
            ``"fused"`` runs the native C kernel when nothing needs a gradient and every tensor
            is float32 on the CPU (decoding), else batched torch ops.

    Returns:
        (h (B, NH, Dv) in q's dtype, new state (C, n, m) in fp32).
    """
    B, NH, _, Dqk, Dv = _check_inputs(q, k, v, i, f, state, step=True, name="mlstm_step")
    if state is None:
        state = empty_state(B, NH, Dqk, Dv, q.device, compute_dtype(q.dtype))
    be = _resolve(backend)
    if be == "fused":
        if _native_ok(q, k, v, i, f, *state) and _native_step_lib() is not None:
            return _mlstm_step_native(q, k, v, i, f, state)
        return _mlstm_step_fused(q, k, v, i, f, state)
    return _mlstm_step_reference(q, k, v, i, f, state)


# ----------------------------------------------------------------------------------------------
# Backend selection at import


def _self_check() -> bool:
    """Run the fused forms on a tiny input and compare with the reference (forward and backward)."""
    try:
        g = torch.Generator().manual_seed(0)
        B, NH, T, D = 1, 2, 5, 4
        x = [torch.randn(B, NH, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        gates = [torch.randn(B, NH, T, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        out = []
        for be in BACKENDS:
            h, (C, n, m) = mlstm_chunkwise(*x, *gates, chunk_size=2, return_state=True, backend=be)
            grads = torch.autograd.grad((h.sum() + C.sum() + n.sum()), x + gates)
            out.append([h, C, n, m, *grads])
        ok = all(torch.allclose(a, b, atol=1e-8, rtol=1e-6) for a, b in zip(*out))
        st = empty_state(B, NH, D, D, dtype=torch.float64)
        a = _mlstm_step_reference(x[0][:, :, 0], x[1][:, :, 0], x[2][:, :, 0], gates[0][:, :, 0], gates[1][:, :, 0], st)
        b = _mlstm_step_fused(x[0][:, :, 0], x[1][:, :, 0], x[2][:, :, 0], gates[0][:, :, 0], gates[1][:, :, 0], st)
        return ok and torch.allclose(a[0], b[0]) and torch.allclose(a[1][0], b[1][0])
    except Exception as e:  # pragma: no cover - only on broken installs
        warnings.warn(f"mLSTM fused backend failed its self-check ({e}); using the reference backend", stacklevel=2)
        return False


BACKEND = default_backend("RIZZ_MLSTM_BACKEND", _resolve, _self_check)
