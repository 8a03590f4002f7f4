"""Run folders: every command writes its outputs (config, metrics, checkpoints, reports) into one."""

from __future__ import annotations

import contextvars
import os
import time
from pathlib import Path

from rizzearch.errors import ConfigError

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


def make_run_dir(out: str | None, command: str, *, allow_existing: bool = True) -> Path:
    """Create the run folder (``runs/<command>-<timestamp>`` by default) and save the resolved config.

    The config of the running CLI command is written to ``config.yaml``; an older one is kept as
    ``config.<n>.yaml`` rather than overwritten.
    """
    path = Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: exists and is not a folder")
    if path.exists() and not allow_existing and any(path.iterdir()):
        raise ConfigError(f"{path}: run folder already exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    resolved = RESOLVED_CONFIG.get()
    if resolved:
        target = path / "config.yaml"
        if target.exists():
            n = 1
            while (path / f"config.{n}.yaml").exists():
                n += 1
            target.rename(path / f"config.{n}.yaml")
        target.write_text(resolved)
    return path
