"""Training-loop invariants: accumulation, resume, DDP, non-finite loss, schedule."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rizzearch.data.batches import EvalWindows, RandomWindows
from rizzearch.errors import ConfigError, DataError
from rizzearch.models import build_model
from rizzearch.training.losses import lm_loss
from rizzearch.testing import assert_close
from rizzearch.training.loop import NonFiniteLossError, TrainConfig, lr_at, train

V = 61
TOKENS = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(1))


def tiny(dropout: float = 0.0):
    torch.manual_seed(0)
    return build_model("gpt", n_layer=2, d_model=32, n_head=2, vocab_size=V, dropout=dropout)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, seed=0)
    return TrainConfig(**{**base, **kw})


def run(tmp: Path, config: TrainConfig, model=None, **kw):
    model = model or tiny()
    res = train(model, lm_loss, RandomWindows(TOKENS, config.batch_size, 16, seed=3), config, tmp, progress=False, **kw)
    return model, res


def test_accumulation_2x4_equals_batch_of_8(tmp_path):
    m1, r1 = run(tmp_path / "a", cfg(micro_batch_size=8))
    m2, r2 = run(tmp_path / "b", cfg(micro_batch_size=2))  # 4 micro-batches of 2
    assert_close(torch.tensor([h["loss"] for h in r2.history]), torch.tensor([h["loss"] for h in r1.history]), atol=1e-5, rtol=1e-5, name="loss trajectory")
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert_close(b, a, atol=2e-5, rtol=1e-4, name=n)


def test_resume_equals_uninterrupted(tmp_path):
    config = cfg(steps=8, ckpt_every=4, keep_checkpoints=3)
    full, r_full = run(tmp_path / "full", config, tiny(dropout=0.1))

    class Interrupt(Exception):
        pass

    calls = {"n": 0}

    def stopping_loss(model, batch):
        calls["n"] += 1
        if calls["n"] > 6:  # dies during step 7, after the checkpoint at step 4
            raise Interrupt
        return lm_loss(model, batch)

    with pytest.raises(Interrupt):
        train(tiny(dropout=0.1), stopping_loss, RandomWindows(TOKENS, 8, 16, seed=3), config, tmp_path / "cut", progress=False)
    resumed = tiny(dropout=0.1)
    train(resumed, lm_loss, RandomWindows(TOKENS, 8, 16, seed=3), config, tmp_path / "cut", resume=True, progress=False)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{n} differs after resume"
    rows = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s", "peak_mem_mb")} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "cut")) == strip(rows(tmp_path / "full"))


def test_resume_after_a_metrics_line_cut_short(tmp_path):
    """A kill in the middle of a metrics write leaves half a line: resume drops it and carries on;
    a corrupt line in the middle is an error naming the file and line."""
    config = cfg(steps=4, ckpt_every=2)
    run(tmp_path, config)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines) + '{"step": 5, "lo')
    _, res = run(tmp_path, replace(config, steps=6), resume=True)
    assert res.steps == 6
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)] == [1, 2, 3, 4, 5, 6]
    metrics.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        run(tmp_path, replace(config, steps=8), resume=True)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    config = cfg(steps=6, ckpt_every=2)
    calls = {"n": 0}

    def bad_loss(model, batch):
        calls["n"] += 1
        loss, m = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), m

    model = tiny()
    with pytest.raises(NonFiniteLossError, match="step 5") as e:
        train(model, bad_loss, RandomWindows(TOKENS, 8, 16, seed=3), config, tmp_path, progress=False)
    assert "step_00000004" in str(e.value)
    ck = tmp_path / "checkpoints"
    assert json.loads((ck / "latest.json").read_text())["step"] == 4
    assert not (ck / "step_00000005").exists()


def test_eval_reports_bits_per_byte(tmp_path):
    ev = EvalWindows(TOKENS[:600], 4, 16, bytes_per_token=2.0)
    _, res = run(tmp_path, cfg(steps=2), eval_data=ev)
    e = res.final_eval
    assert abs(e["val_bpb"] - e["val_loss"] / (2.0 * 0.6931471805599453)) < 1e-9
    # EvalWindows: consecutive windows of 16 + 1 tokens, starts 0, 16, ... while start + 16 < 600 -> 37 windows
    assert e["val_tokens"] == 16 * len(range(0, 600 - 16, 16)) == 16 * 37


def test_schedule_warmup_then_cosine():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.55)
    assert lr_at(100, c) == pytest.approx(0.1)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="train.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        train(tiny(), lm_loss, RandomWindows(TOKENS, 8, 16), TrainConfig(steps=1, batch_size=8, micro_batch_size=3), "/tmp/unused-rizz", progress=False)


# -- DDP ----------------------------------------------------------------------------------------

DDP_SCRIPT = r"""
import sys, torch
from rizzearch.models import build_model
from rizzearch.training.losses import lm_loss
from rizzearch.data.batches import RandomWindows
from rizzearch.training.loop import TrainConfig, train
from safetensors.torch import save_file
V = 61
tokens = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(1))
torch.manual_seed(0)
m = build_model("gpt", n_layer=2, d_model=32, n_head=2, vocab_size=V)
cfg = TrainConfig(steps=4, batch_size=8, micro_batch_size=2, lr=3e-3, warmup_steps=1, log_every=1)
train(m, lm_loss, RandomWindows(tokens, 8, 16, seed=3), cfg, sys.argv[1], progress=False, save_checkpoints=False)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}, sys.argv[1] + "/final.safetensors")
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    single.mkdir()
    subprocess.run([sys.executable, str(script), str(single)], check=True, env=env, timeout=300)
    multi = tmp_path / "multi"
    multi.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(multi)]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    a, b = load_file(single / "final.safetensors"), load_file(multi / "final.safetensors")
    for k in a:
        assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, name=k)
    # rank 0 alone wrote the log
    assert (multi / "metrics.jsonl").is_file()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
