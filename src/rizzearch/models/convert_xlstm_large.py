"""Weight import for the xLSTM-7B architecture (``rizzearch.models.xlstm_large``).

- ``from_official_xlstm_large(model)``: the official ``xlstm.xlstm_large.model.xLSTMLarge`` (either
  weight mode, ``"single"`` or ``"fused"``).
- ``from_hf_xlstm(model)``: transformers' ``xLSTMForCausalLM``.
- ``load_hf_xlstm_folder(folder)``: an HF folder on disk (``config.json`` with ``model_type
  "xlstm"`` + ``model.safetensors`` or sharded safetensors with an index), without transformers.
- ``load_official_xlstm_large_folder(folder)``: an official checkpoint folder (``config.yaml`` with
  the ``xLSTMLargeConfig`` fields + ``model.safetensors`` or ``model_0.safetensors``,
  ``model_1.safetensors``, ...), as ``xlstm.xlstm_large.from_pretrained`` reads it; a
  ``config.json`` holding the same fields (no ``model_type``) is read the same way.

The reference models are only read (their config attributes and ``state_dict()``), never wrapped.
Every reference parameter must be used and every one of ours filled, else ``CheckpointError``.
Backend choices of the reference config (kernel names, mode, autocast dtypes, the kernel
``eps``, inference chunking) do not change the function the model computes and are not kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.models.base import config_from_dict
from rizzearch.models.xlstm_large import XLSTMLarge, XLSTMLargeConfig

__all__ = [
    "from_official_xlstm_large",
    "from_hf_xlstm",
    "load_hf_xlstm_folder",
    "load_official_xlstm_large_folder",
    "is_official_xlstm_config",
    "xlstm_large_config_from_hf",
]

# HF config.json key -> our field (the architecture)
_HF_TO_OURS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_blocks",
    "num_heads": "n_heads",
    "qk_dim_factor": "qk_dim_factor",
    "v_dim_factor": "v_dim_factor",
    "ffn_proj_factor": "ffn_proj_factor",
    "ffn_round_up_to_multiple_of": "ffn_round_to",
    "gate_soft_cap": "gate_soft_cap",
    "output_logit_soft_cap": "logit_soft_cap",
    "norm_eps": "norm_eps",
    "use_bias": "use_bias",
    "add_out_norm": "add_out_norm",
    "chunk_size": "chunk_size",
    "tie_word_embeddings": "tie_embeddings",
}
# aliases that must agree with the key they duplicate
_HF_ALIASES = {"embedding_dim": "hidden_size", "num_blocks": "num_hidden_layers"}
# keys that choose kernels, dtypes, generation defaults or bookkeeping: the function is the same
_HF_IGNORED = {
    "chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "return_last_states", "autocast_kernel_dtype",
    "inference_state_dtype", "eps", "weight_mode", "max_inference_chunksize", "use_cache", "norm_reduction_force_float32",
    "pad_token_id", "bos_token_id", "eos_token_id", "architectures", "dtype", "torch_dtype", "transformers_version",
    "model_type", "_name_or_path", "output_hidden_states", "output_attentions", "return_dict", "is_encoder_decoder",
    "tokenizer_class", "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "torchscript",
    "auto_map", "initializer_range",
}


# ----------------------------------------------------------------------------------------------
# State dict mapping (shared by the official model, transformers and HF folders)


def _block_tensors(sd: dict, pre: str, used: set) -> dict:
    """One official/HF block's tensors (prefix ``pre``) in our fused layout."""

    def take(key: str):
        used.add(pre + key)
        return sd[pre + key]

    def opt(key: str):
        return take(key) if pre + key in sd else None

    out = {"norm_mlstm": take("norm_mlstm.weight"), "norm_ffn": take("norm_ffn.weight"),
           "head_norm": take("mlstm_layer.multihead_norm.weight"), "out_proj.weight": take("mlstm_layer.out_proj.weight"),
           "ffn_down.weight": take("ffn.proj_down.weight")}
    for ours, theirs in (("norm_mlstm_bias", "norm_mlstm.bias"), ("norm_ffn_bias", "norm_ffn.bias"),
                         ("head_norm_bias", "mlstm_layer.multihead_norm.bias"), ("out_proj.bias", "mlstm_layer.out_proj.bias"),
                         ("ffn_down.bias", "ffn.proj_down.bias")):
        t = opt(theirs)
        if t is not None:
            out[ours] = t
    L = "mlstm_layer."
    for part in ("weight", "bias"):
        if pre + L + "qkv_opreact." + part in sd:  # fused weight mode
            out[f"qkvo.{part}"] = take(L + "qkv_opreact." + part)
        elif pre + L + "q." + part in sd:
            out[f"qkvo.{part}"] = torch.cat([take(L + n + "." + part) for n in ("q", "k", "v", "ogate_preact")], 0)
        if pre + L + "ifgate_preact." + part in sd:
            out[f"if_gate.{part}"] = take(L + "ifgate_preact." + part)
        elif pre + L + "igate_preact." + part in sd:
            out[f"if_gate.{part}"] = torch.cat([take(L + "igate_preact." + part), take(L + "fgate_preact." + part)], 0)
        if pre + "ffn.proj_up_gate_z." + part in sd:
            out[f"ffn_up.{part}"] = take("ffn.proj_up_gate_z." + part)
        elif pre + "ffn.proj_up_gate." + part in sd:
            out[f"ffn_up.{part}"] = torch.cat([take("ffn.proj_up_gate." + part), take("ffn.proj_up." + part)], 0)
    return out


def state_dict_from_reference(sd: dict, n_blocks: int, *, embed_key: str, blocks_prefix: str, out_norm_prefix: str, where: str) -> dict:
    """Map an official / HF xLSTM-large state dict to ours; every source tensor must be used."""
    used: set = set()
    try:
        ours = {"embed.weight": sd[embed_key]}
        used.add(embed_key)
        if "lm_head.weight" in sd:  # absent: a head tied to the embedding
            ours["lm_head.weight"] = sd["lm_head.weight"]
            used.add("lm_head.weight")
        for suffix, name in (("weight", "out_norm"), ("bias", "out_norm_bias")):
            if f"{out_norm_prefix}.{suffix}" in sd:
                ours[name] = sd[f"{out_norm_prefix}.{suffix}"]
                used.add(f"{out_norm_prefix}.{suffix}")
        for i in range(n_blocks):
            for k, t in _block_tensors(sd, f"{blocks_prefix}.{i}.", used).items():
                ours[f"blocks.{i}.{k}"] = t
    except KeyError as e:
        raise CheckpointError(f"{where}: missing tensor {e.args[0]!r} for an xLSTM-large model with {n_blocks} blocks") from None
    unused = sorted(set(sd) - used)
    if unused:
        raise CheckpointError(f"{where}: tensors not used by the xLSTM-large architecture: {unused[:5]}{' ...' if len(unused) > 5 else ''}")
    return ours


def _build(config: XLSTMLargeConfig, sd: dict, where: str, dtype: torch.dtype = torch.float32) -> XLSTMLarge:
    """Our model holding ``sd`` in ``dtype``: built on the meta device and allocated once (no random
    initialisation of weights that are overwritten anyway; a 7B model loads without a second copy)."""
    if "lm_head.weight" not in sd:
        if not config.tie_embeddings:
            raise CheckpointError(f"{where}: no lm_head.weight and tie_word_embeddings is false")
    elif config.tie_embeddings:  # the weights decide: a separate head is used as stored (transformers does)
        if sd["lm_head.weight"] is not sd["embed.weight"] and not torch.equal(sd["lm_head.weight"], sd["embed.weight"]):
            config = dataclasses.replace(config, tie_embeddings=False)
        else:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = XLSTMLarge(config).to(dtype)
    own = model.state_dict()
    for name, t in sd.items():
        if name in own and tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{where}: {name}: expected shape {tuple(own[name].shape)} from the config, got {tuple(t.shape)}")
    missing = sorted(set(own) - set(sd) - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if missing:
        raise CheckpointError(f"{where}: no tensor for {missing[:5]} (a config option the weights do not have?)")
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty gives each module its own new tensor: tie again
        model.lm_head.weight = model.embed.weight
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head is the embedding parameter: filled once
            p.copy_(sd[name])
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Configs


def _check_backend(cfg, where: str) -> None:
    """Reject reference options that change the function (not only the kernels)."""
    kernel = str(getattr(cfg, "chunkwise_kernel", ""))
    if "siging" in kernel:
        raise ConfigError(f"{where}: chunkwise_kernel {kernel!r} uses a sigmoid input gate, which xlstm_large does not implement")


def _config_from_reference(cfg, where: str) -> XLSTMLargeConfig:
    """Our config from an official ``xLSTMLargeConfig`` or a transformers ``xLSTMConfig`` object."""
    _check_backend(cfg, where)
    d = getattr(cfg, "embedding_dim", None) or cfg.hidden_size
    n_blocks = getattr(cfg, "num_blocks", None) or cfg.num_hidden_layers
    values = dict(
        vocab_size=cfg.vocab_size, d_model=d, n_blocks=n_blocks, n_heads=cfg.num_heads, qk_dim_factor=float(cfg.qk_dim_factor),
        v_dim_factor=float(cfg.v_dim_factor), ffn_proj_factor=float(cfg.ffn_proj_factor), ffn_round_to=cfg.ffn_round_up_to_multiple_of,
        gate_soft_cap=cfg.gate_soft_cap, logit_soft_cap=cfg.output_logit_soft_cap, norm_eps=float(cfg.norm_eps),
        use_bias=bool(cfg.use_bias), add_out_norm=bool(cfg.add_out_norm), chunk_size=cfg.chunk_size,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )
    return config_from_dict(XLSTMLargeConfig, values, where=where)


def xlstm_large_config_from_hf(values: dict, where: str = "config.json") -> XLSTMLargeConfig:
    """Our config from an HF ``config.json`` dict (``model_type "xlstm"``); unknown keys are errors."""
    if values.get("model_type") != "xlstm":
        raise ConfigError(f"{where}: model_type is {values.get('model_type')!r}, expected 'xlstm'")
    known = set(_HF_TO_OURS) | set(_HF_ALIASES) | _HF_IGNORED
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown xLSTM config key(s) {unknown}; known keys: {sorted(known)}")
    for alias, key in _HF_ALIASES.items():
        if alias in values and values[alias] is not None:
            if key in values and values[key] is not None and values[key] != values[alias]:
                raise ConfigError(f"{where}: {alias} = {values[alias]} disagrees with {key} = {values[key]}")
            values = {**values, key: values[alias]}
    if "siging" in str(values.get("chunkwise_kernel", "")):
        raise ConfigError(f"{where}: chunkwise_kernel {values['chunkwise_kernel']!r} uses a sigmoid input gate, not supported")
    ours = {_HF_TO_OURS[k]: v for k, v in values.items() if k in _HF_TO_OURS}
    for k in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "norm_eps", "gate_soft_cap"):
        if isinstance(values.get(k), int) and not isinstance(values.get(k), bool):
            ours[_HF_TO_OURS[k]] = float(values[k])
    return config_from_dict(XLSTMLargeConfig, ours, where=where)


# ----------------------------------------------------------------------------------------------
# Entry points


def from_official_xlstm_large(official_model, dtype: torch.dtype = torch.float32) -> XLSTMLarge:
    """Our ``XLSTMLarge`` with every weight of an official ``xlstm.xlstm_large`` ``xLSTMLarge`` (in ``dtype``)."""
    where = "official xLSTMLarge"
    cfg = _config_from_reference(official_model.config, where)
    sd = {k: v.detach() for k, v in official_model.state_dict().items()}
    ours = state_dict_from_reference(sd, cfg.n_blocks, embed_key="embedding.weight", blocks_prefix="backbone.blocks",
                                     out_norm_prefix="backbone.out_norm", where=where)
    return _build(cfg, ours, where, dtype)


def from_hf_xlstm(hf_model, dtype: torch.dtype = torch.float32) -> XLSTMLarge:
    """Our ``XLSTMLarge`` with every weight of a transformers ``xLSTMForCausalLM`` (in ``dtype``)."""
    where = "transformers xLSTMForCausalLM"
    cfg = _config_from_reference(hf_model.config, where)
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    ours = state_dict_from_reference(sd, cfg.n_blocks, embed_key="backbone.embeddings.weight", blocks_prefix="backbone.blocks",
                                     out_norm_prefix="backbone.out_norm", where=where)
    return _build(cfg, ours, where, dtype)


def _read_safetensors(folder: Path) -> tuple[dict, str]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single)), str(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        sd: dict = {}
        for s in shards:
            if not (folder / s).is_file():
                raise CheckpointError(f"{index}: shard {s!r} is missing")
            sd.update(load_file(str(folder / s)))
        return sd, str(index)
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_hf_xlstm_folder(folder, dtype: torch.dtype = torch.float32) -> XLSTMLarge:
    """An HF xLSTM folder (``config.json`` + safetensors, as ``save_pretrained`` writes it) as our
    model with its weights in ``dtype`` (recurrent states stay fp32)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        values = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    cfg = xlstm_large_config_from_hf(values, where=str(cfg_path))
    sd, where = _read_safetensors(folder)
    ours = state_dict_from_reference(sd, cfg.n_blocks, embed_key=_embed_key(sd, "backbone.embeddings.weight"), blocks_prefix="backbone.blocks",
                                     out_norm_prefix="backbone.out_norm", where=where)
    return _build(cfg, ours, where, dtype)


def _read_official_config(folder: Path) -> tuple[dict, Path]:
    """The ``xLSTMLargeConfig`` fields of an official folder: ``config.yaml`` (what
    ``xlstm.xlstm_large.from_pretrained`` reads), else a ``config.json`` holding the same fields."""
    import yaml

    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.yaml (or config.json) with the xLSTMLargeConfig fields")
    try:
        values = yaml.safe_load(cfg_path.read_text()) if cfg_path.suffix == ".yaml" else json.loads(cfg_path.read_text())
    except (yaml.YAMLError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not valid {cfg_path.suffix[1:].upper()} ({type(e).__name__}: {e})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{cfg_path}: expected a mapping of xLSTMLargeConfig fields")
    if values.get("model_type", "xlstm") != "xlstm":
        raise ConfigError(f"{cfg_path}: model_type is {values['model_type']!r}, expected 'xlstm' (or none)")
    return values, cfg_path


def is_official_xlstm_config(values: dict) -> bool:
    """Whether a config.json dict is an official ``xLSTMLargeConfig`` dump (its own field names, no
    ``model_type``) rather than an HF config."""
    return "model_type" not in values and {"embedding_dim", "num_blocks", "num_heads", "vocab_size"} <= set(values)


def load_official_xlstm_large_folder(folder, dtype: torch.dtype = torch.float32) -> XLSTMLarge:
    """An official xLSTM-large checkpoint folder (``config.yaml``, or ``config.json`` with the same
    ``xLSTMLargeConfig`` fields, + ``model.safetensors`` or ``model_0.safetensors``,
    ``model_1.safetensors``, ...) as our model in ``dtype``. Unknown config keys are a ``ConfigError``
    naming the file and the keys."""
    from safetensors.torch import load_file

    folder = Path(folder)
    values, cfg_path = _read_official_config(folder)
    # the official field names are the HF ones (``embedding_dim``/``num_blocks`` are HF aliases)
    cfg = xlstm_large_config_from_hf({**values, "model_type": "xlstm"}, where=str(cfg_path))
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:  # shards model_0, model_1, ... up to the first one missing
        files = []
        while (folder / f"model_{len(files)}.safetensors").is_file():
            files.append(folder / f"model_{len(files)}.safetensors")
        if not files:
            raise CheckpointError(f"{folder}: no model.safetensors or model_0.safetensors")
    sd: dict = {}
    for f in files:
        sd.update(load_file(str(f)))
    ours = state_dict_from_reference(sd, cfg.n_blocks, embed_key=_embed_key(sd, "embedding.weight"), blocks_prefix="backbone.blocks",
                                     out_norm_prefix="backbone.out_norm", where=str(files[0]))
    return _build(cfg, ours, str(files[0]), dtype)


def _embed_key(sd: dict, default: str) -> str:
    """The embedding's name: official (``embedding.weight``) or transformers (``backbone.embeddings.weight``)
    checkpoints, whichever the weights hold (folders converted by hand mix configs and names)."""
    for key in (default, "embedding.weight", "backbone.embeddings.weight"):
        if key in sd:
            return key
    return default
