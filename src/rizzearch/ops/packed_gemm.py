"""Matrix products against weights packed once for MKL's GEMM (``cblas_sgemm_pack`` /
``cblas_sgemm_compute``, which torch's x86 CPU library exports).

Every ``F.linear`` call on the CPU copies the weight into MKL's internal panel layout before it
multiplies. For a 256-row prefill of the small xLSTM-7B config that copy is ~13% of the matmul time
(``mkl_blas_avx512_sgemm_scopy_*`` in a profile), more when the weight comes from memory. Packed
once, the products read the panels directly: the same kernels on the same data, so the results are
the same bits as ``F.linear`` for a full prefill (tested; a handful of rows may take another kernel
and round differently). The packed copy costs as much memory as the weight, so it is opt-in
(``XLSTMLarge.set_matmul_weights("packed")``).

A copy is cached on its weight and rebuilt when the weight gets new storage, a new shape or dtype,
is modified in place (its version counter: optimizer steps, ``load_state_dict``, ``param.add_``) or
after any optimizer step; an edit through ``param.data`` is not seen: call ``forget(w)`` (or the
model's ``clear_decode_cache()``) after one. ``available()`` is False with another BLAS (no such
symbols): callers then use ``F.linear``.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor

from rizzearch.errors import ConfigError
from rizzearch.ops.wlinear import weight_key

__all__ = ["available", "packed", "linear", "forget", "PACK_ROWS"]

PACK_ROWS = 256  # the row count MKL is told to pack for (products with any other count work too)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
_ATTR = "_rizz_mkl_packed"  # the cache lives on the weight: (key, packed buffer)
_fns = None  # (pack_get_size, pack, compute), or False when unavailable


def _load():
    global _fns
    if _fns is None:
        _fns = False
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
        except (OSError, AttributeError):  # another platform or BLAS: no packed GEMM
            return None
        I, F, P = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        size.restype, size.argtypes = ctypes.c_size_t, [I] * 4
        pack.restype, pack.argtypes = None, [I] * 6 + [F, P, I, P]
        compute.restype, compute.argtypes = None, [I] * 6 + [P, I, P, I, F, P, I]
        _fns = (size, pack, compute)
    return _fns or None


def available() -> bool:
    """Whether MKL's packed GEMM can be called here (x86 torch builds with MKL)."""
    return _load() is not None


def _key(w: Tensor) -> tuple:
    return (*weight_key(w), w._version)  # wlinear's key, and in-place edits seen through the version counter


def packed(w: Tensor) -> Tensor:
    """``w`` (N, K), fp32, packed as the right operand of ``x @ w^T`` (cached on ``w``, see the module
    docstring); a flat fp32 buffer only ``linear`` reads."""
    fns = _load()
    if fns is None:
        raise ConfigError("packed matmul weights need MKL's packed GEMM (x86 torch with MKL); this torch has none")
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu":
        raise ConfigError(f"packed matmul weights: expected a 2-D float32 CPU weight, got {tuple(w.shape)} {w.dtype} on {w.device}")
    key, hit = _key(w), getattr(w, _ATTR, None)
    if hit is None or hit[0] != key:
        size, pack, _ = fns
        N, K = w.shape
        wc = w.detach().contiguous()
        buf = torch.empty((size(_B_MATRIX, PACK_ROWS, N, K) + 3) // 4 + 16)
        pack(_ROW_MAJOR, _B_MATRIX, _TRANS, PACK_ROWS, N, K, 1.0, wc.data_ptr(), K, buf.data_ptr())
        hit = (key, buf)
        setattr(w, _ATTR, hit)
    return hit[1]


def forget(w: Tensor) -> None:
    """Drop the packed copy of ``w`` (the next ``packed`` rebuilds it)."""
    if hasattr(w, _ATTR):
        delattr(w, _ATTR)


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None, out: Tensor | None = None, accumulate: bool = True) -> Tensor:
    """``x @ w^T (+ bias)`` for x (M, K) fp32 through ``w``'s packed copy: a new (M, N) tensor, or,
    with ``out`` (M, N, contiguous fp32), ``out += x @ w^T (+ bias)`` in place (a residual add;
    ``accumulate=False``: ``out = ...``)."""
    _, _, compute = _load()
    buf = packed(w)
    N, K = w.shape
    x = x.contiguous()
    M = x.shape[0]
    if out is None or not accumulate:
        out = torch.empty(M, N) if out is None else out
        beta = 0.0 if bias is None else 1.0
        if bias is not None:
            out.copy_(bias.expand(M, N))
    else:
        if bias is not None:
            out.add_(bias)
        beta = 1.0
    if M:
        compute(_ROW_MAJOR, _NO_TRANS, _PACKED, M, N, K, x.data_ptr(), K, buf.data_ptr(), K, beta, out.data_ptr(), N)
    return out
