"""kill -9 at random moments, including in the middle of a checkpoint write: the resumed run must
be bit-exact with an uninterrupted run of the same config and seed (weights and logged metrics),
and the half-written ``.tmp-step_*`` folder must be cleaned up on the next start.

One fast case runs by default (a kill inside the second checkpoint write); the random loop is slow.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rizzearch

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(300))
STEPS, EVERY = 8, 2


def _env(**extra) -> dict:
    src = str(Path(rizzearch.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RIZZ_FAULT_CHECKPOINT_SLEEP", None)
    env.update(extra)
    return env


def _cmd(corpus: Path, out: Path, resume: bool = False, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "rizzearch.cli", "train", "--model", "gpt", "--model_config.n_layer", "1",
            "--model_config.d_model", "32", "--model_config.n_head", "2", "--data.source", str(corpus), "--data.tokenizer", "byte",
            "--data.seq_len", "16", "--data.eval_batches", "1", "--train.steps", str(steps), "--train.batch_size", "4",
            "--train.lr", "0.003", "--train.warmup_steps", "2", "--train.log_every", "1", "--train.eval_every", "3",
            "--train.ckpt_every", str(EVERY), "--train.keep_checkpoints", "2", "--progress", "false", "--out", str(out),
            "--resume", "true" if resume else "false"]


def _run(*cmds) -> None:
    """Run one or more `rizz` command lines, one after another, in one fresh process (one start-up)."""
    argvs = [c[c.index("rizzearch.cli") + 1 :] for c in cmds]
    script = "import json, sys\nfrom rizzearch.cli import main\nfor a in json.loads(sys.argv[1]):\n    assert main(a) == 0, a\n"
    p = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


def _final(run: Path):
    from safetensors.torch import load_file

    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["name"]
    weights = load_file(str(run / "checkpoints" / latest / "model.safetensors"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return latest, weights, [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "peak_mem_mb")} for r in rows]


def _assert_bit_exact(a: Path, b: Path) -> None:
    (na, wa, ma), (nb, wb, mb) = _final(a), _final(b)
    assert na == nb
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: resumed weights differ from the uninterrupted run"
    assert ma == mb, "metrics.jsonl of the resumed run differs from the uninterrupted run"
    assert not list((b / "checkpoints").glob(".tmp-step_*")), "a half-written checkpoint folder was left behind"


@pytest.fixture
def corpus(tmp_path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text(CORPUS)
    return f


def _wait_for(pred, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_kill_inside_checkpoint_write_then_resume_is_bit_exact(tmp_path, corpus):
    ref, run = tmp_path / "ref", tmp_path / "run"
    # pause inside the step-4 checkpoint write (weights written, training state not yet) and kill -9 there
    p = subprocess.Popen(_cmd(corpus, run), env=_env(RIZZ_FAULT_CHECKPOINT_SLEEP="4:60"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any((t / "model.json").exists() for t in (run / "checkpoints").glob(".tmp-step_00000004-*")))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["name"] == "step_00000002"
    assert list((run / "checkpoints").glob(".tmp-step_*")), "the kill should have left a partial checkpoint"
    _run(_cmd(corpus, ref), _cmd(corpus, run, resume=True))  # the uninterrupted reference, then the resume
    _assert_bit_exact(ref, run)


@pytest.mark.slow
def test_random_kills_then_resume_is_bit_exact(tmp_path, corpus):
    """Many kills at random moments (start-up, mid-step, mid-checkpoint-write, during eval): each
    time the run is resumed (or restarted when no checkpoint exists yet), and the end result must
    equal the uninterrupted run bit for bit."""
    rng = random.Random(12)
    ref = tmp_path / "ref"
    _run(_cmd(corpus, ref, steps=12))
    for trial in range(6):
        run = tmp_path / f"run{trial}"
        for attempt in range(12):
            resume = (run / "checkpoints" / "latest.json").exists()
            env = _env(RIZZ_FAULT_CHECKPOINT_SLEEP=f"{rng.choice([2, 4, 6, 8, 10])}:{rng.uniform(0.0, 0.5):.3f}")
            p = subprocess.Popen(_cmd(corpus, run, resume=resume, steps=12), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                _, err = p.communicate(timeout=rng.uniform(1.0, 8.0))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.communicate()
                continue
            assert p.returncode == 0, err[-2000:]
            break
        else:
            _run(_cmd(corpus, run, resume=(run / "checkpoints" / "latest.json").exists(), steps=12))
        _assert_bit_exact(ref, run)
