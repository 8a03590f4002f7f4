"""One rule for choosing between an op's forms: ``reference`` (the readable spec) or ``fast``.

Every op with a fast path is named in ``OPS``; the table of ops, what each form is and the
environment variables is ``docs/backends.md``. For an op ``x``:

- the default is ``$RIZZ_X_BACKEND`` (``reference`` or ``fast``; unset = ``fast``), read once, the
  first time the op asks for it;
- ``set_backend("x", name)`` changes the default, ``use_backend("x", name)`` changes it inside a
  ``with`` block, and the op's functions take ``backend=`` for one call (what the tests use);
- ``fast`` is the fastest form that works here. A fast form built from a native kernel (C, compiled
  with the system compiler on first use) falls back to the reference when the kernel cannot be
  built or loaded (no C compiler, no writable cache); ``available("x")`` says whether it can.
  Whether the fast form equals the reference is checked by the tests, not at import.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator

from rizzearch.errors import ConfigError

NAMES = ("reference", "fast")

# op -> (name in messages, the module that owns its forms, whether the fast form is a native kernel)
OPS: dict[str, tuple[str, str, bool]] = {
    "mlstm": ("mLSTM", "rizzearch.ops.mlstm", False),
    "mlstm_step": ("mLSTM step", "rizzearch.ops.mlstm", True),
    "xlstm_fused": ("xLSTM-7B fused layer", "rizzearch.ops.mlstm.native", True),
    "slstm": ("sLSTM", "rizzearch.ops.slstm", False),
    "wkv": ("WKV", "rizzearch.ops.wkv", False),
    "llama_decode": ("Llama decode", "rizzearch.models.llama_decode", True),
    "rwkv_decode": ("RWKV decode", "rizzearch.models.rwkv_decode", True),
    "wlinear": ("weight-only linear", "rizzearch.ops.wlinear", True),
}

_default: dict[str, str] = {}  # op -> current default, filled from the environment on first use
_probes: dict[str, Callable[[], bool]] = {}  # op -> "can the fast form run here?" (native kernels only)


def env_var(op: str) -> str:
    """The environment variable that sets ``op``'s default: ``RIZZ_<OP>_BACKEND``."""
    return f"RIZZ_{_check_op(op).upper()}_BACKEND"


def _check_op(op: str) -> str:
    if op not in OPS:
        raise ConfigError(f"unknown op {op!r}; expected one of {list(OPS)}")
    return op


def _check_name(op: str, name, where: str = "") -> str:
    if name not in NAMES:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown {OPS[op][0]} backend {name!r}; expected one of {list(NAMES)}")
    return name


def get_backend(op: str) -> str:
    """The current default backend of ``op`` (``$RIZZ_<OP>_BACKEND`` until changed; unset = ``fast``)."""
    name = _default.get(op)
    if name is None:
        var = env_var(op)
        name = _default[op] = _check_name(op, os.environ.get(var) or "fast", var)
    return name


def resolve(op: str, backend: str | None = None) -> str:
    """``backend`` checked against ``NAMES``, or ``op``'s default when it is None (one dict lookup)."""
    if backend is None:
        return _default.get(op) or get_backend(op)
    return _check_name(op, backend)


def set_backend(op: str, name: str) -> None:
    """Make ``name`` (``"reference"`` or ``"fast"``) the default backend of ``op``."""
    _check_op(op)
    _default[op] = _check_name(op, name)


@contextlib.contextmanager
def use_backend(op: str, name: str) -> Iterator[None]:
    """Switch ``op``'s default backend inside a ``with`` block (restored after, even on error)."""
    old = get_backend(op)
    set_backend(op, name)
    try:
        yield
    finally:
        _default[op] = old


def register_probe(op: str, probe: Callable[[], bool]) -> None:
    """Called by the module owning a native fast form: ``probe()`` builds/loads it and says if it works."""
    _probes[_check_op(op)] = probe


def available(op: str) -> bool:
    """Whether ``op``'s fast form can run here: always, unless it is a native kernel that cannot be
    built or loaded. A native op's owner registers its probe on import; asking imports the owner."""
    _, owner, native = OPS[_check_op(op)]
    if not native:
        return True
    if op not in _probes:
        importlib.import_module(owner)  # a lookup by name: ops/ never calls model code directly
    return bool(_probes[op]())


def status() -> dict[str, dict]:
    """``{op: {"backend", "fast_available", "env"}}`` for every op (benchmark headers, bug reports)."""
    return {op: {"backend": get_backend(op), "fast_available": available(op), "env": env_var(op)} for op in OPS}
