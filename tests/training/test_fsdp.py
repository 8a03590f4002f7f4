"""FSDP2 (--train.distributed fsdp) under torchrun with gloo: equal to one process, interchangeable checkpoints, resume, bad use."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rizzearch.errors import ConfigError
from rizzearch.testing import assert_close
from rizzearch.training.loop import TrainConfig

SCRIPT = r"""
import sys, torch
from rizzearch.models import build_model
from rizzearch.training.losses import lm_loss
from rizzearch.data.batches import RandomWindows
from rizzearch.training.loop import TrainConfig, train
run, mode, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
V = 61
tokens = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(1))
torch.manual_seed(0)
m = build_model("gpt", n_layer=2, d_model=32, n_head=2, vocab_size=V)
cfg = TrainConfig(steps=steps, batch_size=8, micro_batch_size=2, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, log_every=1,
                  ckpt_every=2, keep_checkpoints=5, distributed=mode)
train(m, lm_loss, RandomWindows(tokens, 8, 16, seed=3), cfg, run, progress=False, resume=resume)
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, run: Path, mode: str, steps: int, resume: bool = False, procs: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(script), str(run), mode, str(steps), "1" if resume else "0"]
    if procs > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), *args]
    out = subprocess.run([sys.executable, *args], env=env, timeout=300, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def _final(run: Path) -> dict:
    return load_file(str(sorted((run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))


def _losses(run: Path) -> torch.Tensor:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in rows if "loss" in r])


def _same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:  # AdamW divides by sqrt(v): tiny fp32 reduction-order differences grow a little
        assert_close(b[k], a[k], atol=5e-5, rtol=1e-4, name=f"{what}: {k}")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    f = tmp_path_factory.mktemp("fsdp") / "train.py"
    f.write_text(SCRIPT)
    return f


@pytest.fixture(scope="module")
def single(script, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    _run(script, run, "ddp", 4)
    return run


def test_fsdp_two_processes_equal_one(script, single, tmp_path):
    _run(script, tmp_path / "fsdp", "fsdp", 4, procs=2)
    assert_close(_losses(tmp_path / "fsdp"), _losses(single), atol=1e-5, rtol=1e-5, name="loss curve")
    _same(_final(single), _final(tmp_path / "fsdp"), "final weights")
    assert "lm_head.weight" not in _final(tmp_path / "fsdp") or "embed.weight" not in _final(tmp_path / "fsdp")  # tied: one copy


@pytest.mark.slow  # four torchrun/python launches, ~1 min on 2 cores
def test_fsdp_checkpoints_resume_in_one_process_and_back(script, single, tmp_path):
    a = tmp_path / "fsdp_then_one"
    _run(script, a, "fsdp", 2, procs=2)
    _run(script, a, "ddp", 4, resume=True)
    _same(_final(single), _final(a), "FSDP checkpoint resumed in 1 process")
    b = tmp_path / "one_then_fsdp"
    _run(script, b, "ddp", 2)
    _run(script, b, "fsdp", 4, resume=True, procs=2)
    _same(_final(single), _final(b), "1-process checkpoint resumed under FSDP")
    assert_close(_losses(b), _losses(single), atol=1e-5, rtol=1e-5, name="resumed loss curve")


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path):
    from rizzearch.data.batches import RandomWindows
    from rizzearch.models import build_model
    from rizzearch.training.loop import train
    from rizzearch.training.losses import lm_loss

    model = build_model("gpt", n_layer=1, d_model=32, n_head=2, vocab_size=61)
    cfg = TrainConfig(steps=1, batch_size=2, distributed="fsdp")
    with pytest.raises(ConfigError, match="train.distributed fsdp needs torchrun"):
        train(model, lm_loss, RandomWindows(torch.randint(0, 61, (500,)), 2, 8, seed=0), cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="fp16 with train.distributed fsdp is not supported"):
        TrainConfig(precision="fp16", distributed="fsdp")
