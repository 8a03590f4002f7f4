"""Weight-only low-precision linear layers for decoding: fp32 activations, fp32 / bf16 / int8 weights.

Batch-1 decoding reads every weight once per token and does two flops per weight read, so on a CPU
its time is the weight bytes over the memory read bandwidth. Storing the weights in bf16 halves
those bytes and int8 (one scale per output channel) quarters them; the activations and the
accumulation stay fp32, so the only error is the rounding of the weights themselves.

    y = x @ W^T + b,  W[j, :] = scale[j] * q[j, :]  (int8: q = round(W / scale), scale = max|W[j]| / 127)

Forms (op ``"wlinear"`` of ``rizzearch.ops.backends``, table in ``docs/backends.md``):

- ``reference``: ``linear_ref``, the weights widened to fp32 (``dequantize``) and ``F.linear``.
- ``fast``: ``csrc/wlinear.c``, one call that streams the packed weights once for all rows of x
  (fp32 accumulation, OpenMP over the outputs), on CPU for up to ``MAX_ROWS`` rows; else the
  reference form (no C compiler, a failed build, other devices, more rows).

A ``Packed`` weight reads fp32 and bf16 parameters in place (no copy: in-place edits are seen);
``pack(w, "int8")`` and ``pack(fp32_w, "bf16")`` are copies, snapshots that ``packed_for`` refreshes
when the parameter gets new storage and after any optimizer step (a public global step hook); other
in-place edits need ``forget(w)`` (the models' ``clear_decode_cache``).
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from rizzearch.errors import ConfigError
from rizzearch.ops import backends
from rizzearch.ops._common import load_native_kernel

FORMATS = ("fp32", "bf16", "int8")
_CODES = {"fp32": 0, "bf16": 1, "int8": 2}
MAX_ROWS = 16  # more rows than this are a matrix-matrix product: BLAS is better at those
# Below this many weights a product takes microseconds and an OpenMP fork costs more than it saves.
THREADED_MIN_ELEMENTS = 100_000

_LIB = None  # ctypes library; False once building failed or there is no compiler


@dataclass(frozen=True)
class Packed:
    """A weight (N, K) in one of ``FORMATS``: ``data`` float32, bfloat16 or int8; ``scale`` (N,) fp32 for int8."""

    fmt: str
    data: Tensor
    scale: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def nbytes(self) -> int:
        """Bytes a product reads from this weight (the data and the scales)."""
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * 4 if self.scale is not None else 0)


def check_format(fmt: str, where: str = "weight format") -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"{where}: unknown weight format {fmt!r}; expected one of {list(FORMATS)}")
    return fmt


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: w (N, K) -> q (N, K) int8, scale (N,) fp32 with w ~ scale[:, None] * q."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: q = 0, any scale
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def pack(w: Tensor, fmt: str) -> Packed:
    """``w`` (N, K) as a ``Packed`` weight in ``fmt``: in place when it already is that dtype, else a copy."""
    check_format(fmt)
    if w.dim() != 2:
        raise ConfigError(f"pack: expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    w = w.detach()
    if fmt == "int8":
        return Packed("int8", *quantize_int8(w))
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    return Packed(fmt, w.to(dtype).contiguous())


def dequantize(p: Packed) -> Tensor:
    """The fp32 weight (N, K) a ``Packed`` stands for."""
    w = p.data.float()
    return w * p.scale[:, None] if p.scale is not None else w


def linear_ref(x: Tensor, p: Packed, bias: Tensor | None = None) -> Tensor:
    """The reference form: x (..., K) fp32 -> (..., N) fp32 through the dequantized weight."""
    return F.linear(x.float(), dequantize(p), None if bias is None else bias.float())


def library():
    """Build (once, cached on disk) and load ``csrc/wlinear.c``; None when it cannot be built."""
    global _LIB
    if _LIB is not None:
        return _LIB or None
    _LIB = False
    loaded = load_native_kernel("wlinear.c", portable=True)  # None: no compiler or no build
    if loaded is not None:
        lib = loaded[0]
        lib.wl_linear.restype = ctypes.c_int
        lib.wl_linear.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_int]
        _LIB = lib
    return _LIB or None


backends.register_probe("wlinear", lambda: library() is not None)


_load = [-1e9, 0.0]  # (when read, 1-minute load average): read at most once a second


def cores_are_free() -> bool:
    """False while the machine is oversubscribed (1-minute load average >= cores + 1). Then a
    multi-threaded call waits at its join for a descheduled thread, often for a whole time slice
    (decoding SmolLM2 on 2 threads at load 18 took 2.4 s a token instead of 0.2 s on one), so the
    kernels run on one thread. Every output is computed by one thread in the same order whatever the
    thread count, so this changes the time, never the numbers."""
    now = time.monotonic()
    if now - _load[0] > 1.0:
        try:
            _load[:] = [now, os.getloadavg()[0]]
        except OSError:  # no load average on this platform
            _load[:] = [now, 0.0]
    return _load[1] < (os.cpu_count() or 1) + 1


def threads_for(n_elements: int, openmp: bool | None = None, min_elements: int = THREADED_MIN_ELEMENTS) -> int:
    """Threads for one native call over ``n_elements`` weights: torch's thread count when the call is
    big enough to gain (``min_elements``), the library has OpenMP (``openmp``; None: this module's
    kernel) and the cores are free (``cores_are_free``), else 1. Shared by the decode kernels."""
    n = torch.get_num_threads()
    openmp = bool(_LIB and _LIB.openmp) if openmp is None else openmp
    return n if n > 1 and n_elements >= min_elements and openmp and cores_are_free() else 1


def linear(x: Tensor, p: Packed, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """y = x @ W^T + bias with W packed: x (..., K) -> (..., N) fp32 (see the module docstring)."""
    N, K = p.shape
    if x.shape[-1] != K:
        raise ConfigError(f"wlinear: input has {x.shape[-1]} features, the weight expects {K}")
    rows = x.numel() // K if K else 0
    if (
        backends.resolve("wlinear", backend) == "fast"
        and x.device.type == "cpu"
        and p.data.device.type == "cpu"
        and 0 < rows <= MAX_ROWS
        and not torch.is_grad_enabled()
    ):
        lib = library()
        if lib is not None:
            return _fast(lib, x, p, bias, rows)
    return linear_ref(x, p, bias)


def _fast(lib, x: Tensor, p: Packed, bias: Tensor | None, rows: int) -> Tensor:
    N, K = p.shape
    xc = x.reshape(rows, K)
    xc = xc if xc.dtype == torch.float32 and xc.is_contiguous() else xc.float().contiguous()
    b = None if bias is None else (bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.float().contiguous())
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    lib.wl_linear(
        _CODES[p.fmt], p.data.data_ptr(), None if p.scale is None else p.scale.data_ptr(),
        None if b is None else b.data_ptr(), xc.data_ptr(), rows, K, N, y.data_ptr(), threads_for(N * K),
    )  # fmt: skip
    return y


# ----------------------------------------------------------------------------------------------
# Packed copies of parameters, kept current


_steps = 0  # optimizer steps taken anywhere since import: packed copies older than the last one are stale


def _count_step(*_args) -> None:
    global _steps
    _steps += 1


register_optimizer_step_post_hook(_count_step)


def optimizer_steps() -> int:
    """How many optimizer steps were taken in this process (packed copies watch this)."""
    return _steps


_ATTR = "_rizz_packed"  # the cache lives on the parameter itself: {fmt: (key, Packed)} (tensors are not hashable keys)


def weight_key(w: Tensor) -> tuple:
    """What a cached copy of ``w`` depends on: its storage, shape and dtype, and the optimizer steps."""
    return (w.data_ptr(), _steps, tuple(w.shape), w.dtype)


def packed_for(w: Tensor, fmt: str | None = None) -> Packed:
    """``w`` (a 2-D parameter) packed in ``fmt`` (None: its own dtype, fp32 or bf16, read in place).

    A copy (int8, or bf16 of an fp32 weight) is cached on ``w`` and rebuilt when ``w`` gets new
    storage, a new shape or dtype, or after an optimizer step; after any other in-place edit call
    ``forget(w)`` (or the model's ``clear_decode_cache``).
    """
    if fmt is None or (fmt == "fp32" and w.dtype == torch.float32) or (fmt == "bf16" and w.dtype == torch.bfloat16):
        if w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous():
            return Packed("fp32" if w.dtype == torch.float32 else "bf16", w.detach())
        fmt = fmt or "fp32"
    per = getattr(w, _ATTR, None)
    if per is None:
        per = {}
        setattr(w, _ATTR, per)
    key = weight_key(w)
    hit = per.get(fmt)
    if hit is None or hit[0] != key:
        per[fmt] = hit = (key, pack(w, fmt))
    return hit[1]


def forget(w: Tensor) -> None:
    """Drop the packed copies of ``w`` (the next ``packed_for`` rebuilds them)."""
    if hasattr(w, _ATTR):
        delattr(w, _ATTR)
