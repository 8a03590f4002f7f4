"""Training memory: activation checkpointing per block, mixed-precision contexts, peak-memory readings.

``checkpoint_blocks(model)`` makes every block of ``model.blocks`` recompute its activations in the
backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
``torch.utils.checkpoint`` in its non-reentrant form). It is correct for the recurrent models
because a block's whole input (the residual stream *and* the recurrent state / KV cache handed
to it) is the checkpoint's input, and the RNG state (dropout) is restored before the recompute,
so the recomputed activations, and therefore the gradients, are the ones of the first pass.
Parameter names and the state dict do not change (the block's ``forward`` is wrapped in place).

``autocast(precision, device)`` is the forward context of ``--train.precision``: fp32 (nothing),
bf16 or fp16 autocast. Models keep their recurrent states and stabilisers in fp32 under it (the
ops cast explicitly), and the preference objectives compute log-odds from fp32 log-probs.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rizzearch.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ConfigError(f"checkpointing 'blocks': {type(model).__name__} has no 'blocks' ModuleList to checkpoint")
    return blocks


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute each block's activations in backward (``enabled``), or undo it; returns the model.

    Only while gradients are recorded: inference and decoding run the plain forward.
    """
    for block in _blocks(model):
        wrapped = "forward" in vars(block)
        if enabled and not wrapped:
            plain = block.forward  # the bound class method

            def forward(*args, _plain=plain, **kwargs):
                if not torch.is_grad_enabled():
                    return _plain(*args, **kwargs)
                return checkpoint(_plain, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

            block.forward = forward
        elif not enabled and wrapped:
            del block.forward
    return model


def is_checkpointed(model: nn.Module) -> bool:
    return any("forward" in vars(b) for b in getattr(model, "blocks", []))


def check_precision(precision: str, device: torch.device | str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: expected one of {list(PRECISIONS)}, got {precision!r}")


def autocast(precision: str, device: torch.device | str):
    """The forward context for ``precision`` on ``device`` (fp32: no autocast)."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device | str):
    """A ``torch.amp.GradScaler`` for fp16 (skips steps whose gradients are not finite), else None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory so far: allocated CUDA memory since the last reset on a GPU, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
