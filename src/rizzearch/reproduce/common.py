"""What every study shares: the ``results.json`` schema, modes and sizes, the run context, clocks, writers.

Every study (``rizz reproduce <study> --out DIR``) writes ``DIR/results.json``::

    {"study": str,
     "claims": [{"id", "statement", "paper_value", "our_value", "holds": bool}],
     "metrics": {...},
     "environment": {...}}

Reports and checks read these files, never printed text. ``write_results`` validates the schema
before writing (atomically), so a study cannot produce a file the report builder would reject.

A study is a module with ``run(out_dir, *, full=False, tiny=False, device="cpu", seed=0)`` built
from the same parts: a ``Modes`` table (its sizes and wall-clock budget per mode), a
``StudyRun`` started from it (folder, mode, sizes, device, seed, clock), then data, train,
evaluate and claims steps, and the shared writers (``Markdown`` for report.md, ``figure`` for
plots, ``claims_table`` for claims). Tiers: every study has the ``quick`` tier (models trained from
scratch), and the ORPO, Goldfish and legal-RAG studies have a ``real`` tier (the pretrained
SmolLM2-135M-Instruct, ``real_model``) in a module of its own (``orpo_real``, ...) with its own
``Modes`` table (``tier="real"``); both tiers write the same schema, and every real-tier claim
records its ``model``.
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
from typing import Any, Generic, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

import rizzearch
from rizzearch.errors import ConfigError, DataError
from rizzearch.runs import atomic_write_text

CLAIM_KEYS = ("id", "statement", "paper_value", "our_value", "holds")
MODES = ("tiny", "quick", "full")
TIERS = ("quick", "real")  # quick: models trained from scratch; real: the pretrained SmolLM2-135M-Instruct
REAL_MODEL = "SmolLM2-135M-Instruct (Q4_1, dequantized)"  # the "model" of every real-tier claim
TINY_REAL_MODEL = "random tiny llama with SmolLM2's tokenizer (tiny mode: smoke test, numbers meaningless)"


@dataclass
class Claim:
    """One checkable statement of a paper and our measurement of it.

    Args:
        id: short stable identifier, e.g. ``"parity_slstm_extrapolates"``.
        statement: the claim in words, as the paper makes it (at our scale).
        paper_value: the paper's own number or wording (str or number).
        our_value: what we measured (str or number).
        holds: whether the claim holds at our scale.
        model: the model it was measured on (every real-tier claim names it, e.g. ``REAL_MODEL``).
    """

    id: str
    statement: str
    paper_value: Any
    our_value: Any
    holds: bool
    model: str | None = None


# -- environment and clocks ---------------------------------------------------------------------


def environment() -> dict:
    """Machine and library versions for the record (CPU/GPU, threads, versions); benchmarks print the same."""
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


def load_averages() -> tuple[float, float, float] | None:
    """The 1-, 5- and 15-minute load averages (None where the platform has none)."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def load_average() -> float | None:
    """The 1-minute load average, recorded beside timings (None where the platform has none)."""
    loads = load_averages()
    return None if loads is None else loads[0]


@dataclass
class Budget:
    """Wall-clock budget of a study run, and its clocks: wall and CPU time, load average at the start."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=time.process_time)
    load_start: float | None = field(default_factory=load_average)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def cpu_elapsed(self) -> float:
        return time.process_time() - self.cpu_start


# -- modes, sizes and the run context -----------------------------------------------------------


def study_mode(full: bool, tiny: bool) -> str:
    """``"tiny"``, ``"full"`` or ``"quick"`` (the default) from a study's two flags."""
    if full and tiny:
        raise ConfigError("full and tiny: choose at most one")
    return "tiny" if tiny else "full" if full else "quick"


S = TypeVar("S")


@dataclass(frozen=True)
class Modes(Generic[S]):
    """One tier of a study: its sizes (a frozen dataclass of the study's own) and budget per mode.

    Args:
        tiny: smoke-test sizes (seconds; the numbers mean nothing).
        quick: the default sizes (``make demo``), each study within its minutes on 2 CPU cores.
        full: larger models and longer runs.
        budget_s: wall-clock budget in seconds per mode (``{"tiny": .., "quick": .., "full": ..}``).
        tier: the tier this table belongs to: ``"quick"`` (models trained from scratch) or ``"real"``
            (the pretrained SmolLM2-135M-Instruct; ``real_model`` loads it).
    """

    tiny: S
    quick: S
    full: S
    budget_s: Mapping[str, float]
    tier: str = "quick"

    def __post_init__(self) -> None:
        missing = [m for m in MODES if m not in self.budget_s]
        if missing:
            raise ConfigError(f"budget_s: no budget for mode(s) {missing}")
        if self.tier not in TIERS:
            raise ConfigError(f"tier: unknown tier {self.tier!r}; choose one of {', '.join(TIERS)}")

    def size(self, mode: str) -> S:
        if mode not in MODES:
            raise ConfigError(f"mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        return getattr(self, mode)


@dataclass
class StudyRun(Generic[S]):
    """One run of a study, what every step receives: folder, tier, mode, sizes, device, seed, clock."""

    study: str
    out: Path
    tier: str
    mode: str
    size: S
    device: str
    seed: int
    budget: Budget

    @classmethod
    def start(cls, study: str, out_dir: str | Path, modes: Modes[S], *, full: bool, tiny: bool, device: str, seed: int) -> "StudyRun[S]":
        """Choose the mode from the flags, create ``out_dir`` and start the clock."""
        mode = study_mode(full, tiny)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return cls(study, out, modes.tier, mode, modes.size(mode), device, seed, Budget(modes.budget_s[mode]))

    def finish(self, claims: list[Claim | dict], metrics: dict) -> dict:
        """Write ``results.json`` (last: it marks the study done) and return it as read back."""
        return read_results(write_results(self.out, self.study, claims, metrics))


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


def real_model(run: "StudyRun", dtype: torch.dtype | None = None):
    """The real tier's model: SmolLM2-135M-Instruct (``load_pretrained("smollm2")``) on ``run.device``.

    In tiny mode (the default test suite) a random 2-layer llama with SmolLM2's own tokenizer and
    chat template stands in, so every code path of a real-tier study runs in seconds. Returns
    ``(pretrained, model_name)``; ``model_name`` is what each claim records as its ``model``.
    """
    from rizzearch.models.llama import Llama, LlamaConfig
    from rizzearch.models.pretrained import Pretrained, load_pretrained

    if run.mode != "tiny":
        return load_pretrained("smollm2", dtype=dtype, device=run.device), REAL_MODEL
    from rizzearch.data.gguf import tokenizer_from_gguf_fields
    from rizzearch.models.gguf import field_values, open_gguf
    from rizzearch.models.pretrained import bundled_path

    torch.manual_seed(run.seed)
    path = bundled_path("smollm2")
    fields = field_values(open_gguf(path))
    tok, template = tokenizer_from_gguf_fields(fields, where=str(path)), fields.get("tokenizer.chat_template")
    cfg = LlamaConfig(vocab_size=49152, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64)
    model = Llama(cfg).to(device=run.device, dtype=dtype or torch.float32).eval()
    return Pretrained(model, tok, template, "tiny-random-llama", "random"), TINY_REAL_MODEL


# -- results.json -------------------------------------------------------------------------------


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
        if claim.get("model") is not None and not isinstance(claim["model"], str):
            raise DataError(f"{source}: claims[{i}].model must be a string, got {claim['model']!r}")
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


# -- writers: values, tables, report.md, plots --------------------------------------------------


def fmt_value(v: Any) -> str:
    """A claim or metric value as report text (floats to 4 significant digits, dicts as ``k: v``)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    return str(v)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: all left)."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells for {len(header)} columns: {row!r}")
        lines.append("| " + " | ".join(v if isinstance(v, str) else fmt_value(v) for v in row) + " |")
    return "\n".join(lines)


def claims_table(claims: Iterable[Claim | dict]) -> str:
    """The claims table every report shows: the claim, the paper's value, ours, whether it holds."""
    rows = []
    for c in claims:
        c = asdict(c) if isinstance(c, Claim) else c
        rows.append([str(c["statement"]), fmt_value(c["paper_value"]), fmt_value(c["our_value"]), "yes" if c["holds"] else "**no**"])
    return md_table(["claim", "paper", "ours", "holds"], rows)


@dataclass
class Markdown:
    """A report.md built from sections (a heading and blocks of text), never spliced strings."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def section(self, heading: str | None, *blocks: str) -> "Markdown":
        """Append ``## heading`` (none when None) and the blocks, separated by blank lines."""
        if heading:
            self.blocks.append(f"## {heading}")
        self.blocks.extend(b for b in blocks if b)
        return self

    def claims(self, claims: Iterable[Claim | dict], heading: str | None = "Claims") -> "Markdown":
        return self.section(heading, claims_table(claims))

    def image(self, path: str | Path, alt: str) -> "Markdown":
        return self.section(None, f"![{alt}]({Path(path).name})")

    def text(self) -> str:
        return "\n\n".join([f"# {self.title}", *self.blocks]) + "\n"

    def write(self, path: str | Path) -> Path:
        atomic_write_text(Path(path), self.text())
        return Path(path)


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


@contextmanager
def figure(path: str | Path, ncols: int, figsize: tuple[float, float], dpi: int = 110) -> Iterator[Any]:
    """A row of ``ncols`` axes to draw on; the figure is saved to ``path`` (and closed) when the body ends."""
    fig, axes = pyplot().subplots(1, ncols, figsize=figsize)
    try:
        yield axes
    except BaseException:
        pyplot().close(fig)
        raise
    save_figure(fig, path, dpi)


# -- intervals and learning-rate sweeps ---------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95% for z = 1.96); (nan, nan) when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n successes.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in 0..n ({n}), got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_ci(successes: int, n: int) -> dict:
    """``{"rate", "ci95": [lo, hi], "n"}``: a rate with its Wilson 95% interval (rounded to 4 digits)."""
    lo, hi = wilson_interval(successes, n)
    return {"rate": round(successes / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)], "n": n}


def mean_ci(x: Sequence[float] | torch.Tensor, n_boot: int = 2000, seed: int = 0, key: str = "") -> dict:
    """``{"mean", "ci95": [lo, hi], "n"}``: a mean with its percentile-bootstrap 95% interval.

    For a paired difference pass the per-item differences (the same items resampled for both).
    """
    from rizzearch.audit.metrics import bootstrap_ci

    values = x.tolist() if isinstance(x, torch.Tensor) else list(x)
    m, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed, key=key)
    return {"mean": round(m, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(values)}


def fmt_ci(v: dict, pct: bool = False) -> str:
    """``0.918 [0.90, 0.93]`` (or ``91.8% [90.1%, 93.3%]``) from a ``rate_ci`` / ``mean_ci`` dict."""
    x = v["rate"] if "rate" in v else v["mean"]
    lo, hi = v["ci95"]
    if pct:
        return f"{x:.1%} [{lo:.1%}, {hi:.1%}]"
    return f"{x:.3f} [{lo:.3f}, {hi:.3f}]"


def lr_sweep(lrs: Sequence[float], train: Any, score: Any, *, higher_is_better: bool) -> tuple[Any, dict]:
    """Train once per learning rate and keep the run with the best *validation* score.

    The grid is fixed before any held-out (test) number is seen; ``score`` must read a validation
    split only, so the test number reported for the selected run is not tuned on. Ties keep the
    earlier learning rate of the grid; a non-finite score (a diverged run) never wins.

    Args:
        lrs: the learning-rate grid, in the order it is run.
        train: ``train(lr) -> (model, info: dict)``.
        score: ``score(model, info) -> float``, the validation score of one run.
        higher_is_better: True for accuracies, False for losses.

    Returns:
        ``(model, record)``: the selected run's model and ``{"grid", "selected_lr", "scores", "runs"}``
        (``scores`` and ``runs`` keyed by ``str(lr)``; every run's ``info`` is kept, only the
        selected model is).
    """
    if not lrs:
        raise ConfigError("lr_sweep: the learning-rate grid is empty")
    best = best_lr = best_score = None
    scores, runs = {}, {}
    for lr in lrs:
        model, info = train(lr)
        s = float(score(model, info))
        scores[str(lr)], runs[str(lr)] = s, info
        better = best_score is None or (math.isfinite(s) and (not math.isfinite(best_score) or (s > best_score if higher_is_better else s < best_score)))
        if better:
            best, best_lr, best_score = model, lr, s
        else:
            del model
    return best, {"grid": list(lrs), "selected_lr": best_lr, "scores": scores, "runs": runs}
