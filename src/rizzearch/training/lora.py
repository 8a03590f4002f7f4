"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), saved in PEFT's format.

A frozen linear map ``W`` gets a trainable low-rank update (paper eq. 3):

    h = W x + (alpha / r) B A dropout(x),    A: (r, in) kaiming-uniform(a=sqrt 5), B: (out, r) zeros

so the adapted model starts equal to the base model. ``apply_lora`` wraps the target layers of any
registered model in ``LoraLinear`` (a plain ``nn.Module``: no peft or transformers at run time),
freezes every other parameter, and returns the model; ``merge_lora`` folds ``(alpha/r) B A`` into
``W`` and puts the plain layers back; ``save_adapter`` / ``load_adapter`` read and write PEFT's
own format (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_{A,B}.weight``).

Three layer shapes, one idea:

- a plain ``nn.Linear``: one ``A`` and one ``B``, exactly PEFT's layer;
- a *fused* linear whose output rows are several projections in one matrix (llama's ``qkv`` =
  q | k | v, ``gate_up`` = gate | up): one adapter per projection (segment), so the adapter equals
  PEFT's adapters on transformers' separate ``q_proj``/``k_proj``/``v_proj`` layers, rank ``r`` each;
- a block-diagonal (headwise) linear (xLSTM's q/k/v): a block-diagonal adapter, rank ``r`` per block,
  so merging keeps the block structure and stays exact.

Module names in the saved file: for the llama family they are transformers' ``LlamaForCausalLM``
names, found by running a probe state dict through ``models.hf_llama.state_dict_to_hf`` (the same
mapping as ``to_hf_llama``), so ``peft.PeftModel.from_pretrained`` loads them; for the other
families they are our own module paths.

Targets are module-name patterns: a pattern matches a module whose dotted name equals it, ends
with ``.<pattern>``, or matches it as a glob (``fnmatch``; ``*`` also spans dots).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.runs import atomic_write_text
from rizzearch.training.lora_layer import LoraLinear, _adaptable, _block_size, _features, adaptable_names, matches

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Per model family: the default LoRA targets (attention and MLP / channel-mix projections).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt": ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"),
    "llama": ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down"),
    "xlstm": ("proj_up", "q_proj", "k_proj", "v_proj", "proj_down", "ffn_up", "ffn_down"),
    "xlstm_large": ("qkvo", "out_proj", "ffn_up", "ffn_down"),
    "rwkv": ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.receptance", "ffn.value"),
}

# Per model family: (module, function) turning our state dict into transformers' names and layout.
_HF_LAYOUT: dict[str, tuple[str, str]] = {"llama": ("rizzearch.models.hf_llama", "state_dict_to_hf")}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    family = getattr(model, "registry_name", None)
    if family not in DEFAULT_TARGETS:
        raise ConfigError(
            f"LoRA: no default targets for model {type(model).__name__}; pass targets (module names: {', '.join(adaptable_names(model))})"
        )
    return DEFAULT_TARGETS[family]


def _check_args(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"lora.r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise ConfigError(f"lora.alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout!r}")


def _tied(model: nn.Module) -> set[str]:
    """Names of modules whose weight is shared with another module (tied embeddings)."""
    seen: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and name:
            seen.setdefault(id(w), []).append(name)
    return {n for names in seen.values() if len(names) > 1 for n in names}


def resolve_targets(model: nn.Module, targets, r: int) -> list[str]:
    """The module names to wrap: every match of every pattern, checked (see ``apply_lora``)."""
    explicit = targets is not None
    patterns = [targets] if isinstance(targets, str) else list(targets if explicit else default_targets(model))
    if not patterns:
        raise ConfigError("lora.targets is empty; name at least one module pattern")
    modules = dict(model.named_modules())
    tied = _tied(model)
    chosen: list[str] = []
    for pat in patterns:
        hits = [n for n in modules if n and matches(n, pat)]
        if not hits:
            raise ConfigError(
                f"LoRA target {pat!r} matches no module of {type(model).__name__}; adaptable modules: {', '.join(adaptable_names(model))}"
            )
        for n in hits:
            m = modules[n]
            if not _adaptable(m):
                if isinstance(m, LoraLinear):
                    raise ConfigError(f"LoRA target {pat!r}: module {n!r} already has an adapter (apply_lora twice?)")
                if any(matches(c, pat) for c, cm in m.named_modules() if c and _adaptable(cm)):
                    continue  # a container whose own children match too: they are wrapped, not it
                raise ConfigError(f"LoRA target {pat!r} matches {n!r}, a {type(m).__name__}; LoRA wraps linear layers only")
            if n in tied:
                raise ConfigError(f"LoRA target {pat!r}: {n!r} shares its weight with the embedding (tied); its adapter could not be merged")
            block = _block_size(m)
            if not explicit and block is not None and r > block:
                continue  # default targets skip block-diagonal layers with blocks narrower than r
            if n not in chosen:
                chosen.append(n)
    if not chosen:
        raise ConfigError(f"LoRA: no layer of the default targets {patterns} is wide enough for rank {r}")
    return chosen


def _check_rank(name: str, base: nn.Module, r: int, segments: list[int]) -> None:
    block = _block_size(base)
    if block is not None:
        if r > block:
            raise ConfigError(f"LoRA rank {r} is larger than the {block}x{block} blocks of block-diagonal layer {name!r}")
        return
    fin, _ = _features(base)
    if r > min(fin, *segments):
        raise ConfigError(
            f"LoRA rank {r} is larger than layer {name!r} ({fin} inputs, outputs {segments}); use r <= {min(fin, *segments)}"
        )


# ----------------------------------------------------------------------------------------------
# Public API


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA layer of the model by its (base) module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0, targets=None) -> nn.Module:
    """Wrap the ``targets`` layers of ``model`` in LoRA adapters (in place) and freeze everything else.

    targets: module-name patterns (see the module docstring); None = the family's defaults
    (``DEFAULT_TARGETS``). A pattern matching nothing, a non-linear module, a tied layer, or a
    rank larger than a layer is a ``ConfigError`` naming it. Returns the model; only the adapter
    parameters require grad afterwards.
    """
    _check_args(r, alpha, dropout)
    names = resolve_targets(model, targets, r)
    segs = _segments(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        base = model.get_submodule(n)
        seg = [s for _, s in segs.get(n, [])] or None
        _check_rank(n, base, r, seg or [_features(base)[1]])
        _set_module(model, n, LoraLinear(base, r, alpha, dropout, seg).train(model.training))  # keep the model's mode
    model.lora_config = {"r": r, "alpha": float(alpha), "dropout": float(dropout), "targets": names}
    if hasattr(model, "clear_decode_cache"):
        model.clear_decode_cache()
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer gets)."""
    return [p for m in lora_layers(model).values() for p in (*m.lora_A, *m.lora_B)]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors under our own names (``<module>.lora_A.<segment>``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every adapter off inside the block (DPO's reference model, no weight copy)."""
    layers = list(lora_layers(model).values())
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += (alpha/r) B A``) and unwrap the layers (in place).

    Parameters keep their ``requires_grad`` off; the merged model is a plain model of its family.
    """
    for name, m in lora_layers(model).items():
        w = m.base_layer.weight
        w.copy_((w.float() + m.delta_weight()).to(w.dtype))
        _set_module(model, name, m.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    if hasattr(model, "clear_decode_cache"):
        model.clear_decode_cache()
    return model




@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (``--lora.*`` on ``rizz train`` and ``rizz align``).

    Args:
        r: adapter rank (0: no LoRA, train every weight).
        alpha: scale numerator; the update is (alpha / r) B A.
        dropout: dropout on the adapter's input (training only).
        targets: module-name patterns of the layers to adapt (None: the model family's defaults,
            attention and MLP / channel-mix projections).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.r < 0:
            raise ConfigError(f"lora.r must be >= 0 (0 disables LoRA), got {self.r}")
        if self.r:
            _check_args(self.r, self.alpha, self.dropout)

    @property
    def enabled(self) -> bool:
        return self.r > 0


def setup_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """``apply_lora`` with a ``LoraConfig`` (nothing when ``config.r == 0``)."""
    if not config.enabled:
        return model
    return apply_lora(model, config.r, config.alpha, config.dropout, config.targets)

# ----------------------------------------------------------------------------------------------
# Names in the saved file


def _hf_layout(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Our module name -> [(transformers module name, output rows)] in row order, for the families
    with a transformers layout; {} for the others (their adapters keep our names).

    Found by running a probe state dict (each row holds its tensor's index and its row number)
    through the family's own export (``state_dict_to_hf``), so names, splits and fusions are the
    export's, not a second copy of them.
    """
    family = getattr(model, "registry_name", None)
    if family not in _HF_LAYOUT:
        return {}
    module, fn = _HF_LAYOUT[family]
    to_hf = getattr(importlib.import_module(module), fn)
    keys, probe = [], {}
    for k, t in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        k = k.replace(".base_layer.", ".")
        rows = t.shape[0] if t.dim() else 1
        probe[k] = (len(keys) * 2**24 + torch.arange(rows, dtype=torch.float64)).reshape(rows, *[1] * (t.dim() - 1))
        keys.append(k)
    layout: dict[str, list[tuple[int, str, int]]] = {}
    for hk, t in to_hf(probe, model.config).items():
        if not hk.endswith(".weight") or t.dim() < 2:
            continue
        v = t.reshape(t.shape[0], -1)[:, 0]
        src = int(v[0].item()) // 2**24
        rows = (v - src * 2**24).long()
        layout.setdefault(keys[src][: -len(".weight")], []).append((int(rows[0]), hk[: -len(".weight")], len(rows)))
    return {k: [(h, n) for _, h, n in sorted(v)] for k, v in layout.items()}


def _segments(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """The fused layers (several transformers projections in one of ours): name -> [(hf name, rows)]."""
    return {k: v for k, v in _hf_layout(model).items() if len(v) > 1}


def _file_names(model: nn.Module) -> dict[str, list[str]]:
    """Our LoRA layer name -> the module name of each of its segments in the saved file."""
    layout = _hf_layout(model)
    return {n: [h for h, _ in layout[n]] if n in layout else [n] for n in lora_layers(model)}


# ----------------------------------------------------------------------------------------------
# Saving and loading (PEFT's format)


def _peft_config(model: nn.Module, targets: list[str], base_model: str | None) -> dict:
    cfg = model.lora_config
    alpha = cfg["alpha"]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg["r"],
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": cfg["dropout"],
        "target_modules": sorted(set(targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def save_adapter(model: nn.Module, folder: str | Path, base_model: str | None = None) -> Path:
    """Write the adapters as a PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``base_model`` is recorded as ``base_model_name_or_path``. Each file is written atomically.
    """
    from safetensors.torch import save_file

    if not lora_layers(model):
        raise ConfigError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, targets = {}, []
    layers = lora_layers(model)
    for name, hf_names in _file_names(model).items():
        m = layers[name]
        for i, hn in enumerate(hf_names):
            tensors[f"{PEFT_PREFIX}{hn}.lora_A.weight"] = m.lora_A[i].detach().contiguous()
            tensors[f"{PEFT_PREFIX}{hn}.lora_B.weight"] = m.lora_B[i].detach().contiguous()
            targets.append(hn)
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS)
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(_peft_config(model, targets, base_model), indent=2) + "\n")
    return folder


def _read_adapter(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors.torch import load_file

    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (not a PEFT LoRA adapter folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: not a LoRA adapter (peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r})")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "use_rslora": bool(cfg.get("use_rslora")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "bias": cfg.get("bias", "none") != "none",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{cfg_path}: adapter options {bad} are not supported (plain LoRA only)")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or isinstance(cfg.get(field), bool):
            raise CheckpointError(f"{cfg_path}: field {field!r} must be a number, got {cfg.get(field)!r}")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{w_path}: not a readable safetensors file ({e})") from None
    return cfg, tensors


def _group(tensors: dict[str, Tensor], where: Path) -> dict[str, dict[str, Tensor]]:
    """``base_model.model.<module>.lora_{A,B}.weight`` -> {module: {"A": .., "B": ..}}."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise CheckpointError(f"{where}: key {key!r} is not a PEFT LoRA key ({PEFT_PREFIX}<module>.lora_A.weight)")
        out.setdefault(m.group(1), {})[m.group(2)] = t
    for name, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{where}: module {name!r} has lora_{next(iter(ab))} but not its pair")
    return out


def _plan(model: nn.Module, modules: dict, where: Path) -> dict[str, int]:
    """For every adapted module in the file, (our layer name, segment index); unknown names are errors."""
    layout = _hf_layout(model)
    ours = {n.replace(".base_layer", "") for n, m in model.named_modules() if _adaptable(m) or isinstance(m, LoraLinear)}
    inverse = {h: (n, i) for n, segs in layout.items() for i, (h, _) in enumerate(segs)}
    inverse.update({n: (n, 0) for n in ours if n not in layout})
    plan = {}
    for hn in modules:
        if hn not in inverse:
            raise CheckpointError(
                f"{where}: adapter module {hn!r} is not a layer of this {type(model).__name__} model (adapter for another base model?)"
            )
        plan[hn] = inverse[hn]
    return plan


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load a PEFT LoRA folder into ``model`` (in place): wraps the adapted layers first when the model
    has no adapters yet (r, alpha, dropout from ``adapter_config.json``). A key naming no layer of
    this model or a tensor of the wrong shape is a ``CheckpointError`` naming the key and both shapes.
    A segment of a fused layer the file does not adapt (e.g. k of q|k|v) gets a zero adapter.
    """
    folder = Path(folder)
    cfg, tensors = _read_adapter(folder)
    where = folder / ADAPTER_WEIGHTS
    modules = _group(tensors, where)
    plan = _plan(model, modules, where)
    targets = sorted({n for n, _ in plan.values()})
    if not lora_layers(model):
        apply_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout") or 0.0), targets=targets)
    layers = lora_layers(model)
    missing = sorted(set(targets) - set(layers))
    if missing:
        raise CheckpointError(f"{where}: adapts {missing[:5]}, which have no adapter in this model (targets {sorted(layers)[:5]} ...)")
    for m in layers.values():
        for p in (*m.lora_A, *m.lora_B):
            p.zero_()
    for hn, (name, i) in plan.items():
        m = layers[name]
        for ab, params in (("A", m.lora_A), ("B", m.lora_B)):
            t, p = modules[hn][ab], params[i]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{where}: {PEFT_PREFIX}{hn}.lora_{ab}.weight has shape {tuple(t.shape)}, this model expects {tuple(p.shape)} "
                    "(adapter for another base model or rank?)"
                )
            p.copy_(t)
    if hasattr(model, "clear_decode_cache"):
        model.clear_decode_cache()
    return model


def save_merged(model: nn.Module, tokenizer, folder: str | Path, chat_template: str | None = None) -> Path:
    """Export a LoRA-adapted llama-family model as a plain HF folder (``save_pretrained``) with the
    adapters merged into a copy of the weights; ``model`` itself keeps its adapters."""
    import copy

    from rizzearch.models.pretrained import save_pretrained

    merged = merge_lora(copy.deepcopy(model))
    return save_pretrained(merged, tokenizer, folder, chat_template=chat_template)
