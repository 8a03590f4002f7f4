"""Issue 12 item 5: one writer per run folder. Two trainings into one --out used to both exit 0,
log every step twice and silently replace each other's weights. Now the second writer fails at once
with a message naming the holder (pid, host, command); a lock left by a dead process is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rizzearch
from rizzearch.cli import main
from rizzearch.runs import LOCK_FILE, RunFolderBusy, RunLock, lock_run_dir

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(300))


def _env() -> dict:
    src = str(Path(rizzearch.__file__).resolve().parents[1])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_second_lock_fails_naming_the_holder(tmp_path):
    with RunLock(tmp_path, "train"):
        with pytest.raises(RunFolderBusy, match=rf"in use by rizz train \(pid {os.getpid()} on host {socket.gethostname()}"):
            lock_run_dir(tmp_path, "align")
    assert not (tmp_path / LOCK_FILE).exists()  # released
    lock_run_dir(tmp_path, "align").release()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    code = "import sys, time\nfrom rizzearch.runs import lock_run_dir\nlock = lock_run_dir(sys.argv[1], 'train')\nprint('locked', flush=True)\ntime.sleep(600)\n"
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"pid {p.pid}"):
            lock_run_dir(tmp_path, "train")
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    lock = lock_run_dir(tmp_path, "train")  # kill -9 left the file; its holder is dead
    assert lock.took_over["pid"] == p.pid
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_stale_lock_file_with_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "train", "time": time.time()}))
    with RunLock(tmp_path, "train") as lock:
        assert lock.took_over["pid"] == dead.pid


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "command": "train", "time": time.time()}))
    with pytest.raises(RunFolderBusy, match="elsewhere.example.*delete"):
        lock_run_dir(tmp_path, "train")


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with RunLock(tmp_path, "train"):
        assert not (tmp_path / LOCK_FILE).exists()


def _train_cmd(corpus: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "rizzearch.cli", "train", "--model", "gpt", "--model_config.n_layer", "1", "--model_config.d_model", "32",
            "--model_config.n_head", "2", "--data.source", str(corpus), "--data.tokenizer", "byte", "--data.seq_len", "16",
            "--data.eval_batches", "1", "--train.steps", str(steps), "--train.batch_size", "4", "--train.log_every", "1",
            "--progress", "false", "--out", str(out)]


def test_two_concurrent_trainings_into_one_folder(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    run = tmp_path / "run"
    env = {**_env(), "RIZZ_FAULT_CHECKPOINT_SLEEP": "5"}  # the first writer holds the folder inside its final checkpoint write
    first = subprocess.Popen(_train_cmd(corpus, run, 3), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (run / LOCK_FILE).exists():
            assert time.time() - t0 < 120 and first.poll() is None, "first writer did not start"
            time.sleep(0.05)
        # the second writer, in this process (same code path as the CLI): fails at once, naming the holder
        rc = main(_train_cmd(corpus, run, 3)[3:])
        assert rc == 2
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
        first.stderr.close()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == [1, 2, 3]  # logged once, by one writer
    assert not (run / LOCK_FILE).exists()


def test_second_writer_message_through_the_cli(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run", "train"):
        rc = main(["train", "--out", str(tmp_path / "run"), "--train.steps", "1", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and f"pid {os.getpid()}" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # the refused writer wrote nothing


def test_align_audit_and_reproduce_refuse_a_locked_folder(tmp_path):
    from rizzearch.commands.audit import audit
    from rizzearch.reproduce.run import reproduce
    from rizzearch.training.align import align

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run, "train"):
        for call in (lambda: align(out=str(run), progress=False), lambda: audit(out=str(run), progress=False),
                     lambda: reproduce(out=str(run), parity=False)):
            with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
                call()
    assert sorted(p.name for p in run.iterdir()) == []
