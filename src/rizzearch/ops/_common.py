"""Helpers shared by the recurrent ops: fp32 compute dtype, autocast guard, backend switching, and the
build of their small native C kernels."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from rizzearch.runs import cache_dir


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 inputs, fp64 for fp64 inputs (states and stabilisers)."""
    return torch.float64 if dtype == torch.float64 else torch.float32  # 7x cheaper than promote_types (decode steps)


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


def c_compiler() -> str | None:
    """The system C compiler: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH; None if there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build_c_library(source: str, stem: str, cc: str, flags: list[str], *, tag_extra: str = "") -> Path:
    """Compile ``source`` (no headers beyond libc and libm) into a shared library; return its path.

    Built once per user and cached in ``cache_dir("kernels")`` as ``{stem}_{hash}.so``, the hash
    covering the source, the compiler, ``flags`` and ``tag_extra`` (e.g. the CPU model for
    ``-march=native``). Compiled in a temporary folder and renamed into place, so concurrent builders
    never see a partial file. Raises ``OSError`` or ``subprocess.SubprocessError`` when it cannot build.
    """
    tag = hashlib.sha256("\0".join([source, cc, *flags, tag_extra]).encode()).hexdigest()[:16]
    root = cache_dir("kernels")
    lib = root / f"{stem}_{tag}.so"
    if not lib.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            src, out = Path(tmp) / f"{stem}.c", Path(tmp) / f"{stem}.so"
            src.write_text(source)
            cmd = [cc, *flags, "-fPIC", "-shared", str(src), "-o", str(out), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(out, lib)  # atomic
    return lib
