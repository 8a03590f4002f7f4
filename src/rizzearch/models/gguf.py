"""GGUF files (llama.cpp's format) -> a Llama config and HF-named float tensors, through the ``gguf`` package.

The reader is the format's own (``gguf.GGUFReader``, memory-mapped) and quantized blocks are
dequantized by ``gguf.quants.dequantize``. Two details of llama.cpp's converter are undone here:

- tensor names (``blk.i.attn_q.weight`` ...) map back to the HF names (``models/hf_llama.py``);
- for the ``llama`` architecture the converter permutes the rows of q and k within each head from
  HF's half-split RoPE layout (pairs j, j + Dh/2) to llama.cpp's interleaved one (pairs 2j, 2j+1):
  ``w.reshape(H, 2, Dh/2, C).swapaxes(1, 2)``; ``unpermute_qk`` applies the inverse. Qwen2 files
  keep the HF layout (llama.cpp runs them with NeoX-style RoPE).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rizzearch.errors import CheckpointError, ConfigError, ShapeError
from rizzearch.models.base import config_from_dict
from rizzearch.models.llama import LlamaConfig

ARCHITECTURES = ("llama", "qwen2")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name of a GGUF tensor name (None for tensors we do not use, e.g. ``rope_freqs``)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def gguf_name(hf: str) -> str:
    """The inverse of ``hf_name`` (used by the tests' GGUF writer)."""
    for g, h in _TOP_NAMES.items():
        if h == hf:
            return g
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}." + next(g for g, h in _LAYER_NAMES.items() if h == rest)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rows -> llama.cpp interleaved rows (what llama.cpp's converter does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp interleaved rows -> HF half-split rows (inverse of ``permute_qk``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """``gguf.GGUFReader`` parsing a plain ndarray view of its memory map: the same reader without
        ``numpy.memmap``'s per-slice overhead, which dominates on a vocabulary of ~100k strings (about 3x faster)."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


def open_gguf(path: Path):
    """A ``gguf.GGUFReader``; unreadable, truncated or unknown-type files raise CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        return _reader_class()(str(path))
    except Exception as e:  # the reader raises ValueError / KeyError / struct errors on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupted?): {type(e).__name__}: {e}") from e


def field_values(reader) -> dict:
    """The reader's key/value fields as plain Python values (arrays become lists)."""
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we read
            continue
    return out


def _f32(v) -> float:
    """The shortest decimal of a float32 field (1e-05 rather than 9.999999747378752e-06)."""
    return float(np.format_float_scientific(np.float32(v), unique=True))


def config_from_gguf(fields: dict, n_vocab: int, tied: bool, where: str) -> LlamaConfig:
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: general.architecture = {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def need(key):
        full = f"{arch}.{key}"
        if full not in fields:
            raise ConfigError(f"{where}: field {full!r} is missing")
        return fields[full]

    n_head, d = int(need("attention.head_count")), int(need("embedding_length"))
    values = dict(
        vocab_size=int(fields.get(f"{arch}.vocab_size", n_vocab)),
        d_model=d,
        n_layer=int(need("block_count")),
        n_head=n_head,
        n_kv_head=int(fields.get(f"{arch}.attention.head_count_kv", n_head)),
        d_ff=int(need("feed_forward_length")),
        rope_theta=_f32(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        max_seq_len=int(fields.get(f"{arch}.context_length", 8192)),
        norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
        qkv_bias=arch == "qwen2",
        tie_embeddings=tied,
    )
    head_dim = fields.get(f"{arch}.attention.key_length", fields.get(f"{arch}.rope.dimension_count"))
    if head_dim is not None and int(head_dim) != d // n_head:
        values["head_dim"] = int(head_dim)
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ConfigError(f"{where}: {arch}.rope.scaling.type = {scaling!r} is not supported (none, linear)")
        values.update(rope_scaling="linear", rope_factor=float(fields[f"{arch}.rope.scaling.factor"]))
    return config_from_dict(LlamaConfig, values, where=where)


def _dequantize(t, where: str) -> np.ndarray:
    import gguf

    kind = t.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise CheckpointError(f"{where}: tensor {t.name!r} has type {kind}, not supported; supported: {', '.join(TENSOR_TYPES)}")
    try:
        if kind == "F32":
            return np.asarray(t.data)
        if kind == "F16":
            return np.asarray(t.data, dtype=np.float32)
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise CheckpointError(f"{where}: tensor {t.name!r} ({kind}) cannot be read (truncated file?): {e}") from e


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(LlamaConfig, HF-named state dict in ``dtype``, field values) of a GGUF file."""
    path = Path(path)
    where = str(path)
    reader = open_gguf(path)
    fields = field_values(reader)
    names = {t.name for t in reader.tensors}
    n_vocab = len(fields.get("tokenizer.ggml.tokens") or []) or 0
    cfg = config_from_gguf(fields, n_vocab, tied="output.weight" not in names, where=where)
    sd = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                raise ConfigError(f"{where}: tensor 'rope_freqs.weight' (per-frequency RoPE factors) is not supported")
            continue
        w = _dequantize(t, where)
        want = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        if w.size != int(np.prod(want)):
            raise CheckpointError(f"{where}: tensor {t.name!r}: {w.size} values for shape {want} (truncated file?)")
        w = w.reshape(want)
        if fields["general.architecture"] == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.n_head)
        elif fields["general.architecture"] == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.n_kv_head)
        sd[name] = torch.from_numpy(np.require(w, requirements=["C", "W"])).to(dtype)  # writable: the map is read-only
    if cfg.vocab_size != sd.get("model.embed_tokens.weight", torch.empty(0, 0)).shape[0]:
        got = tuple(sd["model.embed_tokens.weight"].shape) if "model.embed_tokens.weight" in sd else None
        raise ShapeError(f"{where}: tensor 'token_embd.weight' has shape {got} but the vocabulary implies ({cfg.vocab_size}, {cfg.d_model})")
    return cfg, sd, fields
