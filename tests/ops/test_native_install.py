"""The native kernels ship as package data (``rizzearch/csrc/*.c``): a fresh, non-editable install
of the package builds and uses them, with nothing from the source tree on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import os, sys
from pathlib import Path
import torch
import rizzearch
from rizzearch.ops import backends
from rizzearch.ops import mlstm as M
from rizzearch.models import RWKV, RWKVConfig
from rizzearch.models import rwkv_decode as D

target = Path(sys.argv[1]).resolve()
assert Path(rizzearch.__file__).resolve().is_relative_to(target), rizzearch.__file__
csrc = Path(rizzearch.__file__).parent / "csrc"
assert sorted(p.name for p in csrc.glob("*.c")) == ["llama_decode.c", "mlstm_step.c", "rwkv_decode.c", "wlinear.c"], list(csrc.iterdir())
assert sorted(p.name for p in csrc.glob("*.h")) == ["wl_dots.h"], list(csrc.iterdir())  # the shared header ships too
assert all(backends.available(op) for op in ("mlstm_step", "xlstm_fused", "rwkv_decode", "wlinear", "llama_decode"))

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
i, f = (torch.randn(2, 3, generator=g) for _ in range(2))
with torch.no_grad():
    h_fast, _ = M.mlstm_step(q, k, v, i, f, backend="fast")
h_ref, _ = M.mlstm_step(q, k, v, i, f, backend="reference")
assert M._native_step_lib() is not None
assert torch.allclose(h_fast, h_ref, atol=1e-5), (h_fast - h_ref).abs().max()

torch.manual_seed(0)
m = RWKV(RWKVConfig(vocab_size=50, n_layer=2, d_model=32)).eval()
with torch.no_grad():
    for p in m.parameters():
        p.add_(0.05 * torch.randn_like(p))
    tok, state = torch.tensor([3, 7]), m.init_state(2)
    fast, _ = m.step(tok, state)
    with backends.use_backend("rwkv_decode", "reference"):
        ref, _ = m.step(tok, state)
assert D.cached(m) is not None and D.cached(m).ok
assert torch.allclose(fast, ref, atol=1e-5), (fast - ref).abs().max()
from rizzearch.models import build_model, llama_decode as LD
lm = build_model("llama", vocab_size=50, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64).eval()
with torch.no_grad():
    _, st = lm(torch.tensor([[1, 2, 3]]))
    fast, _ = lm(torch.tensor([[4]]), st)
    with backends.use_backend("llama_decode", "reference"), backends.use_backend("wlinear", "reference"):
        _, st = lm(torch.tensor([[1, 2, 3]]))
        ref, _ = lm(torch.tensor([[4]]), st)
assert LD._TABLES.get(lm) is not None and LD._TABLES[lm].ok
assert torch.allclose(fast, ref, atol=1e-5), (fast - ref).abs().max()
built = sorted(p.name.split("_")[0] for p in (Path(os.environ["RIZZ_CACHE"]) / "kernels").glob("*.so"))
assert built == ["llama", "mlstm", "rwkv", "wlinear"], built
print("ok")
"""


def test_fresh_install_builds_and_uses_the_native_kernels(tmp_path):
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.skip("no C compiler: the kernels fall back to the reference forms (tested elsewhere)")
    project = tmp_path / "project"  # a clean copy: the build leaves nothing in the source tree
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    subprocess.run([*pip, "--target", str(target), str(project)], check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CC") and not k.endswith("_BACKEND")}
    env.update(PYTHONPATH=str(target), RIZZ_CACHE=str(tmp_path / "cache"))  # empty cache: a fresh build
    out = subprocess.run([sys.executable, "-c", CHECK, str(target)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
