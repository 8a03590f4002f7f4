"""objectives/ is pure: its modules import only the standard library, torch, rizzearch.errors and
each other, and none of them calls a model (losses take logits or log-probs)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import rizzearch.objectives

PACKAGE = Path(rizzearch.objectives.__file__).parent
ALLOWED_RIZZ = ("rizzearch.objectives", "rizzearch.errors")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_objectives_import_only_torch_stdlib_and_each_other():
    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "rizzearch":
                if not name.startswith(ALLOWED_RIZZ):
                    bad.append(f"{path.name}: {name}")
            elif top not in ("torch", "__future__") and top not in sys.stdlib_module_names:
                bad.append(f"{path.name}: {name}")
    assert not bad, f"objectives/ must stay pure, found: {bad}"


def test_no_objective_takes_a_model():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(a.arg == "model" for a in node.args.args + node.args.kwonlyargs):
                    offenders.append(f"{path.name}:{node.lineno} {node.name}")
    assert not offenders, f"objectives that call a model belong in rizzearch.training: {offenders}"


def test_design_public_names_still_import():
    from rizzearch.objectives.goldfish import goldfish_mask
    from rizzearch.objectives.orpo import orpo_loss

    assert callable(goldfish_mask) and callable(orpo_loss)
