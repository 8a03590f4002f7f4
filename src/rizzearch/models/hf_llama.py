"""The HF transformers layout of Llama-family checkpoints (config.json keys and tensor names), without transformers.

``config_from_hf`` / ``config_to_hf`` translate config.json dicts (Llama, Mistral, Qwen2 and the
SmolLM/TinyLlama checkpoints that use the Llama architecture); ``state_dict_from_hf`` /
``state_dict_to_hf`` rename and fuse/split tensors:

    model.embed_tokens.weight                                embed.weight
    model.layers.i.input_layernorm.weight                    blocks.i.attn_norm.weight
    model.layers.i.self_attn.{q,k,v}_proj.{weight,bias}      blocks.i.attn.qkv.{weight,bias}  (rows q | k | v)
    model.layers.i.self_attn.o_proj.weight                   blocks.i.attn.proj.weight
    model.layers.i.post_attention_layernorm.weight           blocks.i.mlp_norm.weight
    model.layers.i.mlp.{gate,up}_proj.weight                 blocks.i.mlp.gate_up.weight      (rows gate | up)
    model.layers.i.mlp.down_proj.weight                      blocks.i.mlp.down.weight
    model.norm.weight                                        norm.weight
    lm_head.weight (absent when tied)                        lm_head.weight
"""

from __future__ import annotations

import torch
from torch import Tensor

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.models.base import config_from_dict
from rizzearch.models.llama import LlamaConfig

# model_type -> the architectures entry transformers writes for it
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(SUPPORTED.values())


def _model_type(d: dict, where: str) -> str:
    mt = d.get("model_type")
    arch = (d.get("architectures") or [None])[0]
    if mt in SUPPORTED:
        return mt
    for k, v in SUPPORTED.items():
        if arch == v:
            return k
    raise ConfigError(
        f"{where}: architecture {arch or mt!r} (model_type {mt!r}) is not supported; "
        f"supported: {', '.join(supported_architectures())}"
    )


def _rope_fields(d: dict, where: str) -> dict:
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind in (None, "default"):
        return out
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"{where}: rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    out.update(rope_scaling=kind, rope_factor=float(params.get("factor", 1.0)))
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            rope_original_max_len=int(params.get("original_max_position_embeddings", 8192)),
        )
    return out


def config_from_hf(d: dict, where: str = "config.json") -> LlamaConfig:
    """A LlamaConfig from an HF config.json dict; unsupported features raise ConfigError naming the field."""
    mt = _model_type(d, where)
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu, SwiGLU)")
    if mt == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
        raise ConfigError(f"{where}: attention_bias/mlp_bias on a Llama config are not supported (o_proj/MLP biases)")
    if mt == "qwen2" and d.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window = true is not supported (full attention only)")
    try:
        n_head = int(d["num_attention_heads"])
        values = dict(
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["hidden_size"]),
            n_layer=int(d["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=int(d.get("num_key_value_heads") or n_head),
            d_ff=int(d["intermediate_size"]),
            max_seq_len=int(d.get("max_position_embeddings", 8192)),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            qkv_bias=mt == "qwen2",
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing field {e.args[0]!r}") from None
    hd = d.get("head_dim")
    if hd is not None and int(hd) != values["d_model"] // n_head:
        values["head_dim"] = int(hd)
    values.update(_rope_fields(d, where))
    return config_from_dict(LlamaConfig, values, where=where)


def config_to_hf(cfg: LlamaConfig, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """The config.json dict transformers loads as LlamaForCausalLM (Qwen2ForCausalLM when qkv_bias)."""
    mt = "qwen2" if cfg.qkv_bias else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    d = {
        "architectures": [SUPPORTED[mt]],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.dh,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
    if mt == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
        del d["attention_bias"], d["mlp_bias"]
    return d


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of an HF checkpoint with this config (lm_head only when untied)."""
    C, Dh, F = cfg.d_model, cfg.dh, cfg.d_ff
    out = {"model.embed_tokens.weight": (cfg.vocab_size, C), "model.norm.weight": (C,)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (C,),
            p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (cfg.n_head * Dh, C),
            p + "self_attn.k_proj.weight": (cfg.n_kv_head * Dh, C),
            p + "self_attn.v_proj.weight": (cfg.n_kv_head * Dh, C),
            p + "self_attn.o_proj.weight": (C, cfg.n_head * Dh),
            p + "mlp.gate_proj.weight": (F, C),
            p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F),
        })
        if cfg.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (cfg.n_head * Dh,), p + "self_attn.k_proj.bias": (cfg.n_kv_head * Dh,),
                        p + "self_attn.v_proj.bias": (cfg.n_kv_head * Dh,)})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, C)
    return out


def check_hf_tensors(sd: dict, cfg: LlamaConfig, where: str) -> None:
    """ShapeError naming the tensor and both shapes, or CheckpointError naming missing tensors."""
    from rizzearch.errors import CheckpointError

    want = hf_shapes(cfg)
    for name, shape in want.items():
        if name not in sd:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in sd:
                continue  # some untied exports still share the table; loaded as a copy below
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        got = tuple(sd[name].shape)
        if got != shape:
            raise ShapeError(f"{where}: tensor {name!r} has shape {got} but the config implies {shape}")


def state_dict_from_hf(sd: dict[str, Tensor], cfg: LlamaConfig, where: str = "checkpoint") -> dict[str, Tensor]:
    """HF tensor names -> our state_dict (fusing q/k/v and gate/up). Shapes are checked first."""
    check_hf_tensors(sd, cfg, where)
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    out["lm_head.weight"] = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        out[q + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "attn.qkv.weight"] = torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
        if cfg.qkv_bias:
            out[q + "attn.qkv.bias"] = torch.cat([sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]])
        out[q + "attn.proj.weight"] = sd[a + "o_proj.weight"]
        out[q + "mlp.gate_up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        out[q + "mlp.down.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


def state_dict_to_hf(sd: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """Our state_dict -> HF tensor names (contiguous, ready for safetensors; no lm_head when tied)."""
    Dq, Dk = cfg.n_head * cfg.dh, cfg.n_kv_head * cfg.dh
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = sd[q + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "mlp_norm.weight"]
        for name, t in zip("qkv", sd[q + "attn.qkv.weight"].split([Dq, Dk, Dk])):
            out[a + f"{name}_proj.weight"] = t
        if cfg.qkv_bias:
            for name, t in zip("qkv", sd[q + "attn.qkv.bias"].split([Dq, Dk, Dk])):
                out[a + f"{name}_proj.bias"] = t
        out[a + "o_proj.weight"] = sd[q + "attn.proj.weight"]
        gate, up = sd[q + "mlp.gate_up.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.down.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}
