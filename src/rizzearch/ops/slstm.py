"""The sLSTM (scalar-memory LSTM with exponential gating) of Beck et al. 2024, "xLSTM".

Per head, with the recurrent matrix ``R`` block-diagonal over heads (memory mixing inside a head,
paper section 2.2 "sLSTM"), and pre-activations ``raw_t = W x_t + R h_{t-1} + b`` for the four
gates (i, f, z, o):

    m_t  = max(log f_t + m_{t-1}, i~_t)         stabiliser (paper eq. 15), log f_t = logsigmoid(f~_t)
    i'_t = exp(i~_t - m_t)                       (eq. 16)
    f'_t = exp(log f_t + m_{t-1} - m_t)          (eq. 17)
    c_t  = f'_t c_{t-1} + i'_t tanh(z~_t)        (eq. 8)
    n_t  = f'_t n_{t-1} + i'_t                   (eq. 9)
    h_t  = sigmoid(o~_t) c_t / n_t               (eq. 10)

The forget gate is a sigmoid handled in log space; the empty state is ``h = c = n = 0,
m = -inf`` (so the first step sets ``m_1 = i~_1`` and ``n_1 = 1``, which is what the official
vanilla kernel does with its ``all(n == 0)`` test, but per element instead of per batch). States
and stabilisers are fp32 (fp64 inputs stay fp64) whatever the input dtype.

Forms:

- ``backend="reference"``: a Python loop over the step below, differentiated by autograd (the spec).
- ``backend="fast"``: one custom autograd Function. The forward loop does one batched matmul and
  a dozen pointwise kernels per step and keeps the gate activations; the backward loop is derived
  by hand (docs/xlstm.md), with every factor that does not depend on the incoming gradient
  precomputed for all steps at once, and the gradient of ``R`` reduced after the loop with a
  single matmul (``b`` gets the summed gate gradients). Stabilisers are constants in the
  backward (outputs do not depend on them); the gradient of the returned final ``m`` is routed
  along its argmax chain.

Shapes: gate inputs ``wx: (B, T, 4, NH, DH)`` (gate order i, f, z, o), ``R: (NH, DH, 4, DH)``
(``raw[g] += h_{t-1} @ R[head, :, g, :]``), ``b: (4, NH, DH)``; state ``(h, c, n, m)``, each
``(B, NH, DH)``; output ``y: (B, T, NH, DH)``.

One step (``slstm_step``, decoding) has the same two forms: the reference step, and a fast step
that runs the fused forward's arithmetic in its (NH, B, 4 DH) layout (one batched matmul, fused
pointwise ops; differentiable by autograd).

The backend of op ``"slstm"`` is chosen through ``rizzearch.ops.backends`` (table in ``docs/backends.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ShapeError
from rizzearch.ops import backends
from rizzearch.ops._common import compute_dtype, no_autocast

__all__ = ["slstm_forward", "slstm_step", "empty_state"]

State = tuple[Tensor, Tensor, Tensor, Tensor]


def empty_state(B: int, NH: int, DH: int, device=None, dtype=torch.float32) -> State:
    """The state before any token: ``h = c = n = 0``, ``m = -inf``."""
    z = torch.zeros(B, NH, DH, device=device, dtype=dtype)
    return (z, z.clone(), z.clone(), torch.full((B, NH, DH), float("-inf"), device=device, dtype=dtype))


def _check(wx: Tensor, R: Tensor, b: Tensor, state, *, step: bool, name: str) -> tuple[int, int, int, int]:
    for tname, t in (("wx", wx), ("R", R), ("b", b)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ShapeError(f"{name}: {tname} must be a floating-point tensor")
    if R.dim() != 4 or R.shape[2] != 4 or R.shape[1] != R.shape[3]:
        raise ShapeError(f"{name}: R: expected shape (NH, DH, 4, DH), got {tuple(R.shape)}")
    NH, DH = R.shape[0], R.shape[1]
    if tuple(b.shape) != (4, NH, DH):
        raise ShapeError(f"{name}: b: expected shape (4, {NH}, {DH}) to match R, got {tuple(b.shape)}")
    if step:
        if wx.dim() != 4 or tuple(wx.shape[1:]) != (4, NH, DH):
            raise ShapeError(f"{name}: wx: expected shape (B, 4, {NH}, {DH}), got {tuple(wx.shape)}")
        B, T = wx.shape[0], 1
    else:
        if wx.dim() != 5 or tuple(wx.shape[2:]) != (4, NH, DH):
            raise ShapeError(f"{name}: wx: expected shape (B, T, 4, {NH}, {DH}), got {tuple(wx.shape)}")
        B, T = wx.shape[0], wx.shape[1]
    for tname, t in (("R", R), ("b", b)):
        if t.device != wx.device:
            raise ShapeError(f"{name}: {tname} is on {t.device} but wx is on {wx.device}")
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 4:
            raise ShapeError(f"{name}: state must be a tuple (h, c, n, m), got {type(state).__name__}")
        for sname, t in zip("hcnm", state):
            if not isinstance(t, Tensor) or tuple(t.shape) != (B, NH, DH):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(f"{name}: state {sname}: expected shape {(B, NH, DH)}, got {got} (state from another config or batch?)")
    return B, T, NH, DH


# ----------------------------------------------------------------------------------------------
# Reference (the spec)


def _step_reference(wx_t: Tensor, R: Tensor, b: Tensor, state: State) -> tuple[Tensor, State]:
    """One step of eqs. 8-10 and 15-17. wx_t: (B, 4, NH, DH) in the compute dtype."""
    h, c, n, m = state
    raw = wx_t + torch.einsum("bhd,hdgk->bghk", h, R) + b  # (B, 4, NH, DH)
    ir, fr, zr, orr = raw.unbind(1)
    logf = F.logsigmoid(fr)
    m_new = torch.maximum(logf + m, ir)
    ip = torch.exp(ir - m_new)
    fp = torch.exp(logf + m - m_new)
    c_new = fp * c + ip * torch.tanh(zr)
    n_new = fp * n + ip
    h_new = torch.sigmoid(orr) * c_new / n_new
    return h_new, (h_new, c_new, n_new, m_new)


def _forward_reference(wx, R, b, state, mask):
    """The spec: ``_step_reference`` in a loop over T >= 1 (masked steps keep the state)."""
    ys = []
    for t in range(wx.shape[1]):
        y, new = _step_reference(wx[:, t], R, b, state)
        if mask is not None:
            keep = mask[:, t].view(-1, 1, 1)
            new = tuple(torch.where(keep, a, o) for a, o in zip(new, state))
            y = new[0]
        state = new
        ys.append(y)
    return torch.stack(ys, 1), state


# ----------------------------------------------------------------------------------------------
# Fused: hand-written forward and backward loops


class _SLSTMFn(torch.autograd.Function):
    """Fused sLSTM over a sequence (see the module docstring). Layout inside: (T, NH, B, .)."""

    @staticmethod
    def forward(ctx, xb, R, h0, c0, n0, m0):
        # xb: (T, NH, B, 4*DH) = W x + b ; R: (NH, DH, 4*DH) ; states: (NH, B, DH)
        T, NH, B, G = xb.shape
        DH = G // 4
        H = xb.new_empty(T + 1, NH, B, DH)
        C = torch.empty_like(H)
        N = torch.empty_like(H)
        M = torch.empty_like(H)
        RAW = xb.new_empty(T, NH, B, G)
        IP, FP, Z, O = (xb.new_empty(T, NH, B, DH) for _ in range(4))
        H[0], C[0], N[0], M[0] = h0, c0, n0, m0
        for t in range(T):
            raw = torch.baddbmm(xb[t], H[t], R, out=RAW[t])  # (NH, B, 4 DH)
            ir, fr, zr, orr = raw.split(DH, -1)
            mf = F.logsigmoid(fr).add_(M[t])
            mt = torch.maximum(mf, ir, out=M[t + 1])
            ip = torch.exp(ir - mt, out=IP[t])
            fp = torch.exp(mf.sub_(mt), out=FP[t])
            z = torch.tanh(zr, out=Z[t])
            o = torch.sigmoid(orr, out=O[t])
            c = torch.mul(fp, C[t], out=C[t + 1]).addcmul_(ip, z)
            n = torch.addcmul(ip, fp, N[t], out=N[t + 1])
            torch.mul(o, c, out=H[t + 1]).div_(n)
        ctx.save_for_backward(R, RAW, H, C, N, M, IP, FP, Z, O)
        return H[1:], H[-1].clone(), C[-1].clone(), N[-1].clone(), M[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, ghT, gcT, gnT, gmT):
        R, RAW, H, C, N, M, IP, FP, Z, O = ctx.saved_tensors
        T, NH, B, G = RAW.shape
        DH = G // 4
        zeros = lambda: torch.zeros_like(H[0])  # noqa: E731
        gy = torch.zeros_like(H[1:]) if gy is None else gy
        gh = zeros() if ghT is None else ghT.clone()
        gc = zeros() if gcT is None else gcT.clone()
        gn = zeros() if gnT is None else gnT.clone()
        gmT = zeros() if gmT is None else gmT
        # factors independent of the incoming gradient, for all steps at once
        fr = RAW[..., DH : 2 * DH]
        Hn, Cn, Nn = H[1:], C[1:], N[1:]
        inv_n = Nn.reciprocal()
        K_c = O * inv_n  # d h / d c
        K_n = -Hn * inv_n  # d h / d n
        K_o = (Cn * inv_n) * O * (1 - O)  # d h / d o~
        Kf = FP * torch.sigmoid(-fr)  # d f' / d f~ (stabiliser fixed)
        K_fc, K_fn = C[:-1] * Kf, N[:-1] * Kf
        K_iz, K_z = Z * IP, IP * (1 - Z * Z)
        # the returned final m: its gradient plus the rescaling of the returned c, n, routed along
        # the argmax chain of m_t = max(log f_t + m_{t-1}, i~_t)
        Gm = gmT - gc * C[-1] - gn * N[-1]
        extra_i = extra_f = None
        gm0 = zeros()
        if bool((Gm != 0).any()):
            ir = RAW[..., :DH]
            carry = ((F.logsigmoid(fr) + M[:-1]) >= ir).to(Gm.dtype)  # (T, NH, B, DH)
            after = torch.ones_like(carry)
            after[:-1] = carry.flip(0).cumprod(0).flip(0)[1:]
            extra_f = after * carry * Gm * torch.sigmoid(-fr)
            extra_i = after * (1 - carry) * Gm
            gm0 = after[0] * carry[0] * Gm
        GRAW = torch.empty_like(RAW)
        Rt = R.transpose(1, 2)  # (NH, 4 DH, DH)
        for t in range(T - 1, -1, -1):
            gh = gh.add_(gy[t])
            gc = gc.addcmul_(gh, K_c[t])
            gn = gn.addcmul_(gh, K_n[t])
            gi, gf, gz, go = GRAW[t].split(DH, -1)
            torch.mul(gc, K_iz[t], out=gi).addcmul_(gn, IP[t])
            torch.mul(gc, K_fc[t], out=gf).addcmul_(gn, K_fn[t])
            torch.mul(gc, K_z[t], out=gz)
            torch.mul(gh, K_o[t], out=go)
            if extra_i is not None:
                gi.add_(extra_i[t])
                gf.add_(extra_f[t])
            if t == 0:  # explicit dependence of f'_1 on m_0
                gm0 = gm0 + (gc * C[0] + gn * N[0]) * FP[0]
            gc = gc.mul_(FP[t])
            gn = gn.mul_(FP[t])
            gh = torch.bmm(GRAW[t], Rt)  # (NH, B, DH)
        gR = torch.bmm(H[:-1].permute(1, 3, 0, 2).reshape(NH, DH, T * B), GRAW.permute(1, 0, 2, 3).reshape(NH, T * B, G))
        return GRAW, gR, gh, gc, gn, gm0


def _forward_fused(wx, R, b, state):
    B, T, _, NH, DH = wx.shape
    xb = (wx + b).permute(1, 3, 0, 2, 4).reshape(T, NH, B, 4 * DH)  # (T, NH, B, 4 DH)
    Rf = R.reshape(NH, DH, 4 * DH)
    st = [s.transpose(0, 1) for s in state]  # (NH, B, DH)
    y, h, c, n, m = _SLSTMFn.apply(xb, Rf, *st)
    y = y.permute(2, 0, 1, 3)  # (B, T, NH, DH)
    return y, tuple(s.transpose(0, 1) for s in (h, c, n, m))


def _step_fast(wx_t: Tensor, R: Tensor, b: Tensor, state: State) -> tuple[Tensor, State]:
    """One step in the fused layout: ``raw = (W x + b) + h R`` as one baddbmm over heads, then the
    gates as in ``_SLSTMFn.forward`` (autograd differentiates it). wx_t: (B, 4, NH, DH)."""
    B, _, NH, DH = wx_t.shape
    h, c, n, m = (s.transpose(0, 1) for s in state)  # (NH, B, DH)
    xb = (wx_t + b).permute(2, 0, 1, 3).reshape(NH, B, 4 * DH)  # (NH, B, 4 DH)
    raw = torch.baddbmm(xb, h, R.reshape(NH, DH, 4 * DH))  # (NH, B, 4 DH)
    ir, fr, zr, orr = raw.split(DH, -1)
    mf = F.logsigmoid(fr) + m
    m_new = torch.maximum(mf, ir)
    ip = torch.exp(ir - m_new)
    fp = torch.exp(mf - m_new)
    c_new = torch.addcmul(fp * c, ip, torch.tanh(zr))
    n_new = torch.addcmul(ip, fp, n)
    h_new = torch.sigmoid(orr) * c_new / n_new
    new = tuple(t.transpose(0, 1) for t in (h_new, c_new, n_new, m_new))  # (B, NH, DH)
    return new[0], new  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Public entry points


@no_autocast
def slstm_forward(
    wx: Tensor,
    R: Tensor,
    b: Tensor,
    *,
    initial_state: State | None = None,
    return_state: bool = False,
    mask: Tensor | None = None,
    backend: str | None = None,
):
    """sLSTM over a sequence.

    Args:
        wx: (B, T, 4, NH, DH) input contributions ``W x_t`` to the gates i, f, z, o.
        R: (NH, DH, 4, DH) block-diagonal recurrent weights (one DH x 4 DH block per head).
        b: (4, NH, DH) gate biases.
        initial_state: optional (h, c, n, m), each (B, NH, DH); ``None`` is the empty state.
        return_state: also return the final state (fp32).
        mask: optional (B, T) bool/0-1; where 0 the state is left unchanged (padding). Masked
            sequences run the reference loop.
        backend: ``"reference"`` or ``"fast"``; ``None`` uses the default of op ``"slstm"``
            (``rizzearch.ops.backends``).

    Returns:
        y (B, T, NH, DH) in wx's dtype (y_t = h_t), and the final state when ``return_state``.
    """
    B, T, NH, DH = _check(wx, R, b, initial_state, step=False, name="slstm_forward")
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ShapeError(f"slstm_forward: mask: expected shape {(B, T)}, got {tuple(mask.shape)}")
    dt = compute_dtype(wx.dtype)
    state = empty_state(B, NH, DH, wx.device, dt) if initial_state is None else tuple(s.to(dt) for s in initial_state)
    wxf, Rf, bf = wx.to(dt), R.to(dt), b.to(dt)
    if mask is not None and bool(mask.all()):
        mask = None
    if T == 0:
        y = wx.new_zeros(B, 0, NH, DH)
    elif mask is None and backends.resolve("slstm", backend) == "fast":
        y, state = _forward_fused(wxf, Rf, bf, state)
    else:
        y, state = _forward_reference(wxf, Rf, bf, state, None if mask is None else mask.bool())
    y = y.to(wx.dtype)
    return (y, state) if return_state else y


@no_autocast
def slstm_step(wx: Tensor, R: Tensor, b: Tensor, state: State | None = None, *, backend: str | None = None):
    """One sLSTM step.

    Args:
        wx: (B, 4, NH, DH) input contributions to the gates i, f, z, o.
        R: (NH, DH, 4, DH) recurrent weights; b: (4, NH, DH) biases.
        state: (h, c, n, m), each (B, NH, DH); ``None`` is the empty state.
        backend: ``"reference"`` or ``"fast"`` (see the module docstring); ``None`` uses the
            default of op ``"slstm"``.

    Returns:
        (h (B, NH, DH) in wx's dtype, new state (h, c, n, m) in fp32).
    """
    B, _, NH, DH = _check(wx, R, b, state, step=True, name="slstm_step")
    step = _step_fast if backends.resolve("slstm", backend) == "fast" else _step_reference
    dt = compute_dtype(wx.dtype)
    state = empty_state(B, NH, DH, wx.device, dt) if state is None else tuple(s.to(dt) for s in state)
    h, new = step(wx.to(dt), R.to(dt), b.to(dt), state)
    return h.to(wx.dtype), new
