"""Llama: the decoder-only architecture of Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral and Qwen2.

Touvron et al. 2023 (Llama 2, sec. 2.2): a pre-norm transformer with RMSNorm (Zhang & Sennrich
2019, eq. 4), rotary position embeddings (Su et al. 2021, RoFormer, eq. 34), grouped-query
attention (Ainslie et al. 2023: ``n_head`` query heads share ``n_kv_head`` key/value heads) and a
SwiGLU MLP (Shazeer 2020, eq. 6: ``down(silu(gate x) * up x)``). The variants are config fields:
Qwen2 adds q/k/v biases (``qkv_bias``), SmolLM and Llama-3.2 tie the embeddings, Llama 3.1 rescales
the rotary frequencies (``rope_scaling="llama3"``).

Deviations from the HF layout (the weights convert losslessly, ``models/hf_llama.py``):

- q, k and v are one fused linear ``attn.qkv`` (rows: q, then k, then v) and gate and up one fused
  ``mlp.gate_up`` (rows: gate, then up), so a decoding step runs two big matmuls instead of five.
- The residual stream is kept in fp32 when the weights are bf16/fp16 (each block's input is normed in
  fp32 and cast to the weights' dtype for its matmuls), which keeps bf16 logits close to fp32.
- RoPE rotates the two halves of each head (HF's ``rotate_half``: pairs (j, j + Dh/2)), not
  consecutive pairs as ``models/gpt.py`` does; GGUF files store q/k rows permuted to consecutive
  pairs, and ``models/gguf.py`` undoes that.

The state is a KV cache in preallocated buffers that grow by doubling:

    state = {"k": [L x (B, Hkv, C, Dh)], "v": [L x (B, Hkv, C, Dh)],   C = capacity >= n
             "valid": (B, C) bool   which cached positions hold real tokens,
             "pos":   (B,)  long    how many real tokens each row has seen,
             "n":     int           how many positions are cached,
             "tip":   [int]         how far these shared buffers have been written (copy on write)}

Without autograd a call writes its keys/values into the buffers in place (positions n .. n+T-1),
unless another state already wrote past ``n`` into the same buffers (``tip[0] != n``), in which
case it copies them first, so every state stays valid however often it is reused. Under autograd
the cache is built by concatenation (no in-place writes into tensors the backward pass needs).
Padded positions (``attention_mask == 0``) are cached but never attended to and do not advance
``pos``, so a left-padded row decodes exactly like the same row without padding.

Decoding (one token per row, up to 16 rows, no autograd, CPU) runs every matrix product through the
weight-only linear of ``rizzearch.ops.wlinear`` (a C kernel that streams each weight once for all
rows, fp32 activations and accumulation): the parameters in place (fp32, or bf16 read as bf16), or
bf16 / int8 copies chosen with ``set_decode_weights``. The norms feeding those products stay fp32,
so a bf16 model decodes with only its weights rounded. Prefill and training use the modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rizzearch.errors import ShapeError
from rizzearch.models import llama_decode
from rizzearch.models.base import CausalLM, register_model
from rizzearch.ops import backends, wlinear
from rizzearch.ops.attention import attention_mask as allowed_mask

ROPE_SCALINGS = (None, "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    """Llama-family configuration (defaults: SmolLM2-135M).

    Args:
        vocab_size: number of token ids.
        d_model: residual stream width (HF ``hidden_size``).
        n_layer: number of transformer blocks (HF ``num_hidden_layers``).
        n_head: query heads per block (HF ``num_attention_heads``).
        n_kv_head: key/value heads per block, dividing n_head (HF ``num_key_value_heads``; = n_head without GQA).
        d_ff: hidden width of the SwiGLU MLP (HF ``intermediate_size``).
        head_dim: width of one head (None: d_model / n_head).
        rope_theta: RoPE frequency base.
        rope_scaling: None, "linear" (positions divided by rope_factor) or "llama3" (Llama 3.1 frequency rescaling).
        rope_factor: the scaling factor of rope_scaling.
        rope_low_freq_factor: llama3 scaling: wavelengths above original_max / this are divided by rope_factor.
        rope_high_freq_factor: llama3 scaling: wavelengths below original_max / this are kept.
        rope_original_max_len: llama3 scaling: the context length the model was pretrained with.
        max_seq_len: context length the checkpoint was trained for (HF ``max_position_embeddings``; informational).
        norm_eps: RMSNorm epsilon.
        qkv_bias: biases on the q, k and v projections (Qwen2).
        tie_embeddings: share the input embedding and the LM head weights.
    """

    vocab_size: int = 49152
    d_model: int = 576
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    d_ff: int = 1536
    head_dim: int | None = None
    rope_theta: float = 100000.0
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) when head_dim is None")
        if self.dh % 2:
            raise ValueError(f"head dim {self.dh} must be even for RoPE")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {list(ROPE_SCALINGS)}, got {self.rope_scaling!r}")
        if self.rope_scaling is not None and self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}")

    @property
    def dh(self) -> int:
        """Width of one attention head."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(cfg: LlamaConfig, device=None) -> Tensor:
    """theta_j = rope_theta^(-2j/Dh) (RoFormer eq. 15), rescaled as ``cfg.rope_scaling`` says -> (Dh/2,) fp32.

    llama3 (Llama 3.1): wavelengths longer than ``original / low_freq_factor`` are stretched by
    ``factor``, shorter than ``original / high_freq_factor`` kept, and the band between interpolates
    linearly in ``original / wavelength``.
    """
    d = cfg.dh
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        orig, lo, hi = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        stretched = torch.where(wavelen > orig / lo, inv / cfg.rope_factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * stretched / cfg.rope_factor + smooth * stretched
        medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
        return torch.where(medium, blended, stretched)
    return inv


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of positions x theta for both halves of a head: positions (B, T) -> 2 x (B, 1, T, Dh)."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x[j], x[j + Dh/2]) of x (B, H, T, Dh) by the angles in cos/sin (B, 1, T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.dh = cfg.n_head, cfg.n_kv_head, cfg.dh
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.dh, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.dh, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache, n: int, key_valid, lin=None):
        """x (B, T, C); cache = (k_buf, v_buf, inplace) with n cached positions; key_valid (B, n+T) or None;
        lin: the decode path's weight-only linear (fp32 outputs, cast to the cache's dtype), None = the modules."""
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv, self.dh
        k_buf, v_buf, inplace = cache
        q, k, v = (self.qkv(x) if lin is None else lin(self.qkv, x).to(k_buf.dtype)).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q = apply_rope(q.view(B, T, H, Dh).transpose(1, 2), cos, sin)  # (B, H, T, Dh)
        k = apply_rope(k.view(B, T, Hkv, Dh).transpose(1, 2), cos, sin)  # (B, Hkv, T, Dh)
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        if inplace:
            k_buf[:, :, n : n + T] = k
            v_buf[:, :, n : n + T] = v
        else:
            k_buf = torch.cat([k_buf[:, :, :n], k], dim=2)
            v_buf = torch.cat([v_buf[:, :, :n], v], dim=2)
        k_all, v_all = k_buf[:, :, : n + T], v_buf[:, :, : n + T]  # (B, Hkv, S, Dh)
        if key_valid is None and T == 1:
            # one query per row sees every cached key: group the query heads by their kv head
            y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, Dh), k_all, v_all)  # (B, Hkv, G, Dh)
        elif key_valid is None and n == 0:
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=True)  # (B, H, T, Dh)
        else:
            mask = allowed_mask(T, n + T, n, key_valid, x.device)  # (B or 1, 1, T, S)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        y = y.reshape(B, H, T, Dh).transpose(1, 2).reshape(B, T, H * Dh)
        return (self.proj(y) if lin is None else lin(self.proj, y)), k_buf, v_buf


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x, lin=None):
        if lin is not None:  # the decode path: fp32 activations, weight-only linear
            gate, up = lin(self.gate_up, x).chunk(2, dim=-1)
            return lin(self.down, F.silu(gate) * up)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rms_norm(norm: nn.RMSNorm, x: Tensor, dtype) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4) of the fp32 residual stream, returned in the weights' ``dtype``."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps).to(dtype)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache, n, key_valid, lin=None):
        """x: the residual stream (B, T, C) in fp32; the matmuls run in the weights' dtype, or through
        ``lin`` (the decode path: weight-only products with fp32 activations)."""
        dtype = self.attn.qkv.weight.dtype if lin is None else torch.float32
        a, k, v = self.attn(rms_norm(self.attn_norm, x, dtype), cos, sin, cache, n, key_valid, lin)
        x = x + a
        return x + self.mlp(rms_norm(self.mlp_norm, x, dtype), lin), k, v


# ----------------------------------------------------------------------------------------------
# The model


def _forget_decode_copies(module, _incompatible_keys) -> None:
    """``load_state_dict`` copies in place: drop the weight-only copies made from the old values."""
    module.clear_decode_cache()


@register_model("llama", LlamaConfig, tiny=dict(vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=160))
class Llama(CausalLM):
    """Llama-family decoder; its state is a KV cache (see the module docstring)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._inv_freq: dict = {}
        self.decode_weights: str | None = None  # see set_decode_weights
        self.register_load_state_dict_post_hook(_forget_decode_copies)  # a module-level function: models pickle
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) for matrices, residual projections scaled by 1/sqrt(2 L); norms 1, biases 0."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1.0 / math.sqrt(2 * self.config.n_layer) if name.endswith(("proj.weight", "down.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def set_decode_weights(self, fmt: str | None) -> None:
        """Decode (one token per row, no autograd, CPU) with weight-only ``"bf16"`` or ``"int8"``
        (per-output-channel scales) copies of every matrix, or None / ``"fp32"``: the parameters in
        place (bf16 parameters are read as bf16). Activations stay fp32 (``rizzearch.ops.wlinear``)."""
        self.decode_weights = None if fmt is None else wlinear.check_format(fmt, "decode_weights")
        self.clear_decode_cache()

    def clear_decode_cache(self) -> None:
        """Drop the packed weight copies of the decode path (rebuilt on the next token). Needed only
        after an in-place edit of a weight other than an optimizer step or ``load_state_dict``."""
        for p in self.parameters():
            wlinear.forget(p)
        llama_decode.forget(self)

    def _decode_linear(self, tokens: Tensor):
        """The decode path's linear (one token per row, no autograd, CPU, the ``wlinear`` fast form
        available), else None: every product then runs through the modules, as in training."""
        B, T = tokens.shape
        if T != 1 or B > wlinear.MAX_ROWS or torch.is_grad_enabled() or tokens.device.type != "cpu":
            return None
        if backends.resolve("wlinear") != "fast" or not backends.available("wlinear"):
            return None
        fmt = self.decode_weights

        def lin(mod: nn.Module, x: Tensor) -> Tensor:
            if type(mod) is nn.Linear:
                return wlinear.linear(x, wlinear.packed_for(mod.weight, fmt), mod.bias)
            # anything else (a LoRA-wrapped layer) runs as a module: its own forward is the product
            dtype = next(mod.parameters()).dtype
            return mod(x.to(dtype)).float()

        return lin

    def inv_freq(self, device) -> Tensor:
        """RoPE frequencies (Dh/2,), fp32 on ``device`` whatever the weights' dtype (kept out of the state_dict)."""
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.config, device)
        return self._inv_freq[key]

    def init_state(self, batch_size: int, device=None, dtype=None):
        cfg = self.config
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        empty = lambda: torch.zeros(batch_size, cfg.n_kv_head, 0, cfg.dh, device=device, dtype=dtype)  # noqa: E731
        return {
            "k": [empty() for _ in range(cfg.n_layer)],
            "v": [empty() for _ in range(cfg.n_layer)],
            "valid": torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            "pos": torch.zeros(batch_size, dtype=torch.long, device=device),
            "n": 0,
            "tip": [0],
        }

    def _check_state(self, state, B: int) -> None:
        cfg = self.config
        if not isinstance(state, dict) or set(state) != {"k", "v", "valid", "pos", "n", "tip"}:
            raise ShapeError("state: expected a Llama KV-cache dict with keys k, v, valid, pos, n, tip (from Llama.init_state)")
        if len(state["k"]) != cfg.n_layer:
            raise ShapeError(f"state['k']: expected {cfg.n_layer} layers, got {len(state['k'])} (state from another config?)")
        k0 = state["k"][0]
        want = (B, cfg.n_kv_head, k0.shape[2], cfg.dh)
        if tuple(k0.shape) != want:
            raise ShapeError(f"state['k'][0]: expected shape {want}, got {tuple(k0.shape)} (state from another config or batch?)")

    def _cache_buffers(self, state, B: int, T: int, dtype, device, inplace: bool):
        """The k/v/valid buffers this call writes into, and the shared ``tip`` list of the result."""
        cfg = self.config
        if state is None:
            state = self.init_state(B, device, dtype)
        n, ks, vs, valid = state["n"], state["k"], state["v"], state["valid"]
        if not inplace:
            return ks, vs, valid, [n + T]
        cap = valid.shape[1]
        if state["tip"][0] == n and n + T <= cap:
            return ks, vs, valid, state["tip"]
        # grow (doubling) or copy on write: another state already wrote past n into these buffers
        new_cap = max(n + T, 2 * cap) if n + T > cap else cap
        shape = (B, cfg.n_kv_head, new_cap, cfg.dh)

        def fresh(old):
            buf = old.new_empty(shape)
            buf[:, :, :n] = old[:, :, :n]
            return buf

        new_valid = valid.new_zeros(B, new_cap)
        new_valid[:, :n] = valid[:, :n]
        return [fresh(k) for k in ks], [fresh(v) for v in vs], new_valid, [n]

    def forward(self, tokens: Tensor, state=None, attention_mask: Tensor | None = None):
        """tokens (B, T) -> logits (B, T, V) and the updated KV cache."""
        self._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        if state is not None:
            self._check_state(state, B)
        mask = self._padding_mask(attention_mask)  # (B, T) bool or None
        n = state["n"] if state is not None else 0
        pos0 = state["pos"] if state is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)
        if mask is None:
            positions = pos0[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        else:
            positions = (pos0[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)
        dtype = self.embed.weight.dtype
        x = self.embed(tokens).float()  # (B, T, C): the residual stream stays fp32 whatever the weights' dtype
        inplace = not torch.is_grad_enabled()
        ks, vs, valid, tip = self._cache_buffers(state, B, T, dtype, tokens.device, inplace)
        step_valid = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        if inplace:
            valid[:, n : n + T] = step_valid
        else:
            valid = torch.cat([valid[:, :n], step_valid], dim=1)
        # Right padding from a fresh start needs no mask: causal attention already keeps every real query
        # off the padding after it (the padding's own outputs are never read), so SDPA runs its causal
        # kernel instead of reading a (B, 1, T, T) mask; ``valid`` still keeps the padding out of later steps.
        right_padded = n == 0 and mask is not None and T > 1 and bool((mask[:, 1:] <= mask[:, :-1]).all())
        all_valid = (mask is None or right_padded) and (state is None or bool(state["valid"][:, :n].all()))
        key_valid = None if all_valid else valid[:, : n + T]
        fused = llama_decode.fused_table(self, tokens, mask, dtype) if inplace else None
        if fused is not None:  # one C call for the whole token
            cs, sn = (t.view(B, -1) for t in rope_cos_sin(positions, self.inv_freq(tokens.device), torch.float32))
            logits = llama_decode.fused_step(fused, self, tokens, cs, sn, ks, vs, None if key_valid is None else valid, n)
            tip[0] = n + T
            return logits.to(dtype), {"k": list(ks), "v": list(vs), "valid": valid, "pos": pos0 + T, "n": n + T, "tip": tip}
        cos, sin = rope_cos_sin(positions, self.inv_freq(tokens.device), dtype)  # (B, 1, T, Dh)
        new_k, new_v = [], []
        lin = self._decode_linear(tokens)
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, (ks[i], vs[i], inplace), n, key_valid, lin)
            new_k.append(k)
            new_v.append(v)
        tip[0] = n + T
        x = self._head_rows(x)  # (B, T or 1, C): the last position only in prefill
        if lin is None:
            logits = self.lm_head(rms_norm(self.norm, x, dtype))  # (B, T, V)
        else:
            logits = lin(self.lm_head, rms_norm(self.norm, x, torch.float32)).to(dtype)
        count = T if mask is None else mask.long().sum(1)
        new_state = {"k": new_k, "v": new_v, "valid": valid, "pos": pos0 + count, "n": n + T, "tip": tip}
        return logits, new_state

    def flops_per_token(self, seq_len: int) -> float:
        """6 N (matmul parameters incl. the LM head) + 6 L T (H Dh) for causal attention scores and values."""
        cfg = self.config
        return super().flops_per_token(seq_len) + 6.0 * cfg.n_layer * seq_len * cfg.n_head * cfg.dh
