"""``rizz reproduce``: run the five studies (or one) and write one report.

Each study runs in its own Python process (``python -m rizzearch.reproduce.run <study> DIR``), so a
crash, a memory blow-up or leaked global state in one study cannot take the others down: a failed
study is recorded with its error and the rest still run. Finished studies are detected by a valid
``DIR/<study>/results.json`` and skipped, so an interrupted ``rizz reproduce --out DIR`` resumes
where it stopped. The parity tests against the reference implementations (pytest marker
``anchors``) run as a last step when the test suite is available. Finally the report builder
(``reproduce/report.py``) writes ``report.html`` (self-contained), ``report.md`` and a combined
``results.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from rizzearch.errors import ConfigError, DataError
from rizzearch.reproduce.common import read_results, study_mode
from rizzearch.runs import lock_run_dir, make_run_dir, write_run_config
from rizzearch.runs import atomic_write_text


@dataclass(frozen=True)
class Study:
    name: str
    module: str
    paper: str
    budget_min: float  # quick-mode wall-clock budget on 2 CPU cores


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study("xlstm", "rizzearch.reproduce.xlstm", "xLSTM: Extended Long Short-Term Memory (Beck et al. 2024)", 5),
        Study("rwkv", "rizzearch.reproduce.rwkv", "RWKV: Reinventing RNNs for the Transformer Era (Peng et al. 2023)", 5),
        Study("goldfish", "rizzearch.reproduce.goldfish", "Be like a Goldfish, Don't Memorize! (Hans et al. 2024)", 6),
        Study("orpo", "rizzearch.reproduce.orpo", "ORPO: Monolithic Preference Optimization without Reference Model (Hong et al. 2024)", 6),
        Study("legal-rag", "rizzearch.reproduce.legal_rag", "Hallucination-Free? Assessing the Reliability of Leading AI Legal Research Tools (Magesh et al. 2024)", 5),
    )
}


def rerun_command(study: str, full: bool = False, device: str = "cpu") -> str:
    cmd = f"rizz reproduce {study} --out runs/{study}"
    if full:
        cmd += " --full true"
    if device != "cpu":
        cmd += f" --device {device}"
    return cmd


def _is_done(study_dir: Path) -> bool:
    try:
        read_results(study_dir / "results.json")
        return True
    except DataError:
        return False


def _run_child(study: Study, study_dir: Path, full: bool, tiny: bool, device: str, seed: int) -> dict:
    """Run one study in a child process; return its status record (never raises for study errors)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("error.txt", "results.json"):
        (study_dir / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "rizzearch.reproduce.run", study.name, str(study_dir), "--module", study.module,
           "--full", str(full), "--tiny", str(tiny), "--device", device, "--seed", str(seed)]
    t0 = time.perf_counter()
    log_path = study_dir / "log.txt"
    with open(log_path, "w") as log:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                sys.stderr.write(f"[{study.name}] {line}")
            proc.wait()
    seconds = time.perf_counter() - t0
    status = {"study": study.name, "seconds": seconds, "returncode": proc.returncode}
    if proc.returncode == 0 and _is_done(study_dir):
        status["status"] = "ok"
    else:
        status["status"] = "failed"
        # a study that wrote results.json and then failed (its plot, its report) is not done: resume reruns it
        (study_dir / "results.json").unlink(missing_ok=True)
        err_file = study_dir / "error.txt"
        tail = log_path.read_text().strip().splitlines()[-15:]
        status["error"] = err_file.read_text().strip() if err_file.is_file() else "\n".join(tail) or f"exit code {proc.returncode}"
    atomic_write_text(study_dir / "status.json", json.dumps(status, indent=2))  # read back on resume
    return status


def run_parity(out: Path) -> dict:
    """Run the anchors-marked parity tests (if the test suite is present) and record per-test outcomes."""
    root = next((p for p in (Path.cwd(), *Path(__file__).resolve().parents) if (p / "tests" / "conftest.py").is_file()), None)
    if root is None:
        return {"status": "skipped", "reason": "tests/ not found (run from a clone of the repository)"}
    try:
        importlib.import_module("pytest")
    except ImportError:
        return {"status": "skipped", "reason": "pytest is not installed (pip install -e '.[dev,anchors]')"}
    xml = out / "parity-junit.xml"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "anchors", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"],
                          cwd=root, capture_output=True, text=True)
    (out / "parity-log.txt").write_text(proc.stdout + proc.stderr)
    tests = []
    if xml.is_file():
        import xml.etree.ElementTree as ET

        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time", 0))})
    passed = sum(t["outcome"] == "passed" for t in tests)
    return {"status": "ok" if proc.returncode == 0 else "failed", "passed": passed, "total": len(tests),
            "seconds": time.perf_counter() - t0, "tests": tests}


def reproduce(
    study: str | None = None,
    out: str | None = None,
    full: bool = False,
    tiny: bool = False,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    parity: bool = True,
) -> dict:
    """Reproduce the papers' main claims: all five studies (or one) and one report.

    ``rizz reproduce`` runs xlstm, rwkv, goldfish, orpo and legal-rag in quick mode (about 30
    minutes on 2 CPU cores) and writes OUT/report.html, OUT/report.md and OUT/results.json.
    ``rizz reproduce rwkv --out DIR`` runs one study. Rerunning with the same --out resumes:
    finished studies are kept.

    Args:
        study: one of xlstm, rwkv, goldfish, orpo, legal-rag (None: all five).
        out: run folder (default: runs/reproduce-<timestamp>).
        full: larger models and longer runs instead of quick mode.
        tiny: smoke-test sizes (seconds per study; numbers are not meaningful).
        device: cpu or cuda.
        seed: random seed for every study.
        force: rerun studies that already have results in ``out``.
        parity: also run the parity tests against the reference implementations.
    """
    from rizzearch.reproduce.report import build_report

    if study is not None and study not in STUDIES:
        raise ConfigError(f"study: unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    study_mode(full, tiny)  # both flags: fail here, not in every study
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but no CUDA device is available")
    run = make_run_dir(out, "reproduce", write_config=False)
    run_lock = lock_run_dir(run, "reproduce")  # one writer per run folder (released on return or error)
    write_run_config(run)
    chosen = [STUDIES[study]] if study else list(STUDIES.values())
    # one study into its own folder: `rizz reproduce rwkv --out DIR` writes DIR/results.json
    single = study is not None
    statuses = []
    t_all = time.perf_counter()
    for i, s in enumerate(chosen, 1):
        study_dir = run if single else run / s.name
        if not force and _is_done(study_dir):
            print(f"[{i}/{len(chosen)}] {s.name}: already done in {study_dir}, skipping (use --force true to rerun)", file=sys.stderr)
            prev = study_dir / "status.json"
            statuses.append(json.loads(prev.read_text()) if prev.is_file() else {"study": s.name, "status": "ok", "seconds": None})
            continue
        print(f"[{i}/{len(chosen)}] {s.name}: {s.paper} (quick budget {s.budget_min:g} min)", file=sys.stderr)
        st = _run_child(s, study_dir, full, tiny, device, seed)
        print(f"[{i}/{len(chosen)}] {s.name}: {st['status']} in {st['seconds']:.0f}s", file=sys.stderr)
        statuses.append(st)
    parity_result = None
    if parity and not single:
        print("parity tests against the reference implementations (pytest -m anchors) ...", file=sys.stderr)
        parity_result = run_parity(run)
        atomic_write_text(run / "parity.json", json.dumps(parity_result, indent=2))
    if single:
        return {"statuses": statuses}
    combined = build_report(run, statuses, parity_result, wall_seconds=time.perf_counter() - t_all, full=full, device=device)
    print(f"report: {run / 'report.html'} (and report.md, results.json)", file=sys.stderr)
    held = sum(c["holds"] for c in combined["claims"])
    print(f"{held}/{len(combined['claims'])} claims hold; studies: " + ", ".join(f"{s['study']} {s['status']}" for s in statuses))
    return combined


reproduce.__positional__ = ("study",)  # rizz reproduce rwkv


def _child_main(argv: list[str]) -> int:
    """Entry of the per-study child process: ``python -m rizzearch.reproduce.run STUDY DIR [--opt v]``."""
    import argparse

    p = argparse.ArgumentParser(prog="rizzearch.reproduce.run")
    p.add_argument("study")
    p.add_argument("out_dir")
    p.add_argument("--module", default=None)
    p.add_argument("--full", default="False")
    p.add_argument("--tiny", default="False")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        mod = importlib.import_module(a.module or STUDIES[a.study].module)
        mod.run(str(out), full=a.full == "True", tiny=a.tiny == "True", device=a.device, seed=a.seed)
    except BaseException as e:  # noqa: BLE001  (recorded for the report, then re-signalled by exit code)
        (out / "error.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        print(f"study {a.study} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
