"""The one backend rule: names, defaults from RIZZ_<OP>_BACKEND read once, set/use/restore,
per-call overrides, and capability detection of the native kernels (fallback, never an error)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rizzearch.errors import ConfigError
from rizzearch.ops import backends
from rizzearch.testing import assert_close


def test_every_op_has_one_env_var_and_two_names():
    assert backends.NAMES == ("reference", "fast")
    assert {op: backends.env_var(op) for op in backends.OPS} == {
        "mlstm": "RIZZ_MLSTM_BACKEND",
        "mlstm_step": "RIZZ_MLSTM_STEP_BACKEND",
        "xlstm_fused": "RIZZ_XLSTM_FUSED_BACKEND",
        "slstm": "RIZZ_SLSTM_BACKEND",
        "wkv": "RIZZ_WKV_BACKEND",
        "llama_decode": "RIZZ_LLAMA_DECODE_BACKEND",
        "rwkv_decode": "RIZZ_RWKV_DECODE_BACKEND",
        "wlinear": "RIZZ_WLINEAR_BACKEND",
    }
    status = backends.status()
    assert set(status) == set(backends.OPS)
    assert all(s["backend"] in backends.NAMES and isinstance(s["fast_available"], bool) for s in status.values())


def test_unknown_op_and_name_are_named():
    with pytest.raises(ConfigError, match=r"unknown op 'attention'; expected one of \['mlstm'"):
        backends.set_backend("attention", "fast")
    with pytest.raises(ConfigError, match=r"unknown WKV backend 'chunked'; expected one of \['reference', 'fast'\]"):
        backends.set_backend("wkv", "chunked")
    with pytest.raises(ConfigError, match="unknown RWKV decode backend 'eager'"):
        backends.resolve("rwkv_decode", "eager")


def test_use_backend_restores_even_after_an_error():
    old = backends.get_backend("wkv")
    with pytest.raises(RuntimeError, match="boom"):
        with backends.use_backend("wkv", "reference"):
            assert backends.resolve("wkv") == "reference"
            assert backends.resolve("wkv", "fast") == "fast"  # a per-call choice wins over the default
            raise RuntimeError("boom")
    assert backends.get_backend("wkv") == old


def test_env_is_read_once_and_every_op_honours_it():
    code = (
        "import os; from rizzearch.ops import backends\n"
        "first = {op: backends.get_backend(op) for op in backends.OPS}\n"
        "os.environ['RIZZ_WKV_BACKEND'] = 'fast'\n"  # too late: already read
        "print(first == {op: 'reference' for op in backends.OPS}, backends.get_backend('wkv'))"
    )
    env = {**os.environ, **{backends.env_var(op): "reference" for op in backends.OPS}}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "reference"]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_BACKEND")}
    out = subprocess.run([sys.executable, "-c", "from rizzearch.ops import backends; print(backends.get_backend('mlstm_step'))"],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "fast"  # unset: fast


def test_no_self_check_runs_at_import():
    """Importing the ops runs no forward/backward: autograd is never entered."""
    code = (
        "import torch\n"
        "calls = []\n"
        "orig = torch.autograd.grad\n"
        "torch.autograd.grad = lambda *a, **k: calls.append(1) or orig(*a, **k)\n"
        "import rizzearch.ops.mlstm, rizzearch.ops.slstm, rizzearch.ops.wkv, rizzearch.models\n"
        "print(len(calls))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_fast_mlstm_step_without_its_kernel_falls_back_and_agrees(monkeypatch):
    """No kernel (no compiler, failed build): ``available`` says so and ``fast`` still works (torch step)."""
    from rizzearch.ops import mlstm as M

    monkeypatch.setattr(M.native, "_lib", False)  # as after a failed build (the one loader of mlstm_step.c)
    assert not backends.available("mlstm_step")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    i, f = (torch.randn(2, 3, generator=g) for _ in range(2))
    with torch.no_grad():
        fast, _ = M.mlstm_step(q, k, v, i, f, backend="fast")
        ref, _ = M.mlstm_step(q, k, v, i, f, backend="reference")
    assert_close(fast, ref, name="torch fast step vs reference")


def test_no_compiler_means_no_native_kernel(monkeypatch, tmp_path):
    from rizzearch.ops import _common
    from rizzearch.ops import mlstm as M

    monkeypatch.setattr(_common, "c_compiler", lambda: None)
    monkeypatch.setattr(M.native, "_lib", None)
    assert _common.load_c_library("mlstm_step.c", [["-O3"]]) is None
    assert not backends.available("mlstm_step")  # silently: a missing compiler is not an error
