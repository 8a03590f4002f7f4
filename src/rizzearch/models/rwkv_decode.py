"""Decoding RWKV-4 one token at a time: the eager recurrent step (the reference) and a fused C kernel.

``RWKV.forward`` with ``T == 1`` and no autograd calls ``decode``; both forms read the model's own
modules and parameters and give the same numbers up to summation order
(``tests/models/test_rwkv_decode.py`` compares them on 1, 2 and 3 threads, batch 1 and 3).

- ``eager_step`` (backend ``reference``): the recurrent form of the paper (eq. 14 one step, via
  ``rizzearch.ops.wkv.wkv_step``) written with the model's modules: any device, dtype, batch, and
  padding masks.
- ``fused_step`` (backend ``fast``): the whole token (embedding, ln0, every layer's ln1, token-shift
  mixes, r/k/v, the WKV step, the sigmoid gate, output, ln2 and channel mix, then ln_out and the
  head) in one call of ``csrc/rwkv_decode.c``, reading each weight matrix once for all rows of the
  batch, straight from the parameters (nn.Linear's (out, in) layout: every output is one dot
  product, no copies). Batch-1 decoding is dominated by per-op overhead and by streaming the
  weights once per token; eager PyTorch spends ~30 small kernels per layer on the glue around 5
  matrix-vector products. Used on CPU, float32, no padding mask, up to ``MAX_FUSED_BATCH`` rows,
  when the kernel builds (else the eager step: no C compiler means reference, as always).

Threads: with OpenMP (gcc/clang ``-fopenmp``) the call opens one parallel region; every matrix
product splits its *outputs* across the threads (each thread streams its own rows of every weight
matrix, the same rows every token), and the element-wise work follows the same split. The small
row-wide steps (the LayerNorms and token-shift mixes) are computed by every thread into private
buffers instead of being shared, so a layer needs three barriers: after the WKV gate, after the
output product and after the channel mix. Torch's own OpenMP runtime is reused (same
``libgomp.so.1``), so the thread count follows ``torch.set_num_threads``; without OpenMP the kernel
runs on one thread. Small models decode on one thread (``THREADED_MIN_ELEMENTS``).

Weight changes. Neither form caches a copy of any weight or of a value derived from one (the kernel
computes ``exp(time_decay)`` itself), so in-place updates (optimizer steps, ``load_state_dict``,
edits under ``torch.no_grad()`` or through ``param.data``) are seen by the next token with nothing
to call. The kernel keeps a table of the parameters' addresses per model, rebuilt when a parameter
gets new storage (``.to()``, ``load_state_dict(assign=True)``), when a parameter or module is
(re)registered anywhere (public ``torch.nn.modules.module`` registration hooks), after
``load_state_dict`` (a post hook) and on ``RWKV.clear_decode_cache()``. The one edit it cannot see
is a new layout at the same address (``param.data = param.data.t()``): call
``clear_decode_cache()`` after such an edit.

Backend: op ``"rwkv_decode"`` of ``rizzearch.ops.backends`` (table in ``docs/backends.md``).
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.ops import backends, wlinear
from rizzearch.ops._common import load_native_kernel
from rizzearch.ops.wkv import wkv_step

STATE_KEYS = ("att_x", "num", "den", "max", "ffn_x")  # the order the kernel reads and writes them

MAX_FUSED_BATCH = 16  # larger batches are better served by BLAS matrix-matrix products (eager path)
# Below this many matrix weights per layer a token takes a few microseconds per layer and the
# barriers of a multi-threaded call cost more than they save: such models decode on one thread.
THREADED_MIN_ELEMENTS = 200_000

_LIB = None  # ctypes library; False once building failed or there is no compiler
_THREADS: int | None = None  # forced thread count (tests, benchmarks); None = the policy above
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> FusedModel
_registrations = 0  # parameters/modules registered anywhere since import (see the module docstring)


def _count_registration(*_args) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


# ----------------------------------------------------------------------------------------------
# The reference: the recurrent form with the model's own modules


def eager_step(model, token: Tensor, state: dict, mask: Tensor | None) -> tuple[Tensor, dict]:
    """One token per row without autograd. token: (B,); state: the RWKV state dict; mask: (B, 1)
    bool or None (False keeps that row's state). Returns (logits (B, V), new state)."""
    x = model.ln0(model.emb(token))  # (B, C)
    new = {k: [] for k in STATE_KEYS}
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        xx = block.ln1(x)  # time mix: token shift from the state, eqs. 11-13
        sx = state["att_x"][i]
        d = xx - sx
        r = att.receptance(torch.addcmul(sx, att.time_mix_r, d))  # (B, A)
        k = att.key(torch.addcmul(sx, att.time_mix_k, d))
        v = att.value(torch.addcmul(sx, att.time_mix_v, d))
        wkv_state = (state["num"][i], state["den"][i], state["max"][i])
        y, (num, den, mx) = wkv_step(att.time_decay, att.time_first, k, v, wkv_state)  # eq. 14, fp32
        x = x + att.output(torch.sigmoid(r) * y.to(r.dtype))
        xx2 = block.ln2(x)  # channel mix, eqs. 16-18
        sx2 = state["ffn_x"][i]
        d2 = xx2 - sx2
        kk = torch.relu(ffn.key(torch.addcmul(sx2, ffn.time_mix_k, d2))).square_()  # (B, F)
        x = torch.addcmul(x, torch.sigmoid(ffn.receptance(torch.addcmul(sx2, ffn.time_mix_r, d2))), ffn.value(kk))
        st = {"att_x": xx, "num": num, "den": den, "max": mx, "ffn_x": xx2}
        if mask is not None:
            m = mask[:, 0:1]  # (B, 1)
            st = {key: torch.where(m, val, state[key][i]) for key, val in st.items()}
        for key in STATE_KEYS:
            new[key].append(st[key])
    return model.head(model.ln_out(x)), new


# ----------------------------------------------------------------------------------------------
# The fast form: one C call per token


def decode_library():
    """Build (once, cached on disk) and load ``csrc/rwkv_decode.c``; None when it cannot be built.

    Compiled with OpenMP when the compiler supports it (``-fopenmp``), else single-threaded.
    """
    global _LIB
    if _LIB is not None:
        return _LIB or None
    _LIB = False
    loaded = load_native_kernel("rwkv_decode.c")  # None: no compiler or no build (eager decoding)
    if loaded is not None:
        lib = loaded[0]
        lib.rwkv_step.restype = ctypes.c_int
        lib.rwkv_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 9
        _LIB = lib
    return _LIB or None


backends.register_probe("rwkv_decode", lambda: decode_library() is not None)

_LAYER_FIELDS = ["ln1_w", "ln1_b", "ln2_w", "ln2_b", "mix_r", "mix_k", "mix_v", "w_r", "w_k", "w_v", "w_o",
                 "u", "decay", "fmix_k", "fmix_r", "w_fk", "w_fr", "w_fv"]  # fmt: skip


_MATRICES = ["w_r", "w_k", "w_v", "w_o", "w_fk", "w_fr", "w_fv"]  # read in the model's weight format
_SCALES = ["s" + n[1:] for n in _MATRICES]  # their int8 per-row scales (NULL otherwise)


class _Layer(ctypes.Structure):
    _fields_ = [("eps1", ctypes.c_float), ("eps2", ctypes.c_float)]
    _fields_ += [(n, ctypes.c_void_p) for n in _LAYER_FIELDS + _SCALES]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("L", "C", "A", "F", "V", "n_emb")]
    _fields_ += [("eps0", ctypes.c_float), ("eps_out", ctypes.c_float)]
    _fields_ += [(n, ctypes.c_void_p) for n in ("emb", "ln0_w", "ln0_b", "lnout_w", "lnout_b", "head", "layers")]
    _fields_ += [("wtype", ctypes.c_int), ("s_head", ctypes.c_void_p)]


def weight_format(model) -> str | None:
    """The format the fused kernel reads the matrices in: ``model.decode_weights`` (None: fp32 in place)."""
    fmt = getattr(model, "decode_weights", None)
    return None if fmt in (None, "fp32") else wlinear.check_format(fmt, "decode_weights")


def set_decode_weights(model, fmt: str | None) -> None:
    """Decode ``model`` with its matrices (the 7 per layer and the head) in ``fmt``: ``"bf16"`` or
    ``"int8"`` (per-output-channel scales) weight-only copies made on the next token, kept current
    with the parameters (see ``rizzearch.ops.wlinear.packed_for``), or None / ``"fp32"`` (in place)."""
    if fmt is not None:
        wlinear.check_format(fmt, "decode_weights")
    model.decode_weights = fmt
    forget(model)


def _layer_weights(block) -> dict:
    att, ffn = block.att, block.ffn
    return {
        "ln1_w": block.ln1.weight, "ln1_b": block.ln1.bias, "ln2_w": block.ln2.weight, "ln2_b": block.ln2.bias,
        "mix_r": att.time_mix_r, "mix_k": att.time_mix_k, "mix_v": att.time_mix_v,
        "w_r": att.receptance.weight, "w_k": att.key.weight, "w_v": att.value.weight, "w_o": att.output.weight,
        "u": att.time_first, "decay": att.time_decay,
        "fmix_k": ffn.time_mix_k, "fmix_r": ffn.time_mix_r,
        "w_fk": ffn.key.weight, "w_fr": ffn.receptance.weight, "w_fv": ffn.value.weight,
    }  # fmt: skip


class FusedModel:
    """The addresses of an RWKV-4 model's parameters, in the kernel's structs (no copies).

    ``ok`` is False when the kernel cannot read the model as it is (a parameter that is not a
    contiguous float32 CPU tensor): decoding then takes the eager step until the table is rebuilt.
    """

    def __init__(self, model) -> None:
        self.params = list(model.parameters())  # what ``is_current`` watches
        self.ptrs = tuple(p.data_ptr() for p in self.params)
        self.registrations = _registrations
        self.fmt = weight_format(model)
        self.ok = all(p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() for p in self.params)
        self.watched: list = []  # parameters with a packed copy (stale after an optimizer step)
        self._keep: list = []  # the packed copies the kernel reads
        if not self.ok:
            return
        ptr = lambda t: t.data_ptr()  # noqa: E731 - parameters are read in place and kept alive by the model
        self.layers = (_Layer * len(model.blocks))()
        for i, block in enumerate(model.blocks):
            w = _layer_weights(block)
            mats = {n: self._matrix(w[n]) for n in _MATRICES}
            vals = [ptr(w[n]) if n not in mats else mats[n][0] for n in _LAYER_FIELDS] + [mats[n][1] for n in _MATRICES]
            self.layers[i] = _Layer(block.ln1.eps, block.ln2.eps, *vals)
        blk = model.blocks[0]
        self.C, self.A, self.F = blk.att.key.in_features, blk.att.key.out_features, blk.ffn.key.out_features
        self.L, self.V = len(model.blocks), model.head.out_features
        head, s_head = self._matrix(model.head.weight)
        self.struct = _Model(
            self.L, self.C, self.A, self.F, self.V, model.emb.num_embeddings, model.ln0.eps, model.ln_out.eps,
            ptr(model.emb.weight), ptr(model.ln0.weight), ptr(model.ln0.bias),
            ptr(model.ln_out.weight), ptr(model.ln_out.bias), head,
            ctypes.cast(self.layers, ctypes.c_void_p), wlinear.FORMATS.index(self.fmt or "fp32"), s_head,
        )  # fmt: skip
        self.steps = wlinear.optimizer_steps()
        self.ref = ctypes.byref(self.struct)
        self.scratch = torch.empty(0, dtype=torch.float32)
        self.layer_elements = self.C * (4 * self.A + 2 * self.F + self.C)  # matrix weights per layer

    def _matrix(self, w: Tensor) -> tuple[int, int | None]:
        """(address of the weight's data in ``self.fmt``, address of its int8 scales or None)."""
        if self.fmt is None:
            return w.data_ptr(), None
        p = wlinear.packed_for(w, self.fmt)  # a copy, cached on the parameter
        self.watched.append(w)
        self._keep.append(p)
        return p.data.data_ptr(), None if p.scale is None else p.scale.data_ptr()

    def bytes_per_token(self) -> int:
        """Weight bytes one token reads: every matrix and the head in their format, the small vectors, one embedding row."""
        per = {None: 4, "bf16": 2, "int8": 1}[self.fmt]
        mats = self.L * self.layer_elements + self.V * self.C
        scales = 4 * (self.L * (4 * self.A + 2 * self.C + self.F) + self.V) if self.fmt == "int8" else 0
        vectors = 4 * (self.L * (7 * self.C + 2 * self.A) + 5 * self.C)  # norms, mixes, u and decay, ln0/ln_out, emb row
        return per * mats + scales + vectors

    def is_current(self) -> bool:
        """False once a parameter got new storage or anything was (re)registered since the build."""
        return (
            self.registrations == _registrations
            and all(p.data_ptr() == q for p, q in zip(self.params, self.ptrs))
            and (not self.watched or self.steps == wlinear.optimizer_steps())
        )


def fused_model(model) -> FusedModel:
    """The model's address table, rebuilt when it is not current."""
    fm = _FUSED.get(model)
    if fm is None or fm.fmt != weight_format(model) or not fm.is_current():
        _FUSED[model] = fm = FusedModel(model)
    return fm


def forget(model) -> None:
    """Drop the model's address table and packed weight copies (``RWKV.clear_decode_cache``); the
    next token rebuilds them."""
    fm = _FUSED.pop(model, None)
    for w in getattr(fm, "watched", ()):
        wlinear.forget(w)


def cached(model) -> FusedModel | None:
    """The model's current address table, if one was built (tests)."""
    return _FUSED.get(model)


def decode_threads(fm: FusedModel) -> int:
    """Threads for one fused call: torch's thread count for layers big enough to gain while the cores
    are free (``rizzearch.ops.wlinear.cores_are_free``: not on an oversubscribed machine), else 1."""
    if _THREADS is not None:
        return _THREADS
    return wlinear.threads_for(fm.layer_elements, bool(_LIB and _LIB.openmp), THREADED_MIN_ELEMENTS)


@contextlib.contextmanager
def use_threads(threads: int | None):
    """Force the fused kernel's thread count inside a ``with`` block (tests, benchmarks)."""
    global _THREADS
    old, _THREADS = _THREADS, threads
    try:
        yield
    finally:
        _THREADS = old


def fused_step(lib, fm: FusedModel, tokens: Tensor, state: dict, threads: int | None = None):
    """One token per row through the whole model in one C call.

    tokens: (B,) int64; state: the RWKV state dict (lists of (B, C)/(B, A) tensors per layer,
    float32). Returns (logits (B, V) float32, new state); the new state's per-layer tensors are
    views of one (L, B, width) buffer per key. Raises IndexError for a token outside the
    embedding table (like ``nn.Embedding``).
    """
    B = tokens.shape[0]
    L, C, A = fm.L, fm.C, fm.A
    nt = threads if threads is not None else decode_threads(fm)
    need = B * (3 * C + 4 * A + fm.F) + nt * 4 * B * C
    if fm.scratch.numel() < need:  # working memory, reused across calls
        fm.scratch = torch.empty(need, dtype=torch.float32)
    f32 = torch.float32
    ins = []
    for key in STATE_KEYS:
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
    return logits, {key: list(t.unbind(0)) for key, t in zip(STATE_KEYS, outs)}


# ----------------------------------------------------------------------------------------------
# Dispatch


def decode(model, token: Tensor, state: dict, mask: Tensor | None, backend: str | None = None) -> tuple[Tensor, dict]:
    """One token per row without autograd: the fused kernel when backend ``fast`` applies, else the
    eager step. token: (B,); returns (logits (B, V), new state)."""
    if (
        mask is None
        and backends.resolve("rwkv_decode", backend) == "fast"
        and token.device.type == "cpu"
        and token.shape[0] <= MAX_FUSED_BATCH
        and state["att_x"][0].dtype == torch.float32
        and model.emb.weight.dtype == torch.float32
    ):
        lib = decode_library()
        if lib is not None:
            fm = fused_model(model)
            if fm.ok:
                return fused_step(lib, fm, token, state)
    return eager_step(model, token, state, mask)
