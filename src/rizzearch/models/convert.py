"""Weight import/export between rizzearch models and the reference implementations.

- ``from_official_xlstm(official_model) -> XLSTM``: NX-AI ``xlstm`` package's ``xLSTMLMModel``.
- ``from_hf_rwkv(hf_model) -> RWKV`` and ``to_hf_rwkv(model) -> RwkvForCausalLM``: HF transformers.

The reference packages are optional (the ``anchors`` extra); they are imported inside the
functions that need them, never at module import.
"""

from __future__ import annotations

# ==============================================================================================
# xLSTM (official NX-AI package)
# ==============================================================================================


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


def _rwkv_config_from_hf(sd: dict, hf_config=None):
    from rizzearch.errors import CheckpointError, ConfigError
    from rizzearch.models.rwkv import RWKVConfig

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


def from_hf_rwkv(hf_model) -> "RWKV":  # noqa: F821
    """Build a rizzearch ``RWKV`` with the weights of an HF ``RwkvForCausalLM``.

    Args:
        hf_model: a ``transformers.RwkvForCausalLM`` (any mode; in-place eval rescaling is undone),
            or its ``state_dict()`` (a dict of tensors; the config is inferred from the shapes).

    Raises:
        CheckpointError: the weights are not RWKV-4 HF weights (missing/extra keys, e.g. RWKV-5/6,
            or wrong shapes); the message lists what was expected and what was found.
    """
    import torch

    from rizzearch.errors import CheckpointError
    from rizzearch.models.rwkv import RWKV

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


def to_hf_rwkv(model, rescale_every: int = 6):
    """Export a rizzearch ``RWKV`` as an HF ``RwkvForCausalLM`` (in eval mode) with the same weights.

    Args:
        model: the rizzearch RWKV model.
        rescale_every: HF's inference-time rescaling of every N layers (its fp16 overflow guard; 0 disables).
    """
    from transformers import RwkvConfig, RwkvForCausalLM

    from rizzearch.errors import ConfigError

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


def to_official_rwkv(model) -> dict:
    """The weights in the official RWKV-LM v4 ``.pth`` layout (what the ``rwkv`` pip package loads).

    Keys ``emb.weight``, ``blocks.0.ln0.*``, ``blocks.i.{ln1,ln2}.*``, ``blocks.i.att.*`` (time_mix_*
    as (1, 1, C)), ``blocks.i.ffn.*``, ``ln_out.*``, ``head.weight``; float32 CPU tensors.
    """
    out = {}
    for key, t in model.state_dict().items():
        t = t.detach().float().cpu().clone()
        if key.startswith("ln0."):
            key = "blocks.0." + key
        if "time_mix" in key:
            t = t.view(1, 1, -1)
        out[key] = t
    return out
