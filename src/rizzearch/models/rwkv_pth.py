"""BlinkDL RWKV-LM ``.pth`` checkpoints (the released RWKV-4 Pile / World files) <-> our ``RWKV``.

An official RWKV-4 ``.pth`` is a flat state dict read with ``torch.load(weights_only=True)``:
``emb.weight (V, C)``, ``blocks.0.ln0.*``, per block ``ln1``, ``ln2``,
``att.{time_decay, time_first (A,), time_mix_{k,v,r} (1, 1, C), key, value, receptance, output}``,
``ffn.{time_mix_{k,r} (1, 1, C), key, receptance, value}``, then ``ln_out.*`` and ``head.weight``.
``time_decay`` is stored raw (the decay per step is ``exp(-exp(time_decay))``), as in our model, so
the tensors load unchanged. The config is read from the shapes.

Later versions change the keys, which is how we tell them apart and refuse them:
RWKV-5 ``att.ln_x`` / ``att.gate`` / ``att.time_faaaa``, RWKV-6 ``att.time_maa_*`` /
``att.time_decay_w1``, RWKV-7 ``att.w0`` / ``att.a0`` / ``att.x_r``.

Tokenizer: the GPT-NeoX (Pile) ``tokenizer.json`` in the file's folder. The World models' greedy
trie tokenizer (``rwkv_vocab_v20230424.txt``) has no HF ``tokenizers`` form and is refused with a
clear message (pass a tokenizer.json instead).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rizzearch.errors import CheckpointError, DataError
from rizzearch.models.rwkv import RWKV, RWKVConfig

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"

# version -> key fragments that only that version's checkpoints have
_TELLTALES = {
    7: ("att.w0", "att.a0", "att.v0", "att.x_r", "att.k_k"),
    6: ("att.time_maa", "att.time_decay_w1"),
    5: ("att.ln_x", "att.gate", "att.time_faaaa"),
}


def rwkv_pth_version(sd: dict) -> tuple[int | None, list[str]]:
    """(version, telltale keys) of an official RWKV-LM state dict; version None when it is not one.

    RWKV-6 is checked before RWKV-5 because both have ``time_faaaa``; RWKV-4 is recognised by
    ``att.time_first`` + ``att.time_mix_k``."""
    keys = sorted(sd)
    for version in (7, 6, 5):
        hits = [k for k in keys if any(frag in k for frag in _TELLTALES[version])]
        if hits:
            return version, hits[:4]
    v4 = [k for k in keys if k.endswith("att.time_first") or k.endswith("att.time_mix_k")]
    if v4 and "emb.weight" in sd:
        return 4, v4[:4]
    return None, []


def read_rwkv_pth(path: Path) -> dict:
    """The tensors of a ``.pth`` file, read with ``torch.load(weights_only=True)`` (no pickled code runs)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for pickles it refuses or truncated zips
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors (an RWKV-LM .pth), found {type(sd).__name__}")
    return sd


def _ours_to_official_names(n_layer: int) -> dict[str, str]:
    """Our state-dict key -> the RWKV-LM key, for RWKV-4 with ``n_layer`` blocks."""
    names = {"emb.weight": "emb.weight", "ln0.weight": "blocks.0.ln0.weight", "ln0.bias": "blocks.0.ln0.bias"}
    for p in ("ln_out.weight", "ln_out.bias", "head.weight"):
        names[p] = p
    for i in range(n_layer):
        b = f"blocks.{i}."
        for p in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.time_decay", "att.time_first"):
            names[b + p] = b + p
        for p in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            names[b + p] = b + p
        for p in ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value"):
            names[b + p + ".weight"] = b + p + ".weight"
    return names


def _config_from_official(sd: dict, where: str) -> RWKVConfig:
    version, telltale = rwkv_pth_version(sd)
    if version is None:
        raise CheckpointError(
            f"{where}: not an RWKV-LM checkpoint (no emb.weight / blocks.<i>.att.time_first); found keys such as {sorted(sd)[:6]}"
        )
    if version != 4:
        raise CheckpointError(
            f"{where}: an RWKV-{version} checkpoint (keys {telltale}); only RWKV-4 (.att.time_first, .att.time_mix_k) is supported"
        )
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for key in ("blocks.0.att.key.weight", "blocks.0.ffn.key.weight"):
        if key not in sd:
            raise CheckpointError(f"{where}: RWKV-4 key {key!r} missing")
    V, C = sd["emb.weight"].shape
    A, Fd = sd["blocks.0.att.key.weight"].shape[0], sd["blocks.0.ffn.key.weight"].shape[0]
    # None = the default width, so a model saved and reloaded keeps an equal config
    return RWKVConfig(vocab_size=V, n_layer=n_layer, d_model=C, d_att=None if A == C else A, d_ffn=None if Fd == 4 * C else Fd)


def from_official_rwkv(sd: dict, where: str = "RWKV-LM state dict", dtype: torch.dtype = torch.float32) -> RWKV:
    """Our ``RWKV`` holding an official RWKV-4 state dict (keys and shapes checked, config from shapes).

    Raises:
        CheckpointError: not RWKV-4 (names the version and its telltale keys), missing or extra keys,
            or a tensor of the wrong shape.
    """
    cfg = _config_from_official(sd, where)
    names = _ours_to_official_names(cfg.n_layer)
    missing = sorted(set(names.values()) - set(sd))
    extra = sorted(set(sd) - set(names.values()))
    if missing or extra:
        raise CheckpointError(
            f"{where}: keys do not match RWKV-4 with {cfg.n_layer} layers: missing {len(missing)} {missing[:6]}, "
            f"unexpected {len(extra)} {extra[:6]}"
        )
    with torch.device("meta"):
        model = RWKV(cfg)
    ours = model.state_dict()
    new = {}
    for key, off in names.items():
        t = sd[off]
        if "time_mix" in key:
            t = t.reshape(-1)  # (1, 1, C) -> (C,)
        if tuple(t.shape) != tuple(ours[key].shape):
            raise CheckpointError(f"{where}: {off} has shape {tuple(sd[off].shape)}, expected {tuple(ours[key].shape)} for RWKV-4")
        new[key] = t.to(dtype).contiguous()
    model.load_state_dict(new, strict=True, assign=True)
    return model


def to_official_state_dict(model: RWKV) -> dict:
    """Our weights under RWKV-LM names (time_mix as (1, 1, C)), float32 CPU tensors."""
    names = _ours_to_official_names(model.config.n_layer)
    out = {}
    for key, t in model.state_dict().items():
        t = t.detach().float().cpu().clone()
        out[names[key]] = t.view(1, 1, -1) if "time_mix" in key else t
    return out


def rwkv_tokenizer(pth: Path, vocab_size: int):
    """The tokenizer next to ``pth`` (tokenizer.json), checked against the embedding's ``vocab_size``; None without one."""
    from rizzearch.models.pretrained import hf_tokenizer

    folder = pth.parent
    if (folder / "tokenizer.json").is_file():
        tok = hf_tokenizer(folder, {"eos_token_id": 0})  # RWKV-4 Pile: id 0 is <|endoftext|>
        check_vocab(tok, vocab_size, folder / "tokenizer.json")
        return tok
    if (folder / WORLD_VOCAB).is_file():
        raise DataError(
            f"{folder / WORLD_VOCAB}: the RWKV World tokenizer (greedy byte trie) is not supported; "
            "put the model's tokenizer.json next to the weights instead"
        )
    return None


def check_vocab(tok, vocab_size: int, where: Path) -> None:
    """Refuse a tokenizer that produces ids the embedding does not have (a smaller tokenizer is fine: padded vocabularies)."""
    if tok is not None and tok.vocab_size > vocab_size:
        raise DataError(f"{where}: tokenizer has {tok.vocab_size} tokens but the model's embedding has {vocab_size} rows")
