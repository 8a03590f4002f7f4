"""Timing helpers shared by every benchmark script.

Timings on shared CPUs swing by several times from minute to minute, so we never report absolute
numbers alone: each benchmark times a baseline (the anchor) and our code *in the same process*,
interleaved (A, B, A, B, ...) after warm-up, and reports the ratio of medians with the spread.
Every script prints the machine, the library versions and a table, and ends with one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

from rizzearch.reproduce.common import environment, load_average  # noqa: F401  (load_average: used by the scripts)


def sync(device: str | torch.device | None = None) -> None:
    if torch.cuda.is_available() and (device is None or "cuda" in str(device)):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device=None) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2, device=None,
                warm: bool = False) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved round-robin after ``warmup`` rounds. With
    ``warm`` each timed call comes right after an untimed call of the same function (its weights
    and buffers in cache, as in a steady loop), instead of after the other functions (cold)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if warm:
                fn()
            times[k].append(time_once(fn, device))
    return times


def summary(ts: list[float]) -> dict:
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "max_s": max(ts), "spread": (max(ts) - min(ts)) / med if med else 0.0}


def ratio(baseline: list[float], ours: list[float]) -> float:
    """How many times faster ours is than the baseline (median over median)."""
    return statistics.median(baseline) / statistics.median(ours)


def versions(*packages: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def print_header(title: str, packages: tuple[str, ...] = ()) -> dict:
    info = {**environment(), **versions(*packages)}
    print(f"# {title}")
    for k, v in info.items():
        print(f"  {k}: {v}")
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def emit_json(payload: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(payload, sort_keys=True, default=str))
