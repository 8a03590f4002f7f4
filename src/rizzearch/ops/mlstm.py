"""The mLSTM (matrix-memory LSTM) of Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory".

One recurrence, three forms that compute the same numbers:

- ``mlstm_parallel``: the quadratic form (paper, appendix "Parallel Formulation"): a log-space
  decay matrix ``log D[t, s] = F_t - F_s + i_s`` (``F`` = cumulative log forget gate), stabilised
  by its row-wise maximum.
- ``mlstm_chunkwise``: chunk-level states ``(C, n, m)`` carried from chunk to chunk plus the
  parallel form inside each chunk; any ``T`` (the last chunk may be short), an initial state in,
  the final state out. ``backend="reference"`` is the spec (a loop of ``mlstm_parallel`` calls with
  autograd); ``backend="fused"`` is one custom autograd Function over all chunks at once with a
  hand-derived backward that recomputes the intra-chunk matrices instead of storing them.
- ``mlstm_step``: one token of the recurrent form (paper eqs. 19-27).

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
variable ``RIZZEARCH_MLSTM_BACKEND``, with ``set_backend()`` / ``use_backend()`` or with the
``backend=`` argument of each call (what the tests use).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ShapeError

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
BACKEND = "reference"  # replaced at import by _select_backend()

State = tuple[Tensor, Tensor, Tensor]


# ----------------------------------------------------------------------------------------------
# Validation and small helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


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


def _resolve(backend: str | None) -> str:
    b = BACKEND if backend is None else backend
    if b not in BACKENDS:
        raise ValueError(f"unknown mLSTM backend {b!r}; choose from {BACKENDS}")
    return b


def set_backend(name: str) -> None:
    """Set the default backend of ``mlstm_chunkwise`` and ``mlstm_step`` (``"reference"`` or ``"fused"``)."""
    global BACKEND
    BACKEND = _resolve(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily switch the default backend (``with use_backend("reference"): ...``)."""
    global BACKEND
    old = BACKEND
    BACKEND = _resolve(name)
    try:
        yield
    finally:
        BACKEND = old


# ----------------------------------------------------------------------------------------------
# Reference forms (the spec; differentiated by autograd)


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
    dt = _compute_dtype(q.dtype)
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
    dt = _compute_dtype(q.dtype)
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
    dt = _compute_dtype(q.dtype)
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
# Fused chunkwise: one autograd Function, hand-derived backward


def _chunk_view(x: Tensor, NC: int, L: int) -> Tensor:
    """(BH, T_pad, ...) -> (BH, NC, L, ...)."""
    return x.view(x.shape[0], NC, L, *x.shape[2:])


def _intra(q, k, b, ig, m_prev):
    """Intra-chunk matrices. q, k: (BH, NC, L, d); b (within-chunk cumulative log f), ig: (BH, NC, L);
    m_prev: (BH, NC) chunk-start stabiliser.

    Returns P (stabilised decay, 0 above the diagonal), A = (q k^T) * P, w (weight of the
    chunk-start state per row) and the row stabiliser mrow = max(max_l log D_jl, m_prev + b_j).
    """
    L = q.shape[2]
    upper = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    P = (b[..., :, None] + (ig - b)[..., None, :]).masked_fill_(upper, float("-inf"))  # log D: (BH, NC, L, L)
    a = m_prev[..., None] + b  # (BH, NC, L)
    mrow = torch.maximum(P.amax(-1), a)  # (BH, NC, L)
    P = P.sub_(mrow[..., None]).exp_()
    w = torch.exp(a - mrow)
    A = torch.matmul(q, k.transpose(-1, -2)).mul_(P)  # (BH, NC, L, L)
    return P, A, w, mrow


class _MLSTMChunkwiseFn(torch.autograd.Function):
    """mLSTM chunkwise forward over all chunks at once; backward derived by hand (docs/xlstm.md).

    Inputs are fp32/fp64, already flattened to (BH, T, .), ``k`` already scaled, ``logf`` already
    ``logsigmoid(f)``. Stabilisers are treated as constants in the backward: ``h`` and the true
    (unstabilised) states do not depend on them, so their gradient paths cancel exactly; the one
    exception is the returned final ``m``, whose gradient (plus the implied rescaling of the
    returned ``C``, ``n``) is routed along the argmax chain of the chunk-level maxima.

    Memory: besides the inputs it keeps the chunk-start states (NC x Dqk x Dv per head) and the
    two L x L matrices per chunk (P and A, together 2 T L per head), not the T x T matrix.
    """

    @staticmethod
    def forward(ctx, q, k, v, ig, logf, C0, n0, m0, L: int):
        BH, T, d = q.shape
        e = v.shape[-1]
        NC = -(-T // L)
        pad = NC * L - T
        if pad:  # neutral tail: no input (i = -inf), no decay (log f = 0)
            q = F.pad(q, (0, 0, 0, pad))
            k = F.pad(k, (0, 0, 0, pad))
            v = F.pad(v, (0, 0, 0, pad))
            ig = F.pad(ig, (0, pad), value=float("-inf"))
            logf = F.pad(logf, (0, pad), value=0.0)
        qc, kc, vc = _chunk_view(q, NC, L), _chunk_view(k, NC, L), _chunk_view(v, NC, L)
        igc, lfc = ig.view(BH, NC, L), logf.view(BH, NC, L)
        b = lfc.cumsum(-1)  # (BH, NC, L) within-chunk cumulative log forget
        Bc = b[..., -1]  # (BH, NC) total log forget of each chunk
        g = Bc[..., None] - b + igc  # (BH, NC, L) log-weight of each input at its chunk end
        mloc = g.amax(-1)  # (BH, NC)
        # chunk-level stabilisers m_c = max(m_{c-1} + B_c, mloc_c): a scan over NC scalars
        ms = q.new_empty(BH, NC + 1)
        ms[:, 0] = m0
        for c in range(NC):
            ms[:, c + 1] = torch.maximum(ms[:, c] + Bc[:, c], mloc[:, c])
        u = torch.exp(g - ms[:, 1:, None])  # (BH, NC, L)
        wC = torch.exp(ms[:, :-1] + Bc - ms[:, 1:])  # (BH, NC) decay of the carried state
        ku = kc * u[..., None]  # (BH, NC, L, d)
        KV = torch.matmul(ku.transpose(-1, -2), vc)  # (BH, NC, d, e)
        Ku = ku.sum(-2)  # (BH, NC, d)
        Cs = q.new_empty(BH, NC + 1, d, e)
        ns = q.new_empty(BH, NC + 1, d)
        Cs[:, 0], ns[:, 0] = C0, n0
        for c in range(NC):
            Cs[:, c + 1] = torch.addcmul(KV[:, c], Cs[:, c], wC[:, c, None, None])
            ns[:, c + 1] = torch.addcmul(Ku[:, c], ns[:, c], wC[:, c, None])
        Cp, np_, mp = Cs[:, :-1], ns[:, :-1], ms[:, :-1]  # chunk-start states
        P, A, w, mrow = _intra(qc, kc, b, igc, mp)
        qCp = torch.matmul(qc, Cp)  # (BH, NC, L, e)
        qnp = torch.matmul(qc, np_[..., None])[..., 0]  # (BH, NC, L)
        num = torch.matmul(A, vc).addcmul_(w[..., None], qCp)  # (BH, NC, L, e)
        den = A.sum(-1).addcmul_(w, qnp)  # (BH, NC, L)
        N = torch.maximum(den.abs(), torch.exp(-mrow))
        h = num.div_(N[..., None])
        # d N / d den: sign(den) where |den| wins the max, 0 where exp(-m) wins
        dN = torch.sign(den) * (den.abs() > torch.exp(-mrow)).to(den.dtype)
        ctx.save_for_backward(q, k, v, g, b, Cs, ns, ms, u, wC, P, A, w, qCp, qnp, h, N, dN)
        ctx.shape = (BH, T, d, e, NC, L, pad)
        hT = h.view(BH, NC * L, e)[:, :T]
        return hT, Cs[:, -1].clone(), ns[:, -1].clone(), ms[:, -1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, gCT, gnT, gmT):
        q, k, v, g, b, Cs, ns, ms, u, wC, P, A, w, qCp, qnp, h, N, dN = ctx.saved_tensors
        BH, T, d, e, NC, L, pad = ctx.shape
        gh = torch.zeros_like(h.view(BH, NC * L, e)) if gh is None else F.pad(gh, (0, 0, 0, pad))
        gCT = torch.zeros_like(Cs[:, -1]) if gCT is None else gCT
        gnT = torch.zeros_like(ns[:, -1]) if gnT is None else gnT
        gmT = torch.zeros_like(ms[:, -1]) if gmT is None else gmT
        qc, kc, vc = _chunk_view(q, NC, L), _chunk_view(k, NC, L), _chunk_view(v, NC, L)
        ghc = _chunk_view(gh, NC, L)
        Cp, np_, mp = Cs[:, :-1], ns[:, :-1], ms[:, :-1]

        # h = num / N,  N = max(|den|, exp(-m))  (the exp(-m) branch carries no gradient)
        gnum = ghc / N[..., None]  # (BH, NC, L, e)
        gden = (ghc * h).sum(-1).div_(N).mul_(dN).neg_()  # (BH, NC, L)
        # num = A v + w q^T Cp ;  den = A 1 + w q.np
        gA = torch.matmul(gnum, vc.transpose(-1, -2)).add_(gden[..., None])  # (BH, NC, L, L)
        gv = torch.matmul(A.transpose(-1, -2), gnum)
        gw = (gnum * qCp).sum(-1).addcmul_(gden, qnp)
        gdw = gden * w
        gq = torch.matmul(gnum, Cp.transpose(-1, -2)).mul_(w[..., None]).addcmul_(gdw[..., None], np_[:, :, None, :])
        # A = (q k^T) * P ;  P = exp(log D - mrow)  =>  d log D = gA * A
        gS = gA * P
        gq = gq.add_(torch.matmul(gS, kc))
        gk = torch.matmul(gS.transpose(-1, -2), qc)
        glogD = gA.mul_(A)
        col = glogD.sum(-2)  # (BH, NC, L): sum over rows j for each input l
        ga = gw.mul_(w)  # a = m_prev + b
        # contributions of each chunk's outputs to its chunk-start state
        XC = torch.matmul((qc * w[..., None]).transpose(-1, -2), gnum)  # (BH, NC, d, e)
        Xn = (qc * gdw[..., None]).sum(-2)  # (BH, NC, d)
        # reverse scan: gradient w.r.t. each chunk's end state
        gCe = torch.empty_like(Cp)
        gne = torch.empty_like(np_)
        gC, gn = gCT, gnT
        for c in range(NC - 1, -1, -1):
            gCe[:, c], gne[:, c] = gC, gn
            gC = torch.addcmul(XC[:, c], gC, wC[:, c, None, None])
            gn = torch.addcmul(Xn[:, c], gn, wC[:, c, None])
        gC0, gn0 = gC, gn
        # end state: C_c = wC Cp + K^T diag(u) V ;  n_c = wC np + K^T u
        kgC = torch.matmul(kc, gCe)  # (BH, NC, L, e)
        gu = (kgC * vc).sum(-1).add_(torch.matmul(kc, gne[..., None])[..., 0])
        gk = gk.add_(torch.matmul(vc, gCe.transpose(-1, -2)).add_(gne[:, :, None, :]).mul_(u[..., None]))
        gv = gv.add_(kgC.mul_(u[..., None]))
        gg = gu.mul_(u)  # g = B - b + i
        gwC = (gCe * Cp).sum((-1, -2)) + (gne * np_).sum(-1)
        gBm = gwC * wC  # d/d(m_prev + B)
        gig = col + gg
        gb = glogD.sum(-1) - col + ga - gg
        gb[..., -1] += gg.sum(-1) + gBm
        gm0 = ga[:, 0].sum(-1) + gBm[:, 0]
        # the returned final m: its own gradient plus the rescaling of the returned C, n
        G = gmT - (gCT * Cs[:, -1]).sum((-1, -2)) - (gnT * ns[:, -1]).sum(-1)  # (BH,)
        carry = ((mp + b[..., -1]) >= g.amax(-1)).to(G.dtype)  # (BH, NC): branch of m_c = max(m_{c-1} + B_c, mloc_c)
        after = torch.ones_like(carry)  # chunk c is on the argmax path iff every later chunk carried
        after[:, :-1] = carry.flip(-1).cumprod(-1).flip(-1)[:, 1:]
        on_carry = after * carry * G[:, None]  # (BH, NC)
        on_loc = after * (1 - carry) * G[:, None]
        onehot = torch.zeros_like(g).scatter_(-1, g.argmax(-1, keepdim=True), 1.0)  # l* of mloc_c = g_{l*}
        gig = gig.addcmul_(onehot, on_loc[..., None])
        gb = gb.addcmul_(onehot, on_loc[..., None], value=-1.0)  # g_{l*} = B - b_{l*} + i_{l*}
        gb[..., -1] += on_carry + on_loc
        gm0 = gm0 + on_carry[:, 0]
        glogf = gb.flip(-1).cumsum(-1).flip(-1)  # b = cumsum(log f)
        gq = gq.reshape(BH, NC * L, d)[:, :T]
        gk = gk.reshape(BH, NC * L, d)[:, :T]
        gv = gv.reshape(BH, NC * L, e)[:, :T]
        gig = gig.reshape(BH, NC * L)[:, :T]
        glogf = glogf.reshape(BH, NC * L)[:, :T]
        return gq, gk, gv, gig, glogf, gC0, gn0, gm0, None


def _mlstm_chunkwise_fused(q, k, v, i, f, initial_state, chunk_size):
    B, NH, T, Dqk = q.shape
    Dv = v.shape[-1]
    dt = _compute_dtype(q.dtype)
    if initial_state is None:
        C0, n0, m0 = empty_state(B * NH, 1, Dqk, Dv, q.device, dt)
        C0, n0, m0 = C0[:, 0], n0[:, 0], m0[:, 0]
    else:
        C0 = initial_state[0].to(dt).reshape(B * NH, Dqk, Dv)
        n0 = initial_state[1].to(dt).reshape(B * NH, Dqk)
        m0 = initial_state[2].to(dt).reshape(B * NH)
    qf = q.to(dt).reshape(B * NH, T, Dqk)
    kf = (k.to(dt) / math.sqrt(Dqk)).reshape(B * NH, T, Dqk)
    vf = v.to(dt).reshape(B * NH, T, Dv)
    ig = i.to(dt).reshape(B * NH, T)
    logf = F.logsigmoid(f.to(dt)).reshape(B * NH, T)
    L = max(1, min(chunk_size, T))
    h, C, n, m = _MLSTMChunkwiseFn.apply(qf, kf, vf, ig, logf, C0, n0, m0, L)
    state = (C.view(B, NH, Dqk, Dv), n.view(B, NH, Dqk), m.view(B, NH))
    return h.reshape(B, NH, T, Dv).to(q.dtype), state


# ----------------------------------------------------------------------------------------------
# Public entry points


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
        h, state = _mlstm_chunkwise_fused(q, k, v, i, f, initial_state, chunk_size)
    else:
        h, state = _mlstm_chunkwise_reference(q, k, v, i, f, initial_state, chunk_size)
    return (h, state) if return_state else h


def mlstm_step(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None = None, *, backend: str | None = None):
    """One recurrent mLSTM step (paper eqs. 19-21, stabilised).

    Args:
        q, k: (B, NH, Dqk) the token's query and key (the key is scaled by 1/sqrt(Dqk) here).
        v: (B, NH, Dv) its value.
        i, f: (B, NH) input and forget gate pre-activations.
        state: (C, n, m) with shapes (B, NH, Dqk, Dv), (B, NH, Dqk), (B, NH); ``None`` = empty.
        backend: ``"reference"`` or ``"fused"``; ``None`` uses the module default ``BACKEND``.

    Returns:
        (h (B, NH, Dv) in q's dtype, new state (C, n, m) in fp32).
    """
    B, NH, _, Dqk, Dv = _check_inputs(q, k, v, i, f, state, step=True, name="mlstm_step")
    if state is None:
        state = empty_state(B, NH, Dqk, Dv, q.device, _compute_dtype(q.dtype))
    if _resolve(backend) == "fused":
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


def _select_backend() -> str:
    env = os.environ.get("RIZZEARCH_MLSTM_BACKEND")
    if env:
        return _resolve(env)
    return "fused" if _self_check() else "reference"


BACKEND = _select_backend()
