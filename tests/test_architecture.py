"""The layering of docs/ARCHITECTURE.md is a contract, checked by import-linter (.importlinter).

A wrong-way import (an op importing training code, the audit importing the system it judges) must
fail `make test` with a message that names it; the second test proves the check can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(CONFIG), "--no-cache"],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept():
    out = lint_imports(ROOT / "src")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout, out.stdout


def test_a_wrong_way_import_breaks_the_contract(tmp_path):
    pkg = tmp_path / "rizzearch"
    shutil.copytree(ROOT / "src" / "rizzearch", pkg, ignore=shutil.ignore_patterns("corpora", "__pycache__"))
    (pkg / "corpora").mkdir()  # the code only: the bundled data is not needed to check imports
    shutil.copy(ROOT / "src" / "rizzearch" / "corpora" / "__init__.py", pkg / "corpora" / "__init__.py")
    op = pkg / "ops" / "attention.py"
    op.write_text(op.read_text() + "\nimport rizzearch.training.loop  # deliberately wrong: an op importing the training loop\n")
    judge = pkg / "audit" / "metrics.py"
    judge.write_text(judge.read_text() + "\nimport rizzearch.rag.systems  # deliberately wrong: the judge importing the system\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "rizzearch.ops.attention -> rizzearch.training.loop" in out.stdout, out.stdout
    assert "rizzearch.audit.metrics -> rizzearch.rag.systems" in out.stdout, out.stdout
