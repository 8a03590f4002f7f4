"""``rizz bench``: run the speed benchmarks in ``benchmarks/`` and collect their JSON lines.

Benchmarks live outside the package (they import the reference implementations); each script
times the anchor and our code in the same process and ends with one JSON line, which this
command collects into ``RUN/bench.jsonl`` and a summary table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rizzearch.errors import ConfigError
from rizzearch.runs import make_run_dir


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        if (root / "benchmarks" / "common.py").is_file():
            return root / "benchmarks"
    raise ConfigError("benchmarks/ folder not found: run `rizz bench` from a clone of the rizzearch repository")


def available() -> list[str]:
    return sorted(p.stem for p in benchmarks_dir().glob("*.py") if p.stem != "common" and not p.stem.startswith("_"))


def bench(names: list[str] | None = None, out: str | None = None, timeout_s: int = 1800) -> list[dict]:
    """Run speed benchmarks (all, or the named ones) and summarise their results.

    Args:
        names: benchmark scripts to run (file names in benchmarks/ without .py); None runs all.
        out: run folder (default: runs/bench-<timestamp>).
        timeout_s: per-benchmark time limit in seconds.
    """
    folder = benchmarks_dir()
    known = available()
    todo = names or known
    unknown = sorted(set(todo) - set(known))
    if unknown:
        raise ConfigError(f"names: unknown benchmark(s) {unknown}; available: {known}")
    run = make_run_dir(out, "bench")
    results = []
    for name in todo:
        print(f"== benchmarks/{name}.py", flush=True)
        proc = subprocess.run([sys.executable, str(folder / f"{name}.py")], capture_output=True, text=True, timeout=timeout_s)
        (run / f"{name}.log").write_text(proc.stdout + proc.stderr)
        print(proc.stdout, end="", flush=True)
        lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            row = {"benchmark": name, "error": (proc.stderr.strip().splitlines() or ["no JSON line"])[-1], "returncode": proc.returncode}
        else:
            row = json.loads(lines[-1])
            row.setdefault("benchmark", name)
        results.append(row)
        with open(run / "bench.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    print("\nbenchmark summary")
    for r in results:
        status = "ERROR " + r["error"] if "error" in r else ("PASS" if r.get("pass", True) else "FAIL")
        print(f"  {r['benchmark']:<20} {status}")
    return results

