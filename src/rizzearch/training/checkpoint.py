"""Checkpoints: weights in safetensors, everything else in a ``weights_only`` torch file.

Layout of a run folder::

    RUN/config.yaml              resolved config of the command that made it
    RUN/metrics.jsonl            one JSON object per log/eval step
    RUN/tokenizer.json           the tokenizer the model was trained with
    RUN/checkpoints/latest.json  {"name": "step_00000200"}
    RUN/checkpoints/step_00000200/
        model.safetensors        weights
        model.json               {"model": name, "config": {...}, "tokenizer": fingerprint, ...}
        train_state.pt           optimizer, RNG states, data position, step (weights_only=True)

Every write goes to a temporary name first and is renamed into place, so a crash mid-write never
leaves a half checkpoint under a real name, and ``latest.json`` only ever names complete ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rizzearch.errors import CheckpointError
from rizzearch.models.base import build_model, config_to_dict
from rizzearch.runs import atomic_write_text
from rizzearch.training.lora import adapter_state_dict, lora_layers

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
STATE_FILE = "train_state.pt"
LATEST = "latest.json"


def model_meta(model, **extra) -> dict:
    """What is needed to rebuild ``model``: registry name and config, plus ``extra`` fields."""
    name = getattr(model, "registry_name", None)
    if name is None:
        raise CheckpointError(f"{type(model).__name__} is not a registered model; cannot checkpoint it by name")
    return {"model": name, "config": config_to_dict(model.config), **extra}


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": np.random.get_state()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    internal = state["python"]
    gauss = internal[-1]
    random.setstate((state["python_version"], tuple(internal[:-1]), None if gauss == -1 else gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model, meta: dict, train_state: dict | None, keep: int = 2,
                    weights: dict | None = None) -> Path:
    """Write ``ckpt_root/step_XXXXXXXX`` atomically and point ``latest.json`` at it.

    ``weights``: the tensors to store instead of the model's own (a LoRA run's adapters, FSDP's
    gathered full weights).
    """
    from safetensors.torch import save_file, save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if weights is not None:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    else:
        save_model(model, str(tmp / MODEL_FILE))
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=2))
    _fault_pause(step)
    if train_state is not None:
        torch.save(train_state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / LATEST, json.dumps({"name": name, "step": step}))
    # keep the newest `keep` complete checkpoints
    if keep > 0:
        done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fault_pause(step: int) -> None:
    """Fault-injection hook for the kill tests: ``RIZZ_FAULT_CHECKPOINT_SLEEP=SECONDS`` (or
    ``STEP:SECONDS``, only at that step) pauses in the middle of a checkpoint write (weights and
    model.json written, training state not yet), so a test can kill the process there. Unset
    (always, outside tests) it does nothing."""
    spec = os.environ.get("RIZZ_FAULT_CHECKPOINT_SLEEP")
    if not spec:
        return
    at, _, delay = spec.rpartition(":")
    if not at or int(at) == step:
        import time

        time.sleep(float(delay))


def clean_partial_checkpoints(ckpt_root: Path) -> list[str]:
    """Delete ``.tmp-step_*`` folders left by a run killed in the middle of a checkpoint write.

    Call it only while holding the run folder's lock (``rizzearch.runs.RunLock``): then no other
    process can be writing one. Returns the names removed."""
    removed = []
    if ckpt_root.is_dir():
        for tmp in sorted(ckpt_root.glob(".tmp-step_*")):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _read_latest(latest: Path) -> str:
    """The checkpoint name in ``latest.json``: a plain ``step_*`` folder name inside the same folder."""
    import re

    try:
        data = json.loads(latest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{latest}: corrupted ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise CheckpointError(f"{latest}: expected a JSON object with a string field 'name', got {type(data).__name__ if not isinstance(data, dict) else repr(data.get('name'))}")
    name = data["name"]
    if not re.fullmatch(r"step_\d+", name):
        raise CheckpointError(f"{latest}: 'name' must be a checkpoint folder of this run (step_<n>), got {name!r}")
    return name


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its ``checkpoints`` folder, or one ``step_*`` folder -> the checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint path not found")
    if (p / META_FILE).is_file() or (p / MODEL_FILE).exists():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    latest = root / LATEST
    if latest.is_file():
        name = _read_latest(latest)
        if (root / name).is_dir():
            return root / name
        raise CheckpointError(f"{latest}: names {name}, which does not exist")
    steps = sorted(q for q in root.glob("step_*") if q.is_dir())
    if steps:
        return steps[-1]
    raise CheckpointError(f"{p}: no checkpoint found (expected {META_FILE} or checkpoints/{LATEST})")


def read_meta(ckpt: Path) -> dict:
    f = ckpt / META_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (not a rizzearch checkpoint?)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: corrupted JSON (line {e.lineno}: {e.msg})") from e
    for key in ("model", "config"):
        if key not in meta:
            raise CheckpointError(f"{f}: missing field {key!r}")
    return meta


def load_weights(model, ckpt: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    f = ckpt / MODEL_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: weights file missing")
    try:
        missing, unexpected = load_model(model, str(f), strict=False)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: corrupted or truncated weights file ({e})") from e
    if missing or unexpected:
        raise CheckpointError(f"{f}: weights do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    check_finite(model, str(f))


def check_finite(model, where: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor (a model that loads them
    would evaluate to NaN and exit 0)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}; refusing to load it")


def load_train_state(ckpt: Path) -> dict:
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: training state missing (checkpoint saved without optimizer state?)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt zip files
        raise CheckpointError(f"{f}: corrupted or truncated training state ({type(e).__name__}: {e})") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True):
    """Rebuild a model (and its tokenizer) from a checkpoint -> ``(model, tokenizer | None, meta)``.

    ``path`` may be a run folder (its latest checkpoint is used) or a checkpoint folder. The
    tokenizer is looked up next to the checkpoint, then in the run folder; when found, its
    vocabulary must match the checkpoint's (else ``CheckpointError``).
    """
    from rizzearch.data.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    try:
        model = build_model(meta["model"], **meta["config"])
    except Exception as e:
        raise CheckpointError(f"{ckpt / META_FILE}: cannot rebuild model {meta['model']!r} ({e})") from e
    if "lora" in meta:
        model = _lora_model(ckpt, meta)
    else:
        load_weights(model, ckpt)
    model.to(device)
    tok = None
    if tokenizer:
        for cand in (ckpt / "tokenizer.json", ckpt.parent.parent / "tokenizer.json"):
            if cand.is_file():
                tok = Tokenizer.load(cand)
                check_tokenizer(tok, meta, str(cand))
                break
    return model, tok, meta


def _lora_model(ckpt: Path, meta: dict):
    """A LoRA run's checkpoint (adapters only): its base from the run's --init, then the adapters."""
    from rizzearch.training.lora import apply_lora

    init = (meta.get("data") or {}).get("init")
    if not init:
        raise CheckpointError(f"{ckpt}: a LoRA checkpoint holds only the adapters and its run had no --init base to rebuild "
                              "(a seeded new model); resume the run, or train LoRA from a checkpoint with --init")
    base, _, base_meta = load_any(init, tokenizer=False)
    if base_meta["model"] != meta["model"] or base_meta["config"] != meta["config"]:
        raise CheckpointError(f"{ckpt}: its --init base {init} is no longer the model the adapters were trained on")
    lora = meta["lora"]
    apply_lora(base, int(lora["r"]), float(lora["alpha"]), float(lora.get("dropout", 0.0)), lora.get("targets"))
    load_model_weights(base, ckpt)
    return base


def check_tokenizer(tok, meta: dict, where: str) -> None:
    """Raise CheckpointError when a tokenizer does not belong to a checkpoint."""
    from rizzearch.data.tokenizer import tokenizer_fingerprint

    vocab = meta["config"].get("vocab_size")
    if vocab is not None and tok.vocab_size > vocab:
        raise CheckpointError(f"{where}: tokenizer has {tok.vocab_size} tokens but the checkpoint's model has vocab_size {vocab}")
    fp = meta.get("tokenizer")
    if fp is not None and fp != tokenizer_fingerprint(tok):
        raise CheckpointError(f"{where}: tokenizer does not match the one the checkpoint was trained with (fingerprint {tokenizer_fingerprint(tok)} != {fp})")


# ----------------------------------------------------------------------------------------------
# LoRA and FSDP weights


def load_model_weights(model, ckpt: Path) -> None:
    """A checkpoint's weights into ``model``: every weight, or only the adapters of a LoRA model."""
    if not lora_layers(model):
        return load_weights(model, ckpt)
    from safetensors.torch import load_file

    f = ckpt / MODEL_FILE
    try:
        tensors = load_file(str(f))
    except Exception as e:  # safetensors' own error types for missing, truncated or corrupt files
        raise CheckpointError(f"{f}: missing, corrupted or truncated weights file ({e})") from None
    want = set(adapter_state_dict(model))
    if set(tensors) != want:
        raise CheckpointError(f"{f}: not this model's LoRA adapters (missing {sorted(want - set(tensors))[:5]}, "
                              f"unexpected {sorted(set(tensors) - want)[:5]}); resume with the run's own --lora settings")
    model.load_state_dict(tensors, strict=False)
    check_finite(model, str(f))


def tied_aliases(model) -> set[str]:
    """State-dict names that repeat an earlier parameter (tied weights): a checkpoint stores one copy."""
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        (aliases.add(name) if id(p) in seen else seen.add(id(p)))
    return aliases


def checkpoint_weights(model, fsdp: bool, aliases: set[str]) -> dict | None:
    """The tensors a checkpoint stores (None: the module itself): only the adapters of a LoRA
    model; under FSDP the gathered full weights (a collective: every rank calls it)."""
    if fsdp:
        from rizzearch.training.fsdp import full_model_state

        sd = full_model_state(model)
        keep = (lambda k: ".lora_" in k) if lora_layers(model) else (lambda k: k not in aliases)
        return {k: v.detach().cpu().contiguous() for k, v in sd.items() if keep(k)}
    if lora_layers(model):
        return {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    return None


INIT_KINDS = "a rizzearch run or checkpoint folder, an HF model folder (config.json + safetensors), a .gguf file, or a short name (smollm2)"


def load_any(source: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True):
    """Any model source -> ``(model, tokenizer | None, meta)``: a run/checkpoint folder through
    ``load_checkpoint`` (tokenizer checked against the checkpoint), anything else through
    ``models.pretrained.load_pretrained`` (HF folder, .gguf file, short name). ``meta`` has the
    registry name and config, plus ``init_source`` and ``init_format`` for a pretrained source."""
    from rizzearch.errors import ConfigError
    from rizzearch.models.pretrained import SHORT_NAMES, load_pretrained

    p = Path(source)
    if str(source) not in SHORT_NAMES and not p.exists():
        raise ConfigError(f"{source}: not found; a model source is {INIT_KINDS}")
    if p.is_dir() and not (p / "config.json").is_file() and ((p / META_FILE).is_file() or (p / "checkpoints").is_dir() or any(p.glob("step_*"))):
        return load_checkpoint(p, device=device, tokenizer=tokenizer)
    pre = load_pretrained(source, device=device)
    model = pre.model.train()
    if pre.tokenizer is not None:
        if pre.tokenizer.chat_template is None and pre.chat_template is not None:
            pre.tokenizer.chat_template = pre.chat_template
        pre.tokenizer.chat_template_source = f"{source}: chat template"  # errors of a template that raises name it
    return model, pre.tokenizer, model_meta(model, init_source=str(source), init_format=pre.format)
