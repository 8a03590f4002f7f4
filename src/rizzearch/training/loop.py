"""The one training loop. Recipes (pretraining, goldfish, alignment, studies) only choose the data
and the loss; everything else lives here:

AdamW (no decay on 1-D parameters), linear warmup + cosine decay, gradient accumulation, gradient
clipping, periodic evaluation (loss, perplexity, bits per byte), a tqdm progress bar with tokens/s,
a JSONL metrics log (with tokens/s and peak memory), atomic checkpoints (model + optimizer + RNG +
data position) with bit-for-bit ``resume``, a hard stop on a non-finite loss, DDP or FSDP2
(``training.fsdp``) under torchrun, activation checkpointing per block and mixed precision
(``training.memory``: bf16 autocast, fp16 with a gradient scaler that skips and logs steps whose
gradients overflow). A model with LoRA adapters (``training.lora``) trains only its adapters, and
its checkpoints hold only the adapters.

Batching: ``train_data.next_batch()`` returns one *global* batch of ``batch_size`` rows. Each rank
keeps its contiguous slice and splits it into micro-batches of ``micro_batch_size`` rows; the loss
of each micro-batch is scaled by 1 / (number of micro-batches) so the gradient equals the
gradient of the mean loss over the global batch, whatever the accumulation and world size.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor

from rizzearch.data.batches import split_batch
from rizzearch.errors import ConfigError, RizzError
from rizzearch.models.base import eval_mode
from rizzearch.runs import seed_everything
from rizzearch.training import checkpoint as ckpt_io
from rizzearch.training.distributed import DistInfo, all_reduce_mean, any_true, barrier, device_for, init_distributed
from rizzearch.training.lora import lora_layers
from rizzearch.training.memory import autocast, checkpoint_blocks, grad_scaler, peak_memory_mb, reset_peak_memory
from rizzearch.training.resume import check_resume, restore  # noqa: F401  (check_resume: re-exported for the recipes)

LossFn = Callable[[torch.nn.Module, dict], "tuple[Tensor, dict]"]


class NonFiniteLossError(RizzError):
    """The loss (or gradient norm) became NaN/inf; the run stops and keeps its last checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop.

    Args:
        steps: number of optimizer steps.
        batch_size: rows per optimizer step, summed over gradient accumulation and ranks.
        micro_batch_size: rows per forward/backward on one rank (None: batch_size / world size).
        lr: peak learning rate.
        min_lr_ratio: final learning rate of the cosine decay as a fraction of lr.
        warmup_steps: linear warmup steps from 0 to lr.
        weight_decay: AdamW weight decay on matrices (never on 1-D parameters such as norms and biases).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: clip the global gradient norm to this value (0 disables).
        eval_every: evaluate every this many steps (0: only at the end).
        log_every: write a metrics row every this many steps.
        ckpt_every: write a checkpoint every this many steps (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        seed: seed for model-side randomness (dropout) and the data order.
        device: cpu, cuda, or cuda:N.
        precision: fp32, bf16 (autocast) or fp16 (autocast + gradient scaler; steps whose gradients
            overflow are skipped and logged). Weights and optimizer state stay fp32; recurrent
            states, stabilisers and the ORPO log-odds are fp32 in every precision.
        checkpointing: "blocks" recomputes each block's activations in the backward pass
            (activation checkpointing: less memory, about one more forward of compute); "none".
        distributed: under torchrun, "ddp" (replicated weights) or "fsdp" (FSDP2: weights, gradients
            and optimizer state sharded per block).
        max_seconds: stop early (after a full step) when this much wall time has passed (None: no limit).
    """

    steps: int = 200
    batch_size: int = 16
    micro_batch_size: int | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "cpu"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpointing: Literal["none", "blocks"] = "none"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    max_seconds: float | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        choices = {"precision": ("fp32", "bf16", "fp16"), "checkpointing": ("none", "blocks"), "distributed": ("ddp", "fsdp")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.precision == "fp16" and self.distributed == "fsdp":
            raise ConfigError("train.precision fp16 with train.distributed fsdp is not supported (per-shard overflow checks); use bf16")


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0
    tokens: int = 0
    stopped_early: bool = False

    @property
    def final_eval(self) -> dict:
        return self.evals[-1] if self.evals else {}

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr_ratio * lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one pass over each parameter) is much faster than foreach on CPU and GPU
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):  # older torch or an unsupported device/dtype
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def _to_float(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, Tensor) else float(v)


def _count_tokens(batch: dict, rows: int) -> int:
    """Tokens processed by one micro-batch: input_ids, else the attention masks, else every
    2-D integer tensor (e.g. chosen + rejected sequences), else rows."""
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    ids = [v for v in batch.values() if v.dim() == 2 and not v.is_floating_point()]
    return int(sum(v.numel() for v in ids)) if ids else rows


def _autocast(cfg: TrainConfig, device: torch.device):
    return autocast(cfg.precision, device)


@torch.no_grad()
def evaluate_loss(model, loss_fn: LossFn, eval_data, cfg: TrainConfig, device) -> dict:
    """Token-weighted mean of ``loss_fn`` over ``eval_data.batches()`` (+ ppl and bits/byte)."""
    total, count, extra = 0.0, 0, {}
    with eval_mode(model):
        for batch in eval_data.batches():
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(cfg, device):
                loss, metrics = loss_fn(model, batch)
            n = int(metrics.get("tokens", batch["input_ids"].numel() if "input_ids" in batch else 1))
            total += float(loss) * n
            count += n
            for k, v in metrics.items():
                if k not in ("loss", "tokens"):
                    extra.setdefault(k, []).append(_to_float(v))
    val = total / max(count, 1)
    out = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_tokens": count}
    bpt = getattr(eval_data, "bytes_per_token", None)
    if bpt:
        out["val_bpb"] = val / math.log(2) / bpt
    out.update({f"val_{k}": sum(v) / len(v) for k, v in extra.items()})
    return out


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train_data,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    eval_data=None,
    eval_loss_fn: LossFn | None = None,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
    save_checkpoints: bool = True,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps; see the module docstring.

    Args:
        model: a registered CausalLM (or any module when ``save_checkpoints`` is False).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``; metrics may include ``tokens``.
        train_data: a BatchSource (``next_batch``, ``state_dict``, ``load_state_dict``).
        config: loop settings.
        run_dir: run folder (metrics.jsonl and checkpoints/ are written here).
        eval_data: optional EvalSource (``batches()``, optional ``bytes_per_token``).
        eval_loss_fn: the loss reported on ``eval_data`` (default: ``loss_fn``); e.g. the all-token
            ``lm_loss`` for a goldfish run, so its validation loss compares with a standard run's.
        eval_fn: optional extra evaluation ``fn(model) -> dict`` run at every evaluation.
        resume: continue from the latest checkpoint in ``run_dir`` (bit-for-bit on CPU).
        meta: extra fields stored in each checkpoint's model.json (e.g. tokenizer fingerprint).
        progress: show a tqdm progress bar (rank 0 only).
        save_checkpoints: write checkpoints (at ckpt_every and at the end).
    """
    run = _Run(model, loss_fn, train_data, config, Path(run_dir), eval_data, eval_loss_fn, eval_fn, meta, save_checkpoints)
    return run.loop(resume, progress)


class _Run:
    """One training run: what every step shares (model, optimizer, scaler, ranks, log), one method per step."""

    def __init__(self, model, loss_fn: LossFn, train_data, cfg: TrainConfig, run: Path, eval_data, eval_loss_fn, eval_fn,
                 meta: dict | None, save_checkpoints: bool):
        self.model, self.loss_fn, self.train_data, self.cfg, self.run = model, loss_fn, train_data, cfg, run
        self.eval_data, self.eval_loss_fn, self.eval_fn, self.save_checkpoints = eval_data, eval_loss_fn or loss_fn, eval_fn, save_checkpoints
        self.info: DistInfo = init_distributed(cfg.device)
        self.device = device_for(cfg.device, self.info)
        if self.info.is_main:
            run.mkdir(parents=True, exist_ok=True)
        self.micro = cfg.micro_batch_size or cfg.batch_size // self.info.world_size
        if cfg.batch_size % (self.micro * self.info.world_size):
            raise ConfigError(f"train.batch_size ({cfg.batch_size}) must be a multiple of micro_batch_size ({self.micro}) "
                              f"x world size ({self.info.world_size})")
        self.accum = cfg.batch_size // (self.micro * self.info.world_size)
        model.to(self.device)
        self.fsdp = cfg.distributed == "fsdp"
        if self.fsdp:
            fsdp_io().check_fsdp(self.info.enabled)
        if cfg.checkpointing == "blocks":
            checkpoint_blocks(model)
        lora = getattr(model, "lora_config", None) if lora_layers(model) else None
        self.ckpt_meta = ckpt_io.model_meta(model, **(meta or {}), **({"lora": lora} if lora else {})) if save_checkpoints else {}
        self.aliases = ckpt_io.tied_aliases(model)
        self.data_record = (meta or {}).get("data")
        self.log_file = None
        self.skipped = 0

    def setup(self, resume: bool) -> tuple[int, list[dict]]:
        """Resume check and weights, sharding, optimizer, scaler, seeds -> (start step, logged rows kept)."""
        cfg, model, info = self.cfg, self.model, self.info
        self.last_ckpt = self.resumed = check_resume(self.run, cfg, self.data_record) if resume else None
        if self.resumed is not None:
            ckpt_io.load_model_weights(model, self.resumed)  # before sharding: every rank reads the full weights
        if self.fsdp:
            fsdp_io().shard_model(model)
        self.optimizer = make_optimizer(model, cfg)  # after sharding: it holds the sharded parameters
        self.scaler = grad_scaler(cfg.precision, self.device)
        seed_everything(cfg.seed + info.rank)
        if info.is_main and self.save_checkpoints:
            ckpt_io.clean_partial_checkpoints(self.run / "checkpoints")  # .tmp-step_* of a killed writer (the folder is ours)
        opt = self.optimizer
        load_optimizer = (lambda sd: fsdp_io().load_optimizer_state(model, opt, sd)) if self.fsdp else opt.load_state_dict
        start_step, history = restore(self.run, load_optimizer, self.train_data, info, self.resumed, self.scaler)
        reset_peak_memory(self.device)
        self.ddp_model = model
        if info.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return start_step, history

    def loop(self, resume: bool, progress: bool) -> TrainResult:
        """Setup, then ``config.steps`` optimizer steps with logging, evaluation and checkpoints."""
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.info
        start_step, history = self.setup(resume)
        # logged rows are train rows (with "loss") or evaluation rows (val_loss and/or eval_fn metrics)
        self.result = result = TrainResult(steps=start_step, history=[r for r in history if "loss" in r],
                                           evals=[r for r in history if "loss" not in r])
        self.log_file = open(self.run / "metrics.jsonl", "a") if info.is_main else None
        self.bar = tqdm(total=cfg.steps, initial=start_step, disable=not (progress and info.is_main), desc="train",
                        dynamic_ncols=True, mininterval=1.0)
        self.t0 = self.window_t = time.perf_counter()
        self.window_tokens = self.tokens_seen = 0
        try:
            self.model.train()
            for step in range(start_step, cfg.steps):
                done = self.step(step)
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                    self.evaluate(done)
                if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
                    self.checkpoint(done)
                if cfg.max_seconds is not None and time.perf_counter() - self.t0 > cfg.max_seconds and done < cfg.steps:
                    result.stopped_early = any_true(True, info, self.device)
                    break
            if result.steps > start_step or not result.evals:
                self.evaluate(result.steps)
            if result.steps > start_step or self.resumed is None:  # a resumed run with no step left keeps its checkpoint
                self.checkpoint(result.steps)
        finally:
            self.bar.close()
            if self.log_file is not None:
                self.log_file.close()
            if cfg.checkpointing == "blocks":
                checkpoint_blocks(self.model, enabled=False)
        result.checkpoint = self.last_ckpt
        result.seconds = time.perf_counter() - self.t0
        result.tokens = self.tokens_seen * info.world_size
        return result

    def step(self, step: int) -> int:
        """One optimizer step (all micro-batches of this rank's slice of one global batch) -> steps done."""
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = self.train_data.next_batch()
        rows = next(iter(batch.values())).shape[0]
        if rows != cfg.batch_size:
            raise ConfigError(f"data source returned {rows} rows, train.batch_size is {cfg.batch_size}")
        mine = {k: v.to(self.device) for k, v in split_batch(batch, self.info.world_size)[self.info.rank].items()}
        loss, sums, bad = self.backward(mine)
        grad_norm = self.update(step, loss, bad)
        done = self.result.steps = step + 1
        self.bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            self.log_train(done, sums, loss, lr, grad_norm)
        return done

    def backward(self, mine: dict) -> tuple[Tensor, dict[str, float], bool]:
        """Forward and backward over the micro-batches (gradients synchronised on the last) -> (last loss, metric sums, non-finite?)."""
        sums: dict[str, float] = {}
        bad = False
        for i, mb in enumerate(split_batch(mine, self.accum)):
            last = i == self.accum - 1
            sync = contextlib.nullcontext() if (last or not self.info.enabled or self.fsdp) else self.ddp_model.no_sync()
            if self.fsdp:
                fsdp_io().set_gradient_sync(self.model, last)
            with sync:
                with _autocast(self.cfg, self.device):
                    loss, metrics = self.loss_fn(self.ddp_model, mb)
                if not torch.isfinite(loss):
                    bad = True
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + _to_float(v)
            n_tok = _count_tokens(mb, self.micro)
            self.window_tokens += n_tok
            self.tokens_seen += n_tok
        return loss, sums, bad

    def update(self, step: int, loss: Tensor, bad: bool) -> Tensor:
        """Clip, stop on a non-finite loss or gradient (fp16: skip and log an overflowed step), optimizer step -> grad norm."""
        cfg, scaler, optimizer = self.cfg, self.scaler, self.optimizer
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        overflow = scaler is not None and not bad and not bool(torch.isfinite(grad_norm))
        bad = bad or (not overflow and not bool(torch.isfinite(grad_norm)))
        if any_true(bad, self.info, self.device):
            where = f"last good checkpoint {self.last_ckpt} is untouched" if self.last_ckpt else "no checkpoint was written"
            hint = " (fp16 overflow in the forward: use train.precision bf16)" if cfg.precision == "fp16" else ""
            raise NonFiniteLossError(
                f"step {step + 1}: loss or gradient norm is not finite{hint} (loss {float(loss.detach()):.4g}, grad norm {float(grad_norm):.4g}); "
                f"stopped before the optimizer step; {where}. Lower train.lr or check the data."
            )
        if scaler is not None:
            scaler.step(optimizer)  # skips the update when the unscaled gradients hold inf/NaN
            scaler.update()
            if overflow:
                self.skipped += 1
                self.log({"step": step + 1, "skipped_step": "non-finite fp16 gradients (overflow): no update, loss scale lowered",
                          "loss_scale": scaler.get_scale(), "skipped_steps": self.skipped})
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def log_train(self, done: int, sums: dict[str, float], loss: Tensor, lr: float, grad_norm: Tensor) -> None:
        """A train row: mean metrics over the micro-batches, loss averaged over ranks, lr, tokens/s, peak memory."""
        avg = {k: v / self.accum for k, v in sums.items() if k != "tokens"}
        loss_mean = float(all_reduce_mean(torch.tensor(avg.get("loss", float(loss.detach())), device=self.device), self.info))
        now = time.perf_counter()
        tps = self.window_tokens * self.info.world_size / max(now - self.window_t, 1e-9)
        row = {"step": done, **avg, "loss": loss_mean, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps,
               "peak_mem_mb": peak_memory_mb(self.device), "elapsed_s": now - self.t0}
        if self.scaler is not None:
            row.update(loss_scale=self.scaler.get_scale(), skipped_steps=self.skipped)
        self.window_tokens, self.window_t = 0, now
        self.result.history.append(row)
        self.log(row)
        self.bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{tps:,.0f}")

    def log(self, row: dict) -> None:
        if self.log_file is not None:
            self.log_file.write(json.dumps(row) + "\n")
            self.log_file.flush()

    def evaluate(self, step: int) -> None:
        row: dict = {"step": step}
        if self.eval_data is not None:
            row.update(evaluate_loss(self.model, self.eval_loss_fn, self.eval_data, self.cfg, self.device))
        if self.eval_fn is not None:
            row.update(self.eval_fn(self.model))
        if len(row) > 1:
            self.result.evals.append(row)
            self.log(row)
            if "val_loss" in row:
                self.bar.set_postfix(loss=f"{self.result.final_loss:.4f}", val=f"{row['val_loss']:.4f}")

    def checkpoint(self, step: int) -> None:
        """Model (or adapters), optimizer, data position and every rank's RNG, written atomically by rank 0."""
        if not self.save_checkpoints:
            return
        info, model = self.info, self.model
        rng = ckpt_io.rng_state()
        if info.enabled:
            gathered: list = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        weights = ckpt_io.checkpoint_weights(model, self.fsdp, self.aliases)  # collectives under FSDP: every rank
        optim = fsdp_io().full_optimizer_state(model, self.optimizer) if self.fsdp else self.optimizer.state_dict()
        if info.is_main:
            state = {"optimizer": optim, "data": self.train_data.state_dict(), "rng": rng, "step": step, "config": asdict(self.cfg)}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            self.last_ckpt = ckpt_io.save_checkpoint(self.run / "checkpoints", step, model, self.ckpt_meta, state,
                                                     keep=self.cfg.keep_checkpoints, weights=weights)
        barrier(info)


def fsdp_io():
    """``rizzearch.training.fsdp`` (imported only by FSDP runs)."""
    from rizzearch.training import fsdp

    return fsdp
