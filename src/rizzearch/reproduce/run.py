"""``rizz reproduce``: run the five studies (or one) and write one report.

Each study runs in its own Python process (``python -m rizzearch.reproduce.run <study> DIR``), so a
crash, a memory blow-up or leaked global state in one study cannot take the others down: a failed
study is recorded with its error and the rest still run. Finished studies are detected by a valid
``DIR/<study>/results.json`` and skipped, so an interrupted ``rizz reproduce --out DIR`` resumes
where it stopped. The package's parity tests against the reference implementations (pytest marker
``anchors``) run as a last step when it runs from a source checkout (``run_parity``; never the
current directory's tests). Finally the report builder
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

import rizzearch
from rizzearch.errors import ConfigError, DataError
from rizzearch.reproduce.common import read_results, study_mode
from rizzearch.reproduce.report import build_report
from rizzearch.runs import atomic_write_text, lock_run_dir, make_run_dir, write_run_config


@dataclass(frozen=True)
class Study:
    name: str
    module: str
    paper: str
    budget_min: float  # wall-clock budget of its default mode on 2 CPU cores
    tier: str = "quick"


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study("xlstm", "rizzearch.reproduce.xlstm", "xLSTM: Extended Long Short-Term Memory (Beck et al. 2024)", 9),
        Study("rwkv", "rizzearch.reproduce.rwkv", "RWKV: Reinventing RNNs for the Transformer Era (Peng et al. 2023)", 5),
        Study("goldfish", "rizzearch.reproduce.goldfish", "Be like a Goldfish, Don't Memorize! (Hans et al. 2024)", 6),
        Study("orpo", "rizzearch.reproduce.orpo", "ORPO: Monolithic Preference Optimization without Reference Model (Hong et al. 2024)", 6),
        Study("legal-rag", "rizzearch.reproduce.legal_rag", "Hallucination-Free? Assessing the Reliability of Leading AI Legal Research Tools (Magesh et al. 2024)", 5),
    )
}
# the real tier: the same papers' claims measured on the pretrained SmolLM2-135M-Instruct (issue 16, 17)
REAL_STUDIES: dict[str, Study] = {
    s.name: Study(s.name, f"{s.module}_real", s.paper, minutes, "real")
    for s, minutes in ((STUDIES["goldfish"], 18), (STUDIES["orpo"], 25), (STUDIES["legal-rag"], 15))
}
REAL_TIER_BUDGET_MIN = 75  # the whole real tier on 2 CPU cores (issue 16)
PARITY_MIN = 3  # the anchors-marked parity tests, about


def studies_of(tier: str) -> dict[str, Study]:
    """The studies of one tier (read at call time, so tests can swap the tables)."""
    if tier not in ("quick", "real"):
        raise ConfigError(f"tier: unknown tier {tier!r}; choose quick (models trained from scratch) or real (SmolLM2-135M-Instruct)")
    return STUDIES if tier == "quick" else REAL_STUDIES


def study_folder(run: Path, study: Study) -> Path:
    """Where a study of a multi-study run writes: ``RUN/<study>`` (quick tier), ``RUN/real/<study>`` (real tier)."""
    return run / study.name if study.tier == "quick" else run / "real" / study.name


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
                sys.stderr.write(f"[{study.name if study.tier == 'quick' else study.name + ' real'}] {line}")
            proc.wait()
    seconds = time.perf_counter() - t0
    status = {"study": study.name, "tier": study.tier, "seconds": seconds, "returncode": proc.returncode}
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


def parity_suite(package_dir: Path | None = None) -> tuple[Path | None, str | None]:
    """The root of the source checkout this package runs from, holding its tests, or (None, why not).

    The parity tests belong to the installed package, never to the current directory: the root is
    found from the package's own location (``ROOT/src/rizzearch``), so a ``tests/`` or
    ``conftest.py`` wherever the user stands is never run. A wheel install ships no tests.
    """
    pkg = (package_dir or Path(rizzearch.__file__).parent).resolve()
    root = pkg.parent.parent
    if pkg.parent.name != "src" or not (root / "tests" / "conftest.py").is_file() or not (root / "pyproject.toml").is_file():
        return None, (f"the parity tests ship with the source repository, not with the installed package ({pkg}): "
                      "clone the repository and install it with pip install -e '.[dev,anchors]' to run them")
    return root, None


def run_parity(out: Path, select: tuple[str, ...] = ("tests",), package_dir: Path | None = None) -> dict:
    """Run the package's anchors-marked parity tests (from its source checkout) and record per-test outcomes.

    pytest runs in the checkout's root with its own pyproject.toml as the only configuration
    (``-c``, ``--rootdir``, ``--confcutdir``) and no cache, whatever the current directory holds.
    ``select``: test paths or node ids relative to the checkout root (default: the whole suite).
    """
    root, reason = parity_suite(package_dir)
    if root is None:
        return {"status": "skipped", "reason": reason}
    try:
        importlib.import_module("pytest")
    except ImportError:
        return {"status": "skipped", "reason": "pytest is not installed (pip install -e '.[dev,anchors]')"}
    out = Path(out).resolve()
    xml = out / "parity-junit.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "anchors", "-p", "no:cacheprovider", "-c", str(root / "pyproject.toml"),
           f"--rootdir={root}", f"--confcutdir={root}", f"--junitxml={xml}", *(str(root / s) for s in select)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    (out / "parity-log.txt").write_text(proc.stdout + proc.stderr)
    tests = _junit_outcomes(xml) if xml.is_file() else []
    passed = sum(t["outcome"] == "passed" for t in tests)
    return {"status": "ok" if proc.returncode == 0 else "failed", "passed": passed, "total": len(tests),
            "seconds": time.perf_counter() - t0, "tests": tests}


def _junit_outcomes(path: Path) -> list[dict]:
    """Per-test outcomes (passed, failed, error, skipped) and seconds from a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time", 0))})
    return tests


def reproduce(
    study: str | None = None,
    out: str | None = None,
    full: bool = False,
    tiny: bool = False,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    parity: bool = True,
    tier: str = "quick",
) -> dict:
    """Reproduce the papers' main claims: all studies of a tier (or one) and one report.

    ``rizz reproduce`` runs the quick tier: xlstm, rwkv, goldfish, orpo and legal-rag on models
    trained from scratch in the run (about 15 minutes on 2 CPU cores; ``make demo``).
    ``rizz reproduce --tier real`` runs the real tier: goldfish, orpo and legal-rag on the
    pretrained SmolLM2-135M-Instruct (at most 75 minutes on 2 CPU cores, minutes on one GPU with
    ``--device cuda``; ``make demo-real``). Both tiers can share one ``--out`` folder (quick-tier
    studies in OUT/<study>, real-tier ones in OUT/real/<study>); the report then shows the two tiers
    side by side. ``rizz reproduce rwkv --out DIR`` runs one study into DIR. Rerunning with the
    same --out resumes: finished studies are kept.

    Args:
        study: one study of the tier (quick: xlstm, rwkv, goldfish, orpo, legal-rag; real:
            goldfish, orpo, legal-rag); None: all of them.
        out: run folder (default: runs/reproduce-<timestamp>).
        full: larger models and longer runs than the tier's default.
        tiny: smoke-test sizes (seconds per study; numbers are not meaningful).
        device: cpu or cuda.
        seed: random seed for every study.
        force: rerun studies that already have results in ``out``.
        parity: also run the parity tests against the reference implementations.
        tier: quick (models trained from scratch) or real (the pretrained SmolLM2-135M-Instruct).
    """
    table = studies_of(tier)
    if study is not None and study not in table:
        raise ConfigError(f"study: unknown study {study!r} in the {tier} tier; choose one of {', '.join(table)}")
    study_mode(full, tiny)  # both flags: fail here, not in every study
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but no CUDA device is available")
    run = make_run_dir(out, "reproduce", write_config=False)
    run_lock = lock_run_dir(run, "reproduce")  # one writer per run folder (released on return or error)
    write_run_config(run)
    single = study is not None  # one study into its own folder: `rizz reproduce rwkv --out DIR` writes DIR/results.json
    chosen = [table[study]] if single else list(table.values())
    if tier == "real" and not single:
        estimate = sum(s.budget_min for s in chosen) + (PARITY_MIN if parity else 0)
        print(f"real tier: {len(chosen)} studies on SmolLM2-135M-Instruct, estimated at most {estimate:g} min on 2 CPU cores "
              f"(budget {REAL_TIER_BUDGET_MIN} min; minutes on a GPU)", file=sys.stderr)
    t_all = time.perf_counter()
    statuses = _run_studies(chosen, run, single, full, tiny, device, seed, force)
    parity_result = None
    if parity and not single:
        print("parity tests against the reference implementations (pytest -m anchors) ...", file=sys.stderr)
        parity_result = run_parity(run)
        atomic_write_text(run / "parity.json", json.dumps(parity_result, indent=2))
        if parity_result["status"] == "skipped":
            print(f"parity tests skipped: {parity_result['reason']}", file=sys.stderr)
    if single:
        return {"statuses": statuses}
    statuses = _with_other_tiers(run, tier, statuses)
    combined = build_report(run, statuses, parity_result, wall_seconds=time.perf_counter() - t_all, full=full, device=device,
                            papers={s.name: s.paper for s in STUDIES.values()})
    print(f"report: {run / 'report.html'} (and report.md, results.json)", file=sys.stderr)
    held = sum(c["holds"] for c in combined["claims"])
    print(f"{held}/{len(combined['claims'])} claims hold; studies: " + ", ".join(f"{s['study']}{'' if s.get('tier', 'quick') == 'quick' else ' (real)'} {s['status']}" for s in statuses))
    return combined


def _with_other_tiers(run: Path, tier: str, statuses: list[dict]) -> list[dict]:
    """This run's statuses plus those of the other tier's studies already run in the same folder.

    ``make demo`` then ``make demo-real`` into one folder give one report with both tiers side by side.
    """
    other = "real" if tier == "quick" else "quick"
    found = []
    for s in studies_of(other).values():
        folder = study_folder(run, s)
        prev = folder / "status.json"
        if prev.is_file():  # finished or failed: both are shown
            found.append({**json.loads(prev.read_text()), "tier": other})
        elif _is_done(folder):
            found.append({"study": s.name, "status": "ok", "seconds": None, "tier": other})
    return sorted(statuses + found, key=lambda st: st.get("tier", "quick") != "quick")


def _run_studies(chosen: list[Study], run: Path, single: bool, full: bool, tiny: bool, device: str, seed: int, force: bool) -> list[dict]:
    """Run each chosen study in its own process, skipping those already done (unless ``force``); their statuses."""
    statuses = []
    for i, s in enumerate(chosen, 1):
        study_dir = run if single else study_folder(run, s)
        label = s.name if s.tier == "quick" else f"{s.name} (real tier)"
        if not force and _is_done(study_dir):
            print(f"[{i}/{len(chosen)}] {label}: already done in {study_dir}, skipping (use --force true to rerun)", file=sys.stderr)
            prev = study_dir / "status.json"
            st = json.loads(prev.read_text()) if prev.is_file() else {"study": s.name, "status": "ok", "seconds": None}
            statuses.append({**st, "tier": s.tier})
            continue
        print(f"[{i}/{len(chosen)}] {label}: {s.paper} (budget {s.budget_min:g} min)", file=sys.stderr)
        st = _run_child(s, study_dir, full, tiny, device, seed)
        print(f"[{i}/{len(chosen)}] {label}: {st['status']} in {st['seconds']:.0f}s", file=sys.stderr)
        statuses.append(st)
    return statuses


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
