"""Helpers shared by the recurrent ops: fp32 compute dtype, autocast guard, and the one build helper
for the native C kernels (sources in ``rizzearch/csrc/``, compiled on first use and cached).
Choosing between an op's forms is ``rizzearch.ops.backends``."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
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


def c_compiler() -> str | None:
    """The system C compiler: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH; None if there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def c_source(name: str) -> str:
    """The text of ``rizzearch/csrc/<name>`` (package data, so it ships in wheels and installs)."""
    return resources.files("rizzearch").joinpath("csrc", name).read_text(encoding="utf-8")


def c_headers() -> dict[str, str]:
    """``{name: text}`` of the shared headers ``rizzearch/csrc/*.h`` (package data, like the sources)."""
    folder = resources.files("rizzearch").joinpath("csrc")
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".h")}


def build_c_library(name: str, cc: str, flags: list[str], *, tag_extra: str = "") -> Path:
    """Compile ``csrc/<name>`` (with the shared ``csrc/*.h``; no other headers beyond libc, libm and OpenMP)
    into a shared library; return its path.

    Built once per user and cached in ``cache_dir("kernels")`` as ``{stem}_{hash}.so``, the hash
    covering the source and header texts, the compiler, ``flags`` and ``tag_extra`` (e.g. the CPU
    model for ``-march=native``). Compiled in a temporary folder (the headers copied beside the
    source) and renamed into place, so concurrent builders never see a partial file. Raises
    ``OSError`` or ``subprocess.SubprocessError`` when it cannot build.
    """
    source, headers = c_source(name), c_headers()
    stem = Path(name).stem
    texts = [source, *(f"{h}\0{t}" for h, t in headers.items())]
    tag = hashlib.sha256("\0".join([*texts, cc, *flags, tag_extra]).encode()).hexdigest()[:16]
    root = cache_dir("kernels")
    lib = root / f"{stem}_{tag}.so"
    if not lib.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            src, out = Path(tmp) / name, Path(tmp) / f"{stem}.so"
            src.write_text(source)
            for h, text in headers.items():
                (Path(tmp) / h).write_text(text)
            cmd = [cc, *flags, "-fPIC", "-shared", str(src), "-o", str(out), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(out, lib)  # atomic
    return lib


def load_c_library(name: str, flag_sets: list[list[str]], *, tag_extra: str = "") -> tuple[ctypes.CDLL, list[str]] | None:
    """Build (cached) and load ``csrc/<name>`` with the first of ``flag_sets`` the compiler accepts.

    Returns ``(library, flags used)``, or None when there is no C compiler. Raises ``OSError`` or
    ``subprocess.SubprocessError`` when a compiler is there but no flag set builds or loads (the
    caller decides whether that is worth a warning).
    """
    cc = c_compiler()
    if cc is None:
        return None
    for i, flags in enumerate(flag_sets):
        try:
            return ctypes.CDLL(str(build_c_library(name, cc, flags, tag_extra=tag_extra))), flags
        except (OSError, subprocess.SubprocessError):
            if i == len(flag_sets) - 1:
                raise
    raise ValueError("load_c_library: flag_sets is empty")


def _cpu_model() -> str:
    """The CPU's architecture and model name: ``-march=native`` builds are cached per CPU model."""
    cpu = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return cpu


def load_native_kernel(name: str, *, portable: bool = False) -> tuple[ctypes.CDLL, bool] | None:
    """Build (cached, ``-O3 -march=native``, per CPU model) and load ``csrc/<name>``, with OpenMP when
    the compiler has it: ``(library, openmp)``, also as ``library.openmp``. With ``portable`` a plain
    ``-O3`` build is the last resort. None when there is no compiler or no flag set builds (the caller
    takes its reference form)."""
    base = ["-O3", "-march=native", "-fno-math-errno"]
    sets = [[*base, "-fopenmp"], base] + ([["-O3"]] if portable else [])
    try:
        loaded = load_c_library(name, sets, tag_extra=_cpu_model())
    except (OSError, subprocess.SubprocessError):
        return None
    if loaded is None:
        return None
    lib, flags = loaded
    lib.openmp = "-fopenmp" in flags
    return lib, lib.openmp
