"""The non-matmul pieces of an xLSTM-7B decode step as single C calls (``csrc/mlstm_step.c``).

Decoding one token at a small width is dominated by per-op overhead, not arithmetic: the mLSTM
layer between its projections is ~25 torch ops (gate soft caps, the stabilised step of paper eqs.
19-21, the per-head LayerNorm, the output gate). Here each piece is one call into C that reads its
inputs once and writes fresh outputs (the caller's state is never modified):

- ``rms_norm(x, w, b, eps)``: RMSNorm of (B, D) rows.
- ``mlstm_layer_step(proj, gates, state, ...)``: soft-capped gates, the mLSTM step, per-head
  LayerNorm and ``sigmoid(o) *``: (B, 2 qk + 2 v) projections -> (B, v) and the new state.
- ``swiglu(gu)``: ``silu(gate) * up`` of a (B, 2F) ``[gate | up]`` projection.
- ``soft_cap_(x, cap)``: ``cap tanh(x / cap)`` in place (three in-place torch ops: torch's
  vectorised tanh is ~15x faster than libm's ``tanhf`` over a vocabulary of logits).

Inference only: float32, contiguous, CPU tensors, no gradient. ``decode_lib()`` is None when no C
compiler is there; callers then take the torch path (``models/xlstm_large.py``), which the tests
compare these against.
"""

from __future__ import annotations

import ctypes
import warnings

import torch
from torch import Tensor

from rizzearch.ops._common import load_c_library

__all__ = ["decode_lib", "rms_norm", "mlstm_layer_step", "swiglu", "soft_cap_"]

_lib = None  # the loaded library; False after a failed build or without a compiler
_I, _F, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "xl_rms_norm": [_I, _I, _F, _P, _P, _P, _P],
    "xl_mlstm_layer_step": [_I, _I, _I, _I, _F, _F] + [_P] * 11,
    "xl_swiglu": [_I, _I, _P, _P],
    "mlstm_step_f32": [_I] * 3 + [_F] + [_P] * 12,  # the op mlstm_step's fast form (``ops.mlstm``)
}


def decode_lib():
    """The C kernels of ``csrc/mlstm_step.c`` (built once per user and source version), or None if
    unavailable: this module's decode pieces and the op ``mlstm_step``'s fast form."""
    global _lib
    if _lib is not None:
        return _lib or None
    _lib = False
    try:
        loaded = load_c_library("mlstm_step.c", [["-O3"]])
    except Exception as e:  # a compiler that fails, read-only cache, ...: the torch path is always there
        warnings.warn(f"xLSTM native decode unavailable ({type(e).__name__}: {e}); using torch ops", stacklevel=2)
        return None
    if loaded is not None:
        lib = loaded[0]
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        _lib = lib
    return _lib or None


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def rms_norm(x: Tensor, w: Tensor, b: Tensor | None, eps: float) -> Tensor:
    """x (B, D) -> x / sqrt(mean(x^2) + eps) * w (+ b), a new (B, D) tensor."""
    out = torch.empty_like(x)
    _lib.xl_rms_norm(x.shape[0], x.shape[1], eps, x.data_ptr(), w.data_ptr(), _ptr(b), out.data_ptr())
    return out


def mlstm_layer_step(proj: Tensor, gates: Tensor, state: dict, head_w: Tensor, head_b: Tensor | None,
                     dims: tuple[int, int, int], gate_cap: float | None, eps: float) -> tuple[Tensor, dict]:
    """One token of the xLSTM-7B mLSTM layer between its projections.

    Args:
        proj: (B, NH (2 Dqk + 2 Dv)) the ``[q | k | v | o]`` projection; gates: (B, 2 NH) the
            ``[i | f]`` pre-activations (soft-capped here at ``gate_cap``, None: no cap).
        state: ``{"C": (B, NH, Dqk, Dv), "n": (B, NH, Dqk), "m": (B, NH)}`` (not modified).
        head_w, head_b: the per-head LayerNorm's (NH Dv) weight and optional bias.
        dims: (NH, Dqk, Dv).

    Returns:
        (B, NH Dv) ``sigmoid(o) * LayerNorm_head(h)``, and the new state.
    """
    NH, Dqk, Dv = dims
    B = proj.shape[0]
    C, n, m = state["C"], state["n"], state["m"]
    C_out, n_out, m_out = torch.empty_like(C), torch.empty_like(n), torch.empty_like(m)
    out = torch.empty(B, NH * Dv)
    _lib.xl_mlstm_layer_step(
        B, NH, Dqk, Dv, gate_cap or 0.0, eps, proj.data_ptr(), gates.data_ptr(), C.data_ptr(), n.data_ptr(), m.data_ptr(),
        head_w.data_ptr(), _ptr(head_b), C_out.data_ptr(), n_out.data_ptr(), m_out.data_ptr(), out.data_ptr(),
    )
    return out, {"C": C_out, "n": n_out, "m": m_out}


def swiglu(gu: Tensor) -> Tensor:
    """gu (B, 2F) = [gate | up] -> silu(gate) * up (B, F)."""
    B, F2 = gu.shape
    out = torch.empty(B, F2 // 2)
    _lib.xl_swiglu(B, F2 // 2, gu.data_ptr(), out.data_ptr())
    return out


def soft_cap_(x: Tensor, cap: float) -> Tensor:
    """x = cap tanh(x / cap), in place."""
    return x.div_(cap).tanh_().mul_(cap)
