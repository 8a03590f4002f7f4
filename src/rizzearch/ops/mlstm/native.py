"""The non-matmul pieces of the xLSTM-7B layer as single C calls (``csrc/mlstm_step.c``), for
decoding (one token) and prefill (T tokens) alike.

Between its projections the mLSTM layer is ~25 torch ops (gate soft caps, the stabilised step of
paper eqs. 19-21 or its chunkwise form, the per-head LayerNorm, the output gate); at small widths
that is per-op overhead, not arithmetic. Here each piece is one call into C that reads its inputs
once and writes fresh outputs (the caller's state is never modified):

- ``rms_norm(x, w, b, eps)``: RMSNorm of (N, D) rows; ``rms_norm_gates(x, w, b, eps, gw, gb)``
  also the gate pre-activations of the normed rows (a linear layer with few outputs: the 2 NH gates),
  each row's while it is in cache.
- ``mlstm_layer(proj, gates, state, ..., T, mask)``: soft-capped gates, the mLSTM (paper eqs.
  19-21) per (row, head), the per-head LayerNorm and ``sigmoid(o) *``: (B T, 2 qk + 2 v)
  projections -> (B T, v) and the state after the last token. One token is the stabilised step on
  the fp32 state; T > 1 is the chunkwise form in chunks of 16 tokens, its products as 16-wide
  register blocks (the state is rounded once a chunk: the fp32 recurrent form, rounded every
  token, was 4x less accurate on ill-conditioned heads).
- ``swiglu(gu)``: ``silu(gate) * up`` of a (N, 2F) ``[gate | up]`` projection.
- ``soft_cap_(x, cap)``: ``cap tanh(x / cap)`` in place.

Inference only: float32, contiguous, CPU tensors, no gradient. ``decode_lib()`` is None when no C
compiler is there; callers then take the torch path (``models/xlstm_large.py``), which the tests
compare these against (op ``xlstm_fused`` in ``ops/backends.py``). The exp and tanh of the
elementwise pieces are the C file's vectorisable forms (relative error below 4e-7, tested in
``tests/ops/test_mlstm_native.py``).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from rizzearch.ops import backends
from rizzearch.ops._common import load_native_kernel
from rizzearch.ops.wlinear import threads_for

__all__ = ["decode_lib", "rms_norm", "rms_norm_gates", "mlstm_layer", "swiglu", "soft_cap_", "PAD_IGATE", "PAD_FGATE"]

# A padded token's gates (after the cap): a closed input gate (exp(-1e4 - m) is exactly 0 in fp32)
# and an open forget gate (logsigmoid(1e4) = 0): the state passes through unchanged.
PAD_IGATE, PAD_FGATE = -1e4, 1e4

_lib = None  # the loaded library; False after a failed build or without a compiler
_I, _F, _P, _T = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "xl_rms_norm": [_I, _I, _F, _P, _P, _P, _P, _T],
    "xl_mlstm_layer": [_I] * 5 + [_F] * 4 + [_P] * 13 + [_T],
    "xl_swiglu": [_I, _I, _P, _P, _T],
    "xl_rms_norm_gates": [_I, _I, _I, _F, _P, _P, _P, _P, _P, _P, _P, _T],
    "xl_soft_cap": [_I, _I, _F, _P, _T],
    "mlstm_step_f32": [_I] * 3 + [_F] + [_P] * 12,  # the op mlstm_step's fast form (``ops.mlstm``)
}


def decode_lib():
    """The C kernels of ``csrc/mlstm_step.c`` (built once per user, CPU model and source version), or
    None if unavailable: this module's pieces and the op ``mlstm_step``'s fast form."""
    global _lib
    if _lib is not None:
        return _lib or None
    _lib = False
    loaded = load_native_kernel("mlstm_step.c", portable=True)
    if loaded is not None:
        _lib = bind(*loaded)
    return _lib or None


def bind(lib: ctypes.CDLL, openmp: bool) -> ctypes.CDLL:
    """Declare the C functions' signatures on a loaded ``mlstm_step.c`` library."""
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.xl_mlstm_scratch.argtypes, lib.xl_mlstm_scratch.restype = [_I, _I], _I
    lib.openmp = openmp
    return lib


backends.register_probe("xlstm_fused", lambda: decode_lib() is not None)


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _threads(n_elements: int, min_elements: int = 100_000) -> int:
    return threads_for(n_elements, openmp=_lib.openmp, min_elements=min_elements)


def rms_norm(x: Tensor, w: Tensor, b: Tensor | None, eps: float) -> Tensor:
    """x (N, D) -> x / sqrt(mean(x^2) + eps) * w (+ b), a new (N, D) tensor."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _lib.xl_rms_norm(x.shape[0], x.shape[1], eps, x.data_ptr(), w.data_ptr(), _ptr(b), out.data_ptr(), _threads(x.numel(), 32_768))
    return out


def rms_norm_gates(x: Tensor, w: Tensor, b: Tensor | None, eps: float, gw: Tensor, gb: Tensor | None) -> tuple[Tensor, Tensor]:
    """x (N, D) -> ``rms_norm(x, w, b, eps)`` (N, D) and its product with ``gw`` (G, D) (+ ``gb``) (N, G),
    for few outputs G (the gate pre-activations; MKL's GEMM is ~4x slower for 8), in one pass over the rows."""
    x, gw = x.contiguous(), gw.contiguous()
    N, D = x.shape
    out, gates = torch.empty_like(x), torch.empty(N, gw.shape[0])
    _lib.xl_rms_norm_gates(
        N, D, gw.shape[0], eps, x.data_ptr(), w.data_ptr(), _ptr(b), gw.data_ptr(), _ptr(gb), out.data_ptr(), gates.data_ptr(),
        _threads(x.numel(), 32_768),
    )
    return out, gates


def mlstm_layer(proj: Tensor, gates: Tensor, state: dict, head_w: Tensor, head_b: Tensor | None,
                dims: tuple[int, int, int], gate_cap: float | None, eps: float,
                T: int = 1, mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """T tokens of the xLSTM-7B mLSTM layer between its projections, B rows.

    Args:
        proj: (B T, NH (2 Dqk + 2 Dv)) the ``[q | k | v | o]`` projection, rows ordered (b, t);
            gates: (B T, 2 NH) the ``[i | f]`` pre-activations (soft-capped here at ``gate_cap``,
            None: no cap).
        state: ``{"C": (B, NH, Dqk, Dv), "n": (B, NH, Dqk), "m": (B, NH)}``, fp32 contiguous (not
            modified).
        head_w, head_b: the per-head LayerNorm's (NH Dv) weight and optional bias.
        dims: (NH, Dqk, Dv).
        mask: (B, T) bool or None; False: a padded token (``PAD_IGATE``/``PAD_FGATE`` gates).

    Returns:
        (B T, NH Dv) ``sigmoid(o) * LayerNorm_head(h)``, and the state after the last token.
    """
    NH, Dqk, Dv = dims
    B = proj.shape[0] // T
    proj, gates = proj.contiguous(), gates.contiguous()  # (a wrapped projection may return a view)
    C, n, m = state["C"], state["n"], state["m"]
    C_out, n_out, m_out = torch.empty_like(C), torch.empty_like(n), torch.empty_like(m)
    scratch = torch.empty(B * NH * _lib.xl_mlstm_scratch(Dqk, Dv)) if T > 1 else None
    mk = None if mask is None else mask.to(torch.uint8).contiguous()
    out = torch.empty(B * T, NH * Dv)
    _lib.xl_mlstm_layer(
        B, T, NH, Dqk, Dv, gate_cap or 0.0, eps, PAD_IGATE, PAD_FGATE, proj.data_ptr(), gates.data_ptr(), _ptr(mk),
        C.data_ptr(), n.data_ptr(), m.data_ptr(), head_w.data_ptr(), _ptr(head_b), C_out.data_ptr(), n_out.data_ptr(),
        m_out.data_ptr(), _ptr(scratch), out.data_ptr(), _threads(B * NH * T * Dqk * Dv) if B * NH > 1 else 1,
    )
    return out, {"C": C_out, "n": n_out, "m": m_out}


def swiglu(gu: Tensor) -> Tensor:
    """gu (N, 2F) = [gate | up] -> silu(gate) * up (N, F)."""
    gu = gu.contiguous()
    N, F2 = gu.shape
    out = torch.empty(N, F2 // 2)
    _lib.xl_swiglu(N, F2 // 2, gu.data_ptr(), out.data_ptr(), _threads(gu.numel()))
    return out


def soft_cap_(x: Tensor, cap: float) -> Tensor:
    """x = cap tanh(x / cap), in place (fp32; a non-contiguous x through torch's ops)."""
    if not x.is_contiguous():
        return x.div_(cap).tanh_().mul_(cap)
    D = x.shape[-1]
    _lib.xl_soft_cap(x.numel() // D, D, cap, x.data_ptr(), _threads(x.numel()))
    return x
