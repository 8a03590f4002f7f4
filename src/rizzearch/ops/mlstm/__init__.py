"""The mLSTM (matrix-memory LSTM) of Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory".

One recurrence, three forms that compute the same numbers:

- ``mlstm_parallel``: the quadratic form (paper, appendix "Parallel Formulation"): a log-space
  decay matrix ``log D[t, s] = F_t - F_s + i_s`` (``F`` = cumulative log forget gate), stabilised
  by its row-wise maximum.
- ``mlstm_chunkwise``: chunk-level states ``(C, n, m)`` carried from chunk to chunk plus the
  parallel form inside each chunk; any ``T`` (the last chunk may be short), an initial state in,
  the final state out. ``backend="reference"`` is the spec (a loop of ``mlstm_parallel`` calls with
  autograd); ``backend="fast"`` is one custom autograd Function over all chunks at once (no
  Python loop over chunks) with a hand-derived backward (``_MLSTMChunkwiseFn`` in ``fused.py``
  beside this file).
- ``mlstm_step``: one token of the recurrent form (paper eqs. 19-27); ``backend="fast"`` runs a
  small C kernel (``csrc/mlstm_step.c``) for decoding (no gradient, float32, CPU) and batched
  torch ops otherwise.

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

Backends (``rizzearch.ops.backends``, table in ``docs/backends.md``): op ``"mlstm"`` picks the
chunkwise form (``reference`` or ``fast``), op ``"mlstm_step"`` the step (``reference``, or ``fast``:
the C kernel in ``csrc/mlstm_step.c`` for decoding, batched torch ops otherwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ShapeError
from rizzearch.ops import backends
from rizzearch.ops._common import compute_dtype, no_autocast
from rizzearch.ops.mlstm import native
from rizzearch.ops.mlstm.fused import _MLSTMChunkwiseFn

__all__ = [
    "mlstm_parallel",
    "mlstm_chunkwise",
    "mlstm_step",
    "empty_state",
]

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
# Native decode step: a few lines of C (csrc/mlstm_step.c), compiled once with the system C compiler
# (no torch headers, so it builds in well under a second), cached per user, called through ctypes.
# Inference only (no autograd), CPU, float32; anything else takes the batched torch step. One pass
# over C per head instead of ~15 separate kernels.

def _native_step_lib():
    """The C step kernel (``csrc/mlstm_step.c``, loaded once by ``native.decode_lib``); None if unavailable."""
    lib = native.decode_lib()
    return None if lib is None else lib.mlstm_step_f32


backends.register_probe("mlstm_step", lambda: _native_step_lib() is not None)


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
        backend: ``"reference"`` or ``"fast"``; ``None`` uses the default of op ``"mlstm"``
            (``rizzearch.ops.backends``).

    Returns:
        h (B, NH, T, Dv) in q's dtype, and the final state when ``return_state``.
    """
    B, NH, T, Dqk, Dv = _check_inputs(q, k, v, i, f, initial_state, step=False, name="mlstm_chunkwise")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ShapeError(f"mlstm_chunkwise: chunk_size must be a positive int, got {chunk_size!r}")
    if T == 0:
        return mlstm_parallel(q, k, v, i, f, initial_state=initial_state, return_state=return_state)
    if backends.resolve("mlstm", backend) == "fast":
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
        backend: ``"reference"`` or ``"fast"``; ``None`` uses the default of op ``"mlstm_step"``.
            ``"fast"`` runs the native C kernel when nothing needs a gradient and every tensor
            is float32 on the CPU (decoding) and the kernel could be built, else batched torch ops.

    Returns:
        (h (B, NH, Dv) in q's dtype, new state (C, n, m) in fp32).
    """
    B, NH, _, Dqk, Dv = _check_inputs(q, k, v, i, f, state, step=True, name="mlstm_step")
    if state is None:
        state = empty_state(B, NH, Dqk, Dv, q.device, compute_dtype(q.dtype))
    if backends.resolve("mlstm_step", backend) == "fast":
        if _native_ok(q, k, v, i, f, *state) and _native_step_lib() is not None:
            return _mlstm_step_native(q, k, v, i, f, state)
        return _mlstm_step_fused(q, k, v, i, f, state)
    return _mlstm_step_reference(q, k, v, i, f, state)
