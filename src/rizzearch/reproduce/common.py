"""What every study shares: the ``results.json`` schema, the environment record, modes, threads, timing, plots.

Every study (``rizz reproduce <study> --out DIR``) writes ``DIR/results.json``::

    {"study": str,
     "claims": [{"id", "statement", "paper_value", "our_value", "holds": bool}],
     "metrics": {...},
     "environment": {...}}

Reports and checks read these files, never printed text. ``write_results`` validates the schema
before writing (atomically), so a study cannot produce a file the report builder would reject.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

import rizzearch
from rizzearch.errors import ConfigError, DataError
from rizzearch.runs import atomic_write_text

CLAIM_KEYS = ("id", "statement", "paper_value", "our_value", "holds")


@dataclass
class Claim:
    """One checkable statement of a paper and our measurement of it.

    Args:
        id: short stable identifier, e.g. ``"parity_slstm_extrapolates"``.
        statement: the claim in words, as the paper makes it (at our scale).
        paper_value: the paper's own number or wording (str or number).
        our_value: what we measured (str or number).
        holds: whether the claim holds at our scale.
    """

    id: str
    statement: str
    paper_value: Any
    our_value: Any
    holds: bool


def environment() -> dict:
    """Machine and library versions for the record (CPU/GPU, threads, versions)."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "rizzearch": rizzearch.__version__,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _jsonable(x.item())
    return x


def validate_results(data: Any, source: str = "results.json") -> dict:
    """Check the results.json schema; raise DataError naming the first bad field."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: top level must be an object, got {type(data).__name__}")
    for key, typ in (("study", str), ("claims", list), ("metrics", dict), ("environment", dict)):
        if key not in data:
            raise DataError(f"{source}: missing field {key!r}")
        if not isinstance(data[key], typ):
            raise DataError(f"{source}: field {key!r} must be {typ.__name__}, got {type(data[key]).__name__}")
    for i, claim in enumerate(data["claims"]):
        if not isinstance(claim, dict):
            raise DataError(f"{source}: claims[{i}] must be an object")
        missing = [k for k in CLAIM_KEYS if k not in claim]
        if missing:
            raise DataError(f"{source}: claims[{i}] misses field(s) {missing}")
        if not isinstance(claim["holds"], bool):
            raise DataError(f"{source}: claims[{i}].holds must be true or false, got {claim['holds']!r}")
    return data


def write_results(out_dir: str | Path, study: str, claims: list[Claim | dict], metrics: dict) -> Path:
    """Validate and write ``out_dir/results.json`` atomically; returns its path.

    A study writes it last, after its report and plots: the orchestrator counts a study with a valid
    ``results.json`` as done.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "study": study,
        "claims": [_jsonable(asdict(c)) if isinstance(c, Claim) else _jsonable(c) for c in claims],
        "metrics": _jsonable(metrics),
        "environment": environment(),
    }
    validate_results(data)
    path = out / "results.json"
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def read_results(path: str | Path) -> dict:
    """Load and validate a results.json (DataError naming the file on any problem)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such results file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    return validate_results(data, str(p))


@dataclass
class Budget:
    """Wall-clock budget for a study's stages (quick mode must fit its minutes)."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def study_mode(full: bool, tiny: bool) -> str:
    """``"tiny"``, ``"full"`` or ``"quick"`` (the default) from a study's two flags."""
    if full and tiny:
        raise ConfigError("full and tiny: choose at most one")
    return "tiny" if tiny else "full" if full else "quick"


@contextmanager
def torch_threads(n: int, device: str | None = None) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, restored afterwards (left alone on a non-CPU ``device``).

    The study models are tiny: per-op overhead dominates, and on a shared machine every extra
    spinning thread makes each small op wait (studies measured 4x slower with two threads per
    process on 2 cores); one thread also makes timings independent of the core count.
    """
    old = torch.get_num_threads()
    if device is None or torch.device(device).type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def load_average() -> float | None:
    """The 1-minute load average, recorded beside timings (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Lay out, save and close a study's figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
