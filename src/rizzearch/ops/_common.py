"""Helpers shared by the recurrent ops: fp32 compute dtype, autocast guard, backend switching."""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 inputs, fp64 for fp64 inputs (states and stabilisers)."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(fn):
    """Run an op with autocast off: it casts to its fp32 compute dtype itself, and autocast would
    otherwise run its matmuls (and so its states) in bf16."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def backend_switch(module_name: str, what: str):
    """``(resolve, set_backend, use_backend)`` acting on the module-level ``BACKEND`` of ``module_name``.

    ``resolve(None)`` is the current default, ``resolve(name)`` checks a name against the module's
    ``BACKENDS``; ``set_backend(name)`` changes the default; ``use_backend(name)`` changes it inside a
    ``with`` block. ``what`` names the op in error messages (``"mLSTM"``).
    """
    module = sys.modules[module_name]

    def resolve(backend: str | None) -> str:
        b = module.BACKEND if backend is None else backend
        if b not in module.BACKENDS:
            raise ValueError(f"unknown {what} backend {b!r}; choose from {module.BACKENDS}")
        return b

    def set_backend(name: str) -> None:
        module.BACKEND = resolve(name)

    @contextlib.contextmanager
    def use_backend(name: str):
        old = module.BACKEND
        module.BACKEND = resolve(name)
        try:
            yield
        finally:
            module.BACKEND = old

    set_backend.__doc__ = f'Set the default {what} backend (one of {module.BACKENDS}).'
    use_backend.__doc__ = f'Temporarily switch the default {what} backend (``with use_backend("reference"): ...``).'
    return resolve, set_backend, use_backend


def default_backend(env_var: str, resolve, self_check) -> str:
    """The import-time default: ``$env_var`` if set (checked by ``resolve``), else ``"fused"`` when
    ``self_check()`` passes (it warns when it does not), else ``"reference"``."""
    env = os.environ.get(env_var)
    if env:
        return resolve(env)
    return "fused" if self_check() else "reference"
