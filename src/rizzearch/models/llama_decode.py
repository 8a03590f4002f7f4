"""Decoding the Llama family one token at a time in one C call (``csrc/llama_decode.c``).

``Llama.forward`` with one token per row, no autograd, on CPU, calls ``fused_step`` when it
applies; otherwise the step runs through the modules with every product through the weight-only
linear (``rizzearch.ops.wlinear``), and with backend ``reference`` through the modules as in
training. Both fast forms compute the same numbers as the modules up to summation order
(``tests/models/test_llama_decode.py``).

Why one call: batch-1 decoding of a small model is bound by reading each weight once per token
plus a per-op overhead. Through the modules a SmolLM2 token costs about 40 torch ops per block
(norms, rotary embedding, cache writes, attention, SwiGLU) around its 4 products: ~10 ms of a
~30 ms token on 2 cores, which no weight format can remove. The kernel does a token's 30 blocks,
final norm and head in one OpenMP region: each product splits its outputs across the threads
(every thread streams its own rows of every weight, ``wl_dots.h``), rotary embedding and the
cache writes split over (row, kv head), attention over (row, query head); 5 barriers per block.

What it reads: the parameters in place (fp32 or bf16), or the model's ``decode_weights`` copies
(bf16 / int8, ``wlinear.packed_for``); the norms as fp32 (copies for a bf16 model). Activations and
softmax are fp32; the KV cache stays in the model's dtype (bf16 values rounded to nearest even,
as torch rounds). It applies when every projection is a plain ``nn.Linear`` in one format (no
LoRA wrapper), the cache is fp32 or bf16, and the step has no padding mask (a padded prefill is
fine: its ``valid`` keys are honoured). The address table of a model is rebuilt when any
parameter gets new storage, the parameter list changes (``apply_lora``), after an optimizer step
with packed copies, and on ``Llama.clear_decode_cache``.

Op ``"llama_decode"`` of ``rizzearch.ops.backends`` (``docs/backends.md``).
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import Tensor, nn

from rizzearch.ops import backends, wlinear
from rizzearch.ops._common import load_native_kernel

MAX_FUSED_BATCH = wlinear.MAX_ROWS
_LIB = None  # ctypes library; False once building failed or there is no compiler
THREADS: int | None = None  # forced thread count of the kernel (tests, benchmarks); None = the rule in fused_step
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Table


class _LLayer(ctypes.Structure):
    _fields_ = [("eps1", ctypes.c_float), ("eps2", ctypes.c_float)]
    _fields_ += [(n, ctypes.c_void_p) for n in ("n1", "n2", "w_qkv", "w_o", "w_gu", "w_d", "s_qkv", "s_o", "s_gu", "s_d", "b_qkv")]


class _LModel(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("L", "C", "H", "Hkv", "Dh", "F", "V")]
    _fields_ += [("eps_out", ctypes.c_float)]
    _fields_ += [(n, ctypes.c_void_p) for n in ("n_out", "head", "s_head", "layers")]
    _fields_ += [("wtype", ctypes.c_int), ("cache_bf16", ctypes.c_int)]


def decode_library():
    """Build (once, cached on disk) and load ``csrc/llama_decode.c``; None when it cannot be built."""
    global _LIB
    if _LIB is not None:
        return _LIB or None
    _LIB = False
    loaded = load_native_kernel("llama_decode.c")
    if loaded is not None:
        lib = loaded[0]
        lib.llama_step.restype = ctypes.c_int
        lib.llama_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4
        lib.llama_step.argtypes += [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3
        _LIB = lib
    return _LIB or None


backends.register_probe("llama_decode", lambda: decode_library() is not None)


def _matrices(model) -> list[nn.Module]:
    return [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.gate_up, b.mlp.down)] + [model.lm_head]


class _Table:
    """The addresses of a model's weights in the kernel's structs, and what keeps them alive.
    ``ok`` is False when the kernel cannot read the model (a wrapped projection, mixed formats)."""

    def __init__(self, model) -> None:
        self.key = _key(model, model.parameters())
        mats = _matrices(model)
        self.ok = all(type(m) is nn.Linear for m in mats)
        if not self.ok:
            return
        fmt = model.decode_weights if model.decode_weights not in (None, "fp32") else None
        packed = {id(m): wlinear.packed_for(m.weight, fmt) for m in mats}  # in place, or cached copies
        formats = {p.fmt for p in packed.values()}
        self.ok = len(formats) == 1
        if not self.ok:
            return
        cfg = model.config
        self.keep: list = list(packed.values())  # every tensor whose address the structs hold
        self.layers = (_LLayer * cfg.n_layer)()
        for i, b in enumerate(model.blocks):
            (wq, sq), (wo, so), (wg, sg), (wd, sd) = (_addresses(packed[id(m)]) for m in (b.attn.qkv, b.attn.proj, b.mlp.gate_up, b.mlp.down))
            bias = self._vector(b.attn.qkv.bias) if b.attn.qkv.bias is not None else None
            n1, n2 = self._vector(b.attn_norm.weight), self._vector(b.mlp_norm.weight)
            self.layers[i] = _LLayer(b.attn_norm.eps, b.mlp_norm.eps, n1, n2, wq, wo, wg, wd, sq, so, sg, sd, bias)
        head, s_head = _addresses(packed[id(model.lm_head)])
        self.struct = _LModel(
            cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.dh, cfg.d_ff, cfg.vocab_size, model.norm.eps,
            self._vector(model.norm.weight), head, s_head, ctypes.cast(self.layers, ctypes.c_void_p),
            wlinear.FORMATS.index(formats.pop()), 0,
        )  # fmt: skip
        self.scratch = torch.empty(0)

    def _vector(self, t: Tensor) -> int:
        """The address of ``t`` as fp32 (a copy for a bf16 model, kept alive here)."""
        t = t.detach()
        t = t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
        self.keep.append(t)
        return t.data_ptr()


def _addresses(p: wlinear.Packed) -> tuple[int, int | None]:
    return p.data.data_ptr(), None if p.scale is None else p.scale.data_ptr()


def _key(model, params) -> tuple:
    """What the table depends on: the parameters' storage, the weight format and the optimizer steps
    (packed copies and a bf16 model's fp32 norm copies are refreshed after each)."""
    return (model.decode_weights, wlinear.optimizer_steps(), tuple(p.data_ptr() for p in params))


def table(model) -> _Table:
    t = _TABLES.get(model)
    if t is None or t.key != _key(model, model.parameters()):
        _TABLES[model] = t = _Table(model)
    return t


def forget(model) -> None:
    """Drop the model's address table (``Llama.clear_decode_cache``); the next token rebuilds it."""
    _TABLES.pop(model, None)


def fused_table(model, tokens: Tensor, mask: Tensor | None, cache_dtype: torch.dtype) -> _Table | None:
    """The model's address table when ``fused_step`` can take this step (see the module docstring), else None."""
    B, T = tokens.shape
    if not (
        T == 1
        and mask is None
        and 0 < B <= MAX_FUSED_BATCH
        and tokens.device.type == "cpu"
        and not torch.is_grad_enabled()
        and cache_dtype in (torch.float32, torch.bfloat16)
        and backends.resolve("llama_decode") == "fast"
        and decode_library() is not None
    ):
        return None
    t = table(model)
    return t if t.ok else None


def fused_step(t: _Table, model, tokens: Tensor, cos: Tensor, sin: Tensor, ks: list, vs: list, valid: Tensor | None, n: int) -> Tensor:
    """One token per row (tokens (B, 1)) through the whole model, with its table ``t`` (``fused_table``):
    writes position ``n`` of the caches ``ks``/``vs`` (each (B, Hkv, cap, Dh), contiguous) and returns
    the logits (B, 1, V) fp32. cos, sin: (B, Dh) fp32 of each row's position; valid: (B, cap) bool
    (position n set) or None."""
    lib = decode_library()
    cfg, B = model.config, tokens.shape[0]
    cap = ks[0].shape[2]
    t.struct.cache_bf16 = int(ks[0].dtype == torch.bfloat16)
    Q = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.dh
    nt = THREADS or wlinear.threads_for(cfg.d_model * Q, lib.openmp)  # small layers: a barrier costs more than it saves
    need = B * (Q + cfg.n_head * cfg.dh + cfg.d_model + 3 * cfg.d_ff) + nt * (B * cfg.d_model + n + 1)
    if t.scratch.numel() < need:
        t.scratch = torch.empty(max(need, 2 * t.scratch.numel()), dtype=torch.float32)
    x = model.embed(tokens[:, 0]).float().contiguous()  # (B, C), overwritten with the residual stream
    kv = (ctypes.c_void_p * (2 * cfg.n_layer))(*[b.data_ptr() for b in (*ks, *vs)])
    logits = torch.empty(B, cfg.vocab_size, dtype=torch.float32)
    bad = lib.llama_step(
        ctypes.byref(t.struct), B, nt, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), kv, cap, n,
        None if valid is None else valid.data_ptr(), logits.data_ptr(), t.scratch.data_ptr(),
    )  # fmt: skip
    if bad:
        raise ValueError(f"llama_decode: the kernel refused the config (n_head {cfg.n_head}, n_kv_head {cfg.n_kv_head}, head_dim {cfg.dh})")
    return logits[:, None]
