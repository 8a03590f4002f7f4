"""Resuming a run: the settings a resume must share with its checkpoint, and the start state
(optimizer, loss scaler, data position, RNG, the metrics log cut back to the checkpoint's step)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import ConfigError
from rizzearch.runs import atomic_write_text, start_fresh_log
from rizzearch.training import checkpoint as ckpt_io
from rizzearch.training.distributed import DistInfo

if TYPE_CHECKING:
    from rizzearch.training.loop import TrainConfig


# TrainConfig fields a resumed run must share with its checkpoint: they shape what was trained on and
# how (the data order, the optimizer, the schedule). The others (steps, logging, evaluation and
# checkpoint cadence, device, max_seconds, micro_batch_size, which leaves the gradient unchanged)
# may change on resume; ``steps`` may grow to extend a run.
RESUME_FIXED = ("batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "precision")


def resume_differences(state_config: dict, cfg: TrainConfig, saved_data: dict | None = None, data: dict | None = None) -> list[str]:
    """What differs between a checkpoint's training settings (``train_state["config"]``, and its
    ``model.json`` data record) and the requested ones, as ``field: checkpoint X, now Y`` strings."""
    now = asdict(cfg)
    diffs = [f"train.{k}: checkpoint {state_config.get(k)!r}, now {now[k]!r}" for k in RESUME_FIXED if k in state_config and state_config[k] != now[k]]
    if saved_data is not None and data is not None:
        diffs += [f"data.{k}: checkpoint {saved_data.get(k)!r}, now {data.get(k)!r}" for k in sorted(set(saved_data) | set(data))
                  if saved_data.get(k) != data.get(k)]
    return diffs


def check_resume(run_dir: str | Path, cfg: TrainConfig, data: dict | None = None) -> Path:
    """The checkpoint a resume of ``run_dir`` would start from, after checking that it was trained
    with the same settings; else ConfigError naming every difference (nothing is written)."""
    ckpt = ckpt_io.resolve_checkpoint(run_dir)
    state = ckpt_io.load_train_state(ckpt)
    saved_data = ckpt_io.read_meta(ckpt).get("data")
    diffs = resume_differences(state.get("config", {}), cfg, saved_data, data)
    if diffs:
        raise ConfigError(f"{ckpt}: cannot resume with different settings ({'; '.join(diffs)}); use the run's own "
                          "settings (see its config.yaml) or start a new run with another --out")
    return ckpt


def _load_history(path: Path, upto: int) -> list[dict]:
    """The logged rows up to step ``upto``; a last line cut short by a kill is dropped."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    text = text[: text.rfind("\n") + 1]
    return [row for _, row in read_jsonl(path, text) if row.get("step", 0) <= upto]


def restore(run: Path, load_optimizer: Callable[[dict], None], train_data, info: DistInfo, ckpt: Path | None, scaler):
    """Start state of a run -> (start step, logged rows kept).

    Resume (``ckpt``, already checked by ``check_resume``, weights already loaded): optimizer, loss
    scaler, data position and RNG states, and the log cut back to that step (later rows are redone
    identically). New run: the log of an earlier attempt is kept aside (``start_fresh_log``).
    """
    metrics_path = run / "metrics.jsonl"
    if ckpt is None:
        if info.is_main:
            start_fresh_log(metrics_path)
        return 0, []
    state = ckpt_io.load_train_state(ckpt)
    load_optimizer(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    train_data.load_state_dict(state["data"])
    ckpt_io.set_rng_state(state["rng"][info.rank] if isinstance(state["rng"], list) else state["rng"])
    start_step = int(state["step"])
    history = _load_history(metrics_path, start_step)
    if info.is_main:
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    return start_step, history
