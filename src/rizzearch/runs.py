"""Run folders: every command writes its outputs (config, metrics, checkpoints, reports) into one."""

from __future__ import annotations

import contextvars
import os
import sys
import time
from pathlib import Path

from rizzearch.errors import ConfigError, RizzError

# The resolved config of the running CLI command (YAML text), set by ``rizzearch.cli`` while a
# command runs; ``make_run_dir`` saves it as the run folder's config.yaml.
RESOLVED_CONFIG: contextvars.ContextVar[str | None] = contextvars.ContextVar("RESOLVED_CONFIG", default=None)


def cache_dir(*parts: str) -> Path:
    """The per-user cache folder for built kernels, the legal RAG index and converted weights.

    ``$RIZZ_CACHE`` if set, else ``$XDG_CACHE_HOME/rizzearch``, else ``~/.cache/rizzearch``; ``parts``
    name a subfolder. Read at each call, so setting the variable later (tests, notebooks) takes effect.
    Nothing is created here: writers create what they need.
    """
    root = os.environ.get("RIZZ_CACHE")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rizzearch")
    return Path(root, *parts)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` through a temporary file and a rename, so a reader (or a
    resumed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_dir_path(out: str | None, command: str) -> Path:
    """The run folder a command writes to: ``out``, else ``runs/<command>-<timestamp>``."""
    return Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(out: str | None, command: str, *, allow_existing: bool = True, write_config: bool = True) -> Path:
    """Create the run folder (``runs/<command>-<timestamp>`` by default) and save the resolved config.

    The config of the running CLI command is written to ``config.yaml``; an older one is kept as
    ``config.<n>.yaml`` rather than overwritten. With ``write_config=False`` nothing is written
    yet: commands that validate the folder first (resume checks) call ``write_run_config`` after.
    """
    path = run_dir_path(out, command)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder")
    if path.exists() and not allow_existing and any(path.iterdir()):
        raise ConfigError(f"{path}: run folder already exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    if write_config:
        write_run_config(path)
    return path


def write_run_config(path: Path) -> Path | None:
    """Save the running command's resolved config as ``path/config.yaml`` (an older one becomes
    ``config.<n>.yaml``); nothing when no CLI command is running."""
    resolved = RESOLVED_CONFIG.get()
    if not resolved:
        return None
    target = path / "config.yaml"
    if target.exists():
        n = 1
        while (path / f"config.{n}.yaml").exists():
            n += 1
        target.rename(path / f"config.{n}.yaml")
    return atomic_write_text(target, resolved)


# ----------------------------------------------------------------------------------------------
# One writer per run folder

LOCK_FILE = ".rizz.lock"


class RunFolderBusy(RizzError):
    """Another live process holds the run folder's lock."""


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"rizz {holder.get('command', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {since})"


class RunLock:
    """An exclusive lock on a run folder: ``RUN/.rizz.lock`` holds the holder's pid, host and command.

    Exclusion is an ``fcntl.flock`` on that file, which the kernel drops when the holder dies
    (even by kill -9), so a lock left by a dead process on this host is detected and taken over.
    A lock file written on another host (shared file system) is never taken over: the message
    names the holder and says to delete the file if that run is gone. Under torchrun only rank 0
    takes the lock (the other ranks are the same run). Use as a context manager or call release().
    """

    def __init__(self, run: str | Path, command: str):
        self.path = Path(run) / LOCK_FILE
        self.command = command
        self._fd: int | None = None
        self.took_over: dict | None = None

    def acquire(self) -> "RunLock":
        import fcntl
        import json
        import socket

        if int(os.environ.get("RANK", "0") or 0) != 0:
            return self
        host = socket.gethostname()
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusy(f"{self.path.parent}: run folder is in use by {_describe(self._read())}; "
                                    "wait for it to finish or choose another --out") from None
            try:  # the file we locked must still be the one at the path (a releaser unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = self._read()
            if old and old.get("host") != host:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise RunFolderBusy(f"{self.path.parent}: run folder is locked by {_describe(old)}; if that run is no "
                                    f"longer running, delete {self.path}")
            self.took_over = old or None
            me = {"pid": os.getpid(), "host": host, "command": self.command, "time": time.time(), "proc_start": _proc_start(os.getpid())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self._fd = fd
            if old:
                print(f"{self.path.parent}: took over the stale lock of {_describe(old)}, which is no longer running", file=sys.stderr)
            return self
        raise RunFolderBusy(f"{self.path}: could not take the lock (the file keeps changing)")

    def _read(self) -> dict:
        import json

        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a lock held by a function's local is released when the function exits, even by an error
        try:
            self.release()
        except Exception:
            pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run: str | Path, command: str) -> RunLock:
    """Take the exclusive lock of a run folder (see ``RunLock``); raises ``RunFolderBusy`` naming the holder."""
    return RunLock(run, command).acquire()


# ----------------------------------------------------------------------------------------------
# Reproducibility and fresh logs


def seed_everything(seed: int) -> None:
    """Seed every RNG a command draws from (python ``random``, numpy, torch on CPU and CUDA) with
    ``seed``: called first by every command that builds or trains a model, so the same config gives
    the same initial weights and the same run. (Data samplers are seeded from the same config value.)"""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def start_fresh_log(path: Path) -> Path | None:
    """A run that starts from step 0 must not append to a metrics log left by an earlier attempt
    that wrote no checkpoint: the old file is kept as ``<name>.<n>.jsonl`` (like config.<n>.yaml)
    and the new run writes a fresh one. Returns the name the old log was kept under."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.stem}.{n}{path.suffix}").exists():
        n += 1
    kept = path.with_name(f"{path.stem}.{n}{path.suffix}")
    path.rename(kept)
    return kept


def check_config_file(path: str | Path) -> None:
    """A ``--config`` YAML must exist, be UTF-8 and hold a mapping of options (an empty file or a
    bare scalar/list is refused), so the user gets one line naming the file instead of a parser error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: config file is not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        raise ConfigError(f"{p}: config file is empty (expected options such as `train: {{steps: 10}}`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of options at the top level, got a {type(data).__name__}")


def check_config_args(args: list[str]) -> None:
    """``check_config_file`` on every ``--config FILE`` / ``--config=FILE`` in a command line."""
    for i, a in enumerate(args):
        value = args[i + 1] if a == "--config" and i + 1 < len(args) else a.split("=", 1)[1] if a.startswith("--config=") else None
        if value is None:
            continue
        if Path(value).is_file():
            check_config_file(value)
        elif not value.lstrip().startswith("{") and "\n" not in value and ":" not in value:  # not inline YAML
            raise ConfigError(f"{value}: config file not found")
