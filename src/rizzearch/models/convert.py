"""Weight import/export between rizzearch models and the reference implementations.

- ``from_official_xlstm(official_model) -> XLSTM``: NX-AI ``xlstm`` package's ``xLSTMLMModel``.
- ``from_hf_rwkv(hf_model) -> RWKV`` and ``to_hf_rwkv(model) -> RwkvForCausalLM``: HF transformers.
- ``from_hf_llama(hf_model) -> Llama`` and ``to_hf_llama(model) -> LlamaForCausalLM`` (Qwen2ForCausalLM
  when the model has q/k/v biases): HF transformers; the name and layout mapping is ``models/hf_llama.py``.

The reference packages are optional (the ``anchors`` extra); they are imported inside the
functions that need them, never at module import.
"""

from __future__ import annotations

import math

import torch

from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.models.base import config_from_dict
from rizzearch.models.rwkv import RWKV, RWKVConfig
from rizzearch.models.xlstm import XLSTM, XLSTMConfig

# ==============================================================================================
# xLSTM (official NX-AI package)
# ==============================================================================================
#
# Official xLSTMLMModel (NeurIPS architecture) -> rizzearch XLSTM, parameter by parameter:
#   token_embedding.weight                      embed.weight
#   xlstm_block_stack.post_blocks_norm.weight   norm            (official stores weight - 1)
#   lm_head.weight                              lm_head.weight
#   blocks.i.xlstm_norm.weight                  blocks.i.norm   (weight - 1)
# mLSTM block (blocks.i.xlstm = mLSTMLayer):
#   proj_up, proj_down, q_proj/k_proj/v_proj (block-diagonal, same layout), learnable_skip -> skip
#   conv1d.conv.{weight (inner, 1, K), bias}    conv_weight (inner, K), conv_bias
#   mlstm_cell.{igate, fgate}                   igate, fgate
#   mlstm_cell.outnorm.weight                   outnorm         (weight - 1)
# sLSTM block (blocks.i.xlstm = sLSTMLayer, plus blocks.i.ffn_norm / blocks.i.ffn):
#   fgate.weight -> igate.weight and igate.weight -> fgate.weight: the official layer feeds its
#   module named "fgate" into the input gate and "igate" into the forget gate
#   zgate, ogate                                zgate, ogate
#   slstm_cell recurrent kernel (external layout (NH, Dh, 4, Dh))   R
#   slstm_cell bias (external layout (NH, 4, Dh))                   b (4, NH, Dh)
#   group_norm.weight                           outnorm         (weight - 1)
#   ffn.proj_up [gate; up], ffn.proj_down       ffn_up, ffn_down


def _xlstm_ln_weight(norm, n: int):
    """The effective LayerNorm weight of an official LayerNorm (``1 + weight`` when residual)."""
    if getattr(norm, "bias", None) is not None:
        raise ConfigError("from_official_xlstm: official LayerNorm with a bias is not supported (rizzearch norms have no bias)")
    w = norm.weight_proxy
    return torch.ones(n) if w is None else w.detach()


def _xlstm_linear(src: dict, key: str, linear) -> None:
    """Map an official linear layer's weight (and bias, when it has one) to ``key.weight`` / ``key.bias``."""
    src[key + ".weight"] = linear.weight
    if linear.bias is not None:
        src[key + ".bias"] = linear.bias


def _xlstm_config_from_official(cfg, blocks) -> dict:
    """Derive rizzearch XLSTMConfig fields from an official xLSTMLMModelConfig and its built blocks
    (widths are read from the blocks: the top-level sub-configs are not always post-processed)."""
    E = cfg.embedding_dim
    slstm_at = [i for i, t in enumerate(cfg.block_map) if t == 1]
    out = dict(
        vocab_size=cfg.vocab_size,
        d_model=E,
        n_blocks=cfg.num_blocks,
        slstm_at=tuple(slstm_at),
        bias=bool(cfg.bias),
        tie_embeddings=bool(cfg.tie_weights),
        dropout=float(cfg.dropout),
        norm_eps=1e-5,
    )
    if not cfg.add_post_blocks_norm:
        raise ConfigError("from_official_xlstm: add_post_blocks_norm=False is not supported (rizzearch always has a final norm)")
    dims = []
    if len(slstm_at) < cfg.num_blocks:
        m = blocks[cfg.block_map.index(0)].xlstm.config
        inner = m._inner_embedding_dim
        dims.append(inner)
        out.update(mlstm_heads=m.num_heads, qkv_blocksize=m.qkv_proj_blocksize, conv_kernel=m.conv1d_kernel_size, mlstm_proj_factor=inner / E)
        if m.conv1d_kernel_size < 1:
            raise ConfigError("from_official_xlstm: mLSTM conv1d_kernel_size must be >= 1")
    if slstm_at:
        s = blocks[slstm_at[0]].xlstm.config
        ff = blocks[slstm_at[0]].config.feedforward
        if s.function != "slstm":
            raise ConfigError(f"from_official_xlstm: sLSTM function {s.function!r} is not supported (only 'slstm')")
        if s.conv1d_kernel_size < 1:
            raise ConfigError("from_official_xlstm: sLSTM conv1d_kernel_size=0 (no conv) is not supported")
        if ff is None or ff.ff_type != "ffn_gated" or ff.act_fn != "gelu":
            raise ConfigError("from_official_xlstm: the sLSTM block must have the gated GELU feed-forward ('ffn_gated', 'gelu')")
        dims.append(ff._proj_up_dim)
        out.update(slstm_heads=s.num_heads, slstm_conv_kernel=s.conv1d_kernel_size, ffn_proj_factor=ff._proj_up_dim / E)
    if dims:
        out["round_to"] = math.gcd(*dims)
    return out


def from_official_xlstm(official_model) -> XLSTM:
    """Build a rizzearch ``XLSTM`` from the official ``xlstm`` package's ``xLSTMLMModel``.

    The config is derived from the official model's config (block map, widths, heads, kernels,
    bias, tied weights) and every weight is copied (see the table above for the mapping). The
    result is in eval mode on the official model's device and dtype; its logits match the
    official forward to fp32 rounding (tests/models/test_xlstm_parity.py).

    Raises:
        ConfigError: the official model uses a feature rizzearch does not implement.
    """
    cfg = getattr(official_model, "config", None)
    stack = getattr(official_model, "xlstm_block_stack", None)
    if cfg is None or stack is None or not hasattr(official_model, "token_embedding"):
        raise ConfigError(f"from_official_xlstm: expected an official xlstm.xLSTMLMModel, got {type(official_model).__name__}")
    ours = XLSTM(config_from_dict(XLSTMConfig, _xlstm_config_from_official(cfg, stack.blocks), where="converted official xLSTM config"))
    E = cfg.embedding_dim
    src = {}
    src["embed.weight"] = official_model.token_embedding.weight
    if not cfg.tie_weights:
        src["lm_head.weight"] = official_model.lm_head.weight
    src["norm"] = _xlstm_ln_weight(stack.post_blocks_norm, E)
    for i, (theirs, mine) in enumerate(zip(stack.blocks, ours.blocks)):
        p = f"blocks.{i}."
        layer = theirs.xlstm
        src[p + "norm"] = _xlstm_ln_weight(theirs.xlstm_norm, E)
        src[p + "conv_weight"] = layer.conv1d.conv.weight[:, 0, :]
        src[p + "conv_bias"] = layer.conv1d.conv.bias
        if mine.kind == "m":
            cell = layer.mlstm_cell
            for name in ("proj_up", "proj_down", "q_proj", "k_proj", "v_proj"):
                _xlstm_linear(src, p + name, getattr(layer, name))
            for name in ("igate", "fgate"):
                _xlstm_linear(src, p + name, getattr(cell, name))
            src[p + "outnorm"] = _xlstm_ln_weight(cell.outnorm, mine.inner)
            src[p + "skip"] = layer.learnable_skip
        else:
            cell = layer.slstm_cell
            src[p + "igate.weight"] = layer.fgate.weight  # crosswise: see the table above
            src[p + "fgate.weight"] = layer.igate.weight
            src[p + "zgate.weight"] = layer.zgate.weight
            src[p + "ogate.weight"] = layer.ogate.weight
            src[p + "R"] = cell._recurrent_kernel_int2ext(cell._recurrent_kernel)  # (NH, Dh, 4, Dh)
            src[p + "b"] = cell._bias_int2ext(cell._bias).permute(1, 0, 2)  # (NH, 4, Dh) -> (4, NH, Dh)
            src[p + "outnorm"] = _xlstm_ln_weight(layer.group_norm, E)
            src[p + "ffn_norm"] = _xlstm_ln_weight(theirs.ffn_norm, E)
            _xlstm_linear(src, p + "ffn_up", theirs.ffn.proj_up)
            _xlstm_linear(src, p + "ffn_down", theirs.ffn.proj_down)
    own = ours.state_dict()
    missing = sorted(set(own) - set(src) - ({"lm_head.weight"} if cfg.tie_weights else set()))
    if missing:
        raise ConfigError(f"from_official_xlstm: no official weight for {missing}")
    with torch.no_grad():
        for name, t in src.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise ConfigError(
                    f"from_official_xlstm: {name}: official weight has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}"
                )
            own[name].copy_(t.detach().to(own[name].dtype))
    ref = official_model.token_embedding.weight
    return ours.to(device=ref.device, dtype=ref.dtype).eval()


# ==============================================================================================
# RWKV-4 (HF transformers)
# ==============================================================================================
#
# HF RwkvForCausalLM <-> rizzearch RWKV, parameter by parameter:
#   rwkv.embeddings.weight                  emb.weight
#   rwkv.blocks.0.pre_ln.{weight,bias}      ln0.{weight,bias}
#   rwkv.blocks.i.ln{1,2}.*                 blocks.i.ln{1,2}.*
#   rwkv.blocks.i.attention.time_mix_key    blocks.i.att.time_mix_k   ((1, 1, C) <-> (C,); also _value/_v, _receptance/_r)
#   rwkv.blocks.i.attention.{time_decay,time_first,key,value,receptance,output}  blocks.i.att.*
#   rwkv.blocks.i.feed_forward.time_mix_{key,receptance}  blocks.i.ffn.time_mix_{k,r}
#   rwkv.blocks.i.feed_forward.{key,receptance,value}     blocks.i.ffn.*
#   rwkv.ln_out.*  ->  ln_out.*;   head.weight  ->  head.weight
#
# HF quirks handled here: in eval mode HF divides att.output / ffn.value weights by
# 2 ** (i // rescale_every) *in place* (``layers_are_rescaled``); we undo that when importing.
# HF's ln_out always uses eps 1e-5 whatever ``layer_norm_epsilon`` says.

_RWKV_MIX = {"key": "k", "value": "v", "receptance": "r"}
_RWKV_LINEARS = {"attention": ("key", "value", "receptance", "output"), "feed_forward": ("key", "receptance", "value")}
_RWKV_HF_EPS_OUT = 1e-5


def _rwkv_hf_to_ours_names(n_layer: int) -> dict[str, str]:
    """HF state-dict key -> rizzearch key, for an RWKV-4 model with ``n_layer`` blocks."""
    names = {
        "rwkv.embeddings.weight": "emb.weight",
        "rwkv.blocks.0.pre_ln.weight": "ln0.weight",
        "rwkv.blocks.0.pre_ln.bias": "ln0.bias",
        "rwkv.ln_out.weight": "ln_out.weight",
        "rwkv.ln_out.bias": "ln_out.bias",
        "head.weight": "head.weight",
    }
    for i in range(n_layer):
        hf, us = f"rwkv.blocks.{i}.", f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            for p in ("weight", "bias"):
                names[f"{hf}{ln}.{p}"] = f"{us}{ln}.{p}"
        for p in ("time_decay", "time_first"):
            names[f"{hf}attention.{p}"] = f"{us}att.{p}"
        for long, short in _RWKV_MIX.items():
            names[f"{hf}attention.time_mix_{long}"] = f"{us}att.time_mix_{short}"
        for long in ("key", "receptance"):
            names[f"{hf}feed_forward.time_mix_{long}"] = f"{us}ffn.time_mix_{_RWKV_MIX[long]}"
        for mod, ours in (("attention", "att"), ("feed_forward", "ffn")):
            for lin in _RWKV_LINEARS[mod]:
                names[f"{hf}{mod}.{lin}.weight"] = f"{us}{ours}.{lin}.weight"
    return names


def _rwkv_version_hint(keys) -> str:
    keys = list(keys)
    if any("time_maa" in k or "time_decay_w1" in k for k in keys):
        return " (the keys look like RWKV-6: time_maa_* / time_decay_w1)"
    if any(".ln_x." in k or "time_faaaa" in k or "gate.weight" in k for k in keys):
        return " (the keys look like RWKV-5: ln_x / gate / time_faaaa)"
    if any(k.startswith("blocks.") or k == "emb.weight" for k in keys):
        return " (the keys look like an official RWKV-LM checkpoint, not HF transformers)"
    return ""


def _rwkv_config_from_hf(sd: dict, hf_config=None) -> RWKVConfig:
    def need(key):
        if key not in sd:
            raise CheckpointError(
                f"HF RWKV weights: expected key {key!r} of an RWKV-4 RwkvForCausalLM, not found{_rwkv_version_hint(sd)}; "
                f"found keys such as {sorted(sd)[:6]}"
            )
        return sd[key]

    emb = need("rwkv.embeddings.weight")
    V, C = emb.shape
    n_layer = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("rwkv.blocks.")), default=-1)
    A = need("rwkv.blocks.0.attention.key.weight").shape[0]
    Fd = need("rwkv.blocks.0.feed_forward.key.weight").shape[0]
    eps = 1e-5
    tie = False
    if hf_config is not None:
        eps = float(getattr(hf_config, "layer_norm_epsilon", 1e-5))
        tie = bool(getattr(hf_config, "tie_word_embeddings", False))
        want = (hf_config.vocab_size, hf_config.hidden_size, hf_config.num_hidden_layers)
        if (V, C, n_layer) != tuple(want):
            raise CheckpointError(
                f"HF RWKV weights: config says vocab_size, hidden_size, num_hidden_layers = {want}, weights have {(V, C, n_layer)}"
            )
    if eps != _RWKV_HF_EPS_OUT:
        raise ConfigError(
            f"HF RWKV: layer_norm_epsilon={eps} is used by HF for ln0/ln1/ln2 but ln_out always uses 1e-5; "
            "rizzearch's RWKVConfig has a single norm_eps, so this model cannot be reproduced exactly"
        )
    if n_layer < 1:
        raise CheckpointError(f"HF RWKV weights: expected keys rwkv.blocks.<i>.*, found none{_rwkv_version_hint(sd)}")
    return RWKVConfig(vocab_size=V, n_layer=n_layer, d_model=C, d_att=A, d_ffn=Fd, norm_eps=eps, tie_embeddings=tie)


def from_hf_rwkv(hf_model) -> RWKV:
    """Build a rizzearch ``RWKV`` with the weights of an HF ``RwkvForCausalLM``.

    Args:
        hf_model: a ``transformers.RwkvForCausalLM`` (any mode; in-place eval rescaling is undone),
            or its ``state_dict()`` (a dict of tensors; the config is inferred from the shapes).

    Raises:
        CheckpointError: the weights are not RWKV-4 HF weights (missing/extra keys, e.g. RWKV-5/6,
            or wrong shapes); the message lists what was expected and what was found.
    """
    if isinstance(hf_model, dict):
        sd, hf_config, rescaled_every = dict(hf_model), None, 0
    else:
        sd = dict(hf_model.state_dict())
        hf_config = getattr(hf_model, "config", None)
        base = getattr(hf_model, "rwkv", hf_model)
        rescaled_every = int(getattr(hf_config, "rescale_every", 0) or 0) if getattr(base, "layers_are_rescaled", False) else 0
        if "rwkv.embeddings.weight" not in sd and "embeddings.weight" in sd:  # an RwkvModel without head
            raise CheckpointError("from_hf_rwkv: expected an RwkvForCausalLM (with a head), found an RwkvModel")
    cfg = _rwkv_config_from_hf(sd, hf_config)
    names = _rwkv_hf_to_ours_names(cfg.n_layer)
    missing = sorted(set(names) - set(sd))
    extra = sorted(set(sd) - set(names))
    if missing or extra:
        raise CheckpointError(
            f"HF RWKV weights do not match RWKV-4 with {cfg.n_layer} layers{_rwkv_version_hint(extra)}: "
            f"missing {len(missing)} key(s) {missing[:8]}, unexpected {len(extra)} key(s) {extra[:8]}"
        )
    model = RWKV(cfg)
    ours = model.state_dict()
    new = {}
    for hf_key, key in names.items():
        t = sd[hf_key].detach()
        if "time_mix" in key:
            t = t.reshape(-1)  # (1, 1, C) -> (C,)
        if tuple(t.shape) != tuple(ours[key].shape):
            raise CheckpointError(
                f"HF RWKV weights: {hf_key} has shape {tuple(sd[hf_key].shape)}, expected {tuple(ours[key].shape)} for RWKV-4{_rwkv_version_hint(sd)}"
            )
        if rescaled_every and (key.endswith("att.output.weight") or key.endswith("ffn.value.weight")):
            t = t * (2 ** (int(key.split(".")[1]) // rescaled_every))  # undo HF's in-place eval rescale
        new[key] = t.to(torch.float32)
    model.load_state_dict(new, strict=True)
    dtype = sd["rwkv.embeddings.weight"].dtype
    return model.to(dtype=dtype, device=sd["rwkv.embeddings.weight"].device)


def to_hf_rwkv(model: RWKV, rescale_every: int = 6):
    """Export a rizzearch ``RWKV`` as an HF ``RwkvForCausalLM`` (in eval mode) with the same weights.

    Args:
        model: the rizzearch RWKV model.
        rescale_every: HF's inference-time rescaling of every N layers (its fp16 overflow guard; 0 disables).
    """
    from transformers import RwkvConfig, RwkvForCausalLM

    cfg = model.config
    if cfg.norm_eps != _RWKV_HF_EPS_OUT:
        raise ConfigError(f"to_hf_rwkv: HF's ln_out always uses eps 1e-5, this model has norm_eps={cfg.norm_eps}")
    hf_cfg = RwkvConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        attention_hidden_size=cfg.att_dim,
        intermediate_size=cfg.ffn_dim,
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rescale_every=rescale_every,
    )
    hf = RwkvForCausalLM(hf_cfg)
    ours = model.state_dict()
    sd = {}
    for hf_key, key in _rwkv_hf_to_ours_names(cfg.n_layer).items():
        t = ours[key].detach().cpu()
        sd[hf_key] = t.view(1, 1, -1) if "time_mix" in key else t
    hf.load_state_dict(sd, strict=True)
    return hf.to(model.emb.weight.dtype).eval()


def to_official_rwkv(model: RWKV, path=None) -> dict:
    """The weights in the official RWKV-LM v4 ``.pth`` layout (what the ``rwkv`` pip package loads).

    Keys ``emb.weight``, ``blocks.0.ln0.*``, ``blocks.i.{ln1,ln2}.*``, ``blocks.i.att.*`` (time_mix_*
    as (1, 1, C)), ``blocks.i.ffn.*``, ``ln_out.*``, ``head.weight``; float32 CPU tensors. With
    ``path`` the dict is also written there with ``torch.save`` (atomically), readable by
    ``load_pretrained`` and ``rwkv.model.RWKV``.
    """
    from pathlib import Path

    from rizzearch.models.rwkv_pth import to_official_state_dict

    out = to_official_state_dict(model)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(out, tmp)
        tmp.replace(path)
    return out


# ==============================================================================================
# Llama family (HF transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
# ==============================================================================================


def from_hf_llama(hf_model) -> "Llama":
    """A transformers Llama/Mistral/Qwen2 causal LM -> rizzearch ``Llama`` (same dtype and weights)."""
    from rizzearch.models.hf_llama import config_from_hf, state_dict_from_hf
    from rizzearch.models.llama import Llama

    where = f"{type(hf_model).__name__} config"
    cfg = config_from_hf(hf_model.config.to_dict(), where=where)
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    model = Llama(cfg)
    dtype = next(hf_model.parameters()).dtype
    model.to(dtype).load_state_dict(state_dict_from_hf(sd, cfg, where=type(hf_model).__name__))
    return model


def to_hf_llama(model: "Llama"):
    """rizzearch ``Llama`` -> a transformers LlamaForCausalLM (Qwen2ForCausalLM when ``qkv_bias``)."""
    import transformers

    from rizzearch.models.hf_llama import SUPPORTED, config_to_hf, state_dict_to_hf

    d = config_to_hf(model.config)
    cls = getattr(transformers, SUPPORTED[d["model_type"]])
    config_cls = transformers.AutoConfig.for_model(d["model_type"]).__class__
    hf_cfg = config_cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf = cls(hf_cfg).to(next(model.parameters()).dtype).eval()
    sd = state_dict_to_hf(model.state_dict(), model.config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"to_hf_llama: transformers expects {missing[:5]} and does not know {unexpected[:5]}")
    return hf


# ----------------------------------------------------------------------------------------------
# xLSTM-7B architecture (xlstm_large): lives in convert_xlstm_large.py, re-exported here

from rizzearch.models.convert_xlstm_large import (  # noqa: E402
    from_hf_xlstm,
    from_official_xlstm_large,
    load_hf_xlstm_folder,
    load_official_xlstm_large_folder,
)
