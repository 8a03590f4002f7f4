"""``rizz align``: preference alignment with ORPO, DPO, SFT, or SFT then DPO, for any registered model.

A thin recipe: it reads preference data (``rizzearch.data.preference``), picks the loss
(``objectives.orpo`` / ``objectives.dpo`` / ``objectives.sft``) and hands both to the one training
loop (``training/loop.py``). Methods:

- ``orpo``: one stage, NLL + lambda * odds-ratio loss, no reference model (Hong et al. 2024).
- ``sft``: NLL of the chosen responses.
- ``dpo``: DPO against the starting model as the frozen reference (Rafailov et al. 2023).
- ``sft+dpo``: the pipeline ORPO replaces: SFT for ``sft_steps`` (run folder ``OUT/sft``), then
  DPO with the SFT model as reference (``OUT``).

DPO's reference log-probs are computed once, in one no-grad pass over the data, right before the
DPO stage; the reference model is never kept in memory beside the policy. Every method is
evaluated on the same held-out pairs with the same metric (``val_pref_accuracy``: the fraction of
pairs whose chosen response has the higher mean token log-prob), and every forward pass made for
training (including the reference pass) is counted, so methods can be compared on compute.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rizzearch.data.batches import RowBatches
from rizzearch.data.preference import (
    PreferenceSet,
    check_budget,
    check_template_name,
    encode_pairs,
    get_template,
    read_preferences,
    template_name,
)
from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.objectives.dpo import DPOConfig
from rizzearch.objectives.orpo import ORPOConfig
from rizzearch.training.preference import make_dpo_loss, make_orpo_loss, make_sft_loss, precompute_reference_logps, score_pairs
from rizzearch.training.distributed import device_for, init_distributed
from rizzearch.training.loop import TrainConfig, TrainResult
from rizzearch.training.loop import train as train_loop
from rizzearch.training.lora import LoraConfig, adapters_disabled, setup_lora

METHODS = ("orpo", "dpo", "sft", "sft+dpo")


@dataclass(frozen=True)
class PreferenceDataConfig:
    """Preference data for alignment.

    Args:
        source: bundled corpus name (hh-rlhf-harmless-test) or a JSONL file: {prompt, chosen, rejected} per line,
            or HH-RLHF {chosen, rejected} dialogues (.jsonl or .jsonl.gz).
        format: auto (pairs if the first record has a prompt field, else hh), pairs, or hh.
        template: chat template: auto (the model's own chat template when its tokenizer has one, e.g. with
            --init smollm2, else chat), model (the model's own), chat ("User: ...\\nAssistant: ...") or plain
            (texts used as they are).
        max_length: most tokens of prompt + response; longer prompts are cut from the left.
        max_response_length: per-response token budget (end-of-text included), cut at the end; None: max_length // 2.
            Must be < max_length, so truncation never empties a prompt or a response.
        limit: use at most this many pairs (None: all).
        val_fraction: fraction of the pairs held out for the preference-accuracy evaluation.
        on_error: what to do with a malformed record: raise (stop with file, line and field), skip (drop it and
            list it in OUT/data_problems.txt), or auto (raise for your own files, skip for bundled corpora).
        tokenizer: without --init: bpe (train a byte-level BPE on the training pairs), byte, or a tokenizer.json path.
            With --init the checkpoint's tokenizer is used.
        vocab_size: BPE vocabulary size.
    """

    source: str = "hh-rlhf-harmless-test"
    format: Literal["auto", "pairs", "hh"] = "auto"
    template: str = "auto"
    max_length: int = 256
    max_response_length: int | None = None
    limit: int | None = None
    val_fraction: float = 0.05
    on_error: Literal["auto", "raise", "skip"] = "auto"
    tokenizer: str = "bpe"
    vocab_size: int = 1024

    def __post_init__(self):
        check_budget(self.max_length, self.max_response_length)
        check_template_name(self.template)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1, got {self.limit}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


# ----------------------------------------------------------------------------------------------
# Compute accounting and evaluation


class ForwardCounter:
    """Counts forward calls, sequences (rows) and tokens of a model through a forward hook.

    ``paused()`` excludes work (evaluation) from the count.
    """

    def __init__(self, model: torch.nn.Module):
        self.calls = self.sequences = self.tokens = 0
        self._active = True
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self._active and args and isinstance(args[0], Tensor) and args[0].dim() == 2:
            self.calls += 1
            self.sequences += int(args[0].shape[0])
            self.tokens += int(args[0].numel())

    @contextlib.contextmanager
    def paused(self):
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def snapshot(self) -> dict:
        return {"forward_calls": self.calls, "forward_sequences": self.sequences, "forward_tokens": self.tokens}

    def close(self) -> None:
        self._handle.remove()


@torch.no_grad()
def evaluate_preferences(model, tensors: dict[str, Tensor], batch_size: int = 32, device=None, chunk_size: int | None = None) -> dict:
    """Held-out preference metrics of ``model`` (eval mode, no grad), the same for every method.

    pref_accuracy: fraction of pairs with mean token log-prob of chosen > rejected (ties count as
    wrong); chosen_logp / rejected_logp: mean over pairs of the mean token log-probs; logp_margin;
    chosen_nll: token-mean NLL of the chosen responses.
    """
    wins = n = 0
    sums = {"chosen_logp": 0.0, "rejected_logp": 0.0}
    nll_sum = nll_tok = 0.0
    for fw in score_pairs(model, tensors, batch_size, chunk_size=chunk_size, device=device):
        wins += int((fw.chosen.mean > fw.rejected.mean).sum())
        n += fw.chosen.mean.shape[0]
        sums["chosen_logp"] += float(fw.chosen.mean.sum())
        sums["rejected_logp"] += float(fw.rejected.mean.sum())
        nll_sum -= float(fw.chosen.sum.sum())
        nll_tok += float(fw.chosen.count.sum())
    out = {"pref_accuracy": wins / n, **{k: v / n for k, v in sums.items()}}
    out["logp_margin"] = out["chosen_logp"] - out["rejected_logp"]
    out["chosen_nll"] = nll_sum / nll_tok
    return out


# ----------------------------------------------------------------------------------------------
# Stages


def run_stage(
    method: Literal["orpo", "dpo", "sft"],
    model: torch.nn.Module,
    train_set: PreferenceSet,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    val_set: PreferenceSet | None = None,
    orpo: ORPOConfig = ORPOConfig(),
    dpo: DPOConfig = DPOConfig(),
    counter: ForwardCounter | None = None,
    meta: dict | None = None,
    progress: bool = True,
    save_checkpoints: bool = True,
    resume: bool = False,
    reference_base: bool = False,
) -> tuple[TrainResult, dict]:
    """One alignment stage through the shared loop -> (TrainResult, compute record).

    For ``dpo`` the current ``model`` is the reference: its log-probs are precomputed here (one
    no-grad pass, counted in ``reference_*``) before training starts. With ``resume`` the loop
    continues from ``run_dir``'s latest checkpoint; ``model`` must then hold the stage's *starting*
    weights (the DPO reference is computed from them before the checkpoint's weights are loaded).
    ``reference_base``: compute DPO's reference with the LoRA adapters off (the base model).
    """
    own_counter = counter is None
    counter = counter or ForwardCounter(model)
    before = counter.snapshot()
    t0 = time.perf_counter()
    tensors = dict(train_set.tensors)
    device = device_for(config.device, init_distributed(config.device))
    ref_record = {}
    if method == "orpo":
        loss_fn = make_orpo_loss(orpo)
    elif method == "sft":
        loss_fn = make_sft_loss(orpo.chunk_size)
    elif method == "dpo":
        model.to(device)
        r0 = counter.snapshot()
        tr = time.perf_counter()
        # with LoRA, plain DPO's reference is the base: the same weights with the adapters off (no copy);
        # sft+dpo's reference is the SFT model, i.e. with its adapters on
        off = adapters_disabled(model) if reference_base else contextlib.nullcontext()
        with off:
            tensors.update(precompute_reference_logps(model, tensors, dpo.ref_batch_size, dpo.chunk_size, device=device))
        r1 = counter.snapshot()
        ref_record = {f"reference_{k}": r1[k] - r0[k] for k in r1} | {"reference_seconds": time.perf_counter() - tr}
        loss_fn = make_dpo_loss(dpo)
    else:
        raise ConfigError(f"method: unknown stage {method!r}; choose one of orpo, dpo, sft")
    eval_fn = None
    if val_set is not None:
        def eval_fn(m):
            with counter.paused():
                return {f"val_{k}": v for k, v in evaluate_preferences(m, val_set.tensors, config.batch_size, device=device, chunk_size=orpo.chunk_size).items()}

    source = RowBatches(tensors, config.batch_size, seed=config.seed)
    try:
        result = train_loop(model, loss_fn, source, config, run_dir, eval_fn=eval_fn, meta={**(meta or {}), "objective": method},
                            progress=progress, save_checkpoints=save_checkpoints, resume=resume)
    finally:
        if own_counter:
            counter.close()
    after = counter.snapshot()
    record = {"method": method, "steps": result.steps, "seconds": time.perf_counter() - t0, "train_seconds": result.seconds,
              **{k: after[k] - before[k] for k in after}, **ref_record}
    return result, record


def _build_tokenizer(data: PreferenceDataConfig, pairs):
    from rizzearch.data.tokenizer import make_tokenizer

    tpl = get_template(template_name(data.template, None) if data.template != "model" else "chat")  # a new tokenizer has no template
    return make_tokenizer(data.tokenizer, data.vocab_size, lambda: [
        tpl.render_prompt(p.messages) + tpl.render_response(p.chosen) + "\n" + tpl.render_response(p.rejected) for p in pairs])


def align(
    method: Literal["orpo", "dpo", "sft", "sft+dpo"] = "orpo",
    init: str | None = None,
    model: str | None = None,
    model_config: dict | None = None,
    data: PreferenceDataConfig = PreferenceDataConfig(),
    train: TrainConfig = TrainConfig(steps=200, batch_size=8, lr=1e-4, warmup_steps=10, weight_decay=0.0),
    orpo: ORPOConfig = ORPOConfig(),
    dpo: DPOConfig = DPOConfig(),
    sft_steps: int | None = None,
    lora: LoraConfig = LoraConfig(),
    out: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Preference-align a model (gpt, xlstm, rwkv) with ORPO, DPO, SFT, or SFT then DPO.

    Start from a pretrained checkpoint (--init RUN, e.g. the output of `rizz train`) or from a
    freshly initialised model (--model, --model_config). Writes the run folder OUT: config.yaml,
    tokenizer.json, metrics.jsonl, checkpoints/, data_problems.txt (skipped records) and
    align_summary.json (held-out preference accuracy, forward passes, wall time). For sft+dpo the SFT
    stage is in OUT/sft and the final (DPO) model in OUT. Resume a killed run with
    ``--resume true --out OUT`` and the same settings: it continues bit for bit.

    Args:
        method: orpo (one stage, no reference model), dpo (reference = the starting model), sft, or sft+dpo.
        init: checkpoint or run folder to start from (its tokenizer is used); None: a new model.
        model: registered model name when starting without --init: gpt (default), xlstm or rwkv. With
            --init it may be given only if it names the checkpoint's own model.
        model_config: config overrides of the new model (vocab_size defaults to the tokenizer's).
        data: preference data, chat template and truncation budget.
        train: training loop settings; for sft+dpo they apply to both stages (steps = the DPO stage).
        orpo: ORPO settings (lambda, NLL mode).
        dpo: DPO settings (beta).
        sft_steps: steps of the SFT stage of sft+dpo (None: train.steps).
        lora: LoRA adapters on the starting model (--lora.r 16 --lora.alpha 32 [--lora.targets ...]), every
            method: only the adapters train and are checkpointed; DPO's reference is the base model with
            the adapters off (no second copy of the weights). r = 0 (default): full fine-tuning.
        out: run folder (default: runs/align-<timestamp>).
        resume: continue the alignment run in ``out`` from its latest checkpoint(s).
        progress: show progress bars.
    """
    from rizzearch.runs import RunLock, make_run_dir, seed_everything
    from rizzearch.training.distributed import check_device

    if method not in METHODS:
        raise ConfigError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if sft_steps is not None and sft_steps < 1:
        raise ConfigError(f"sft_steps must be >= 1, got {sft_steps}")
    seed_everything(train.seed)  # before the model is built: same config, same model
    check_device(train.device)
    run = make_run_dir(out, "align", write_config=False)
    with RunLock(run, "align"):
        return _align_locked(run, method, init, model, model_config, data, train, orpo, dpo, sft_steps, resume, progress, lora)


def _has_checkpoint(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any(root.glob("step_*"))


def _align_data_record(data: PreferenceDataConfig, method: str, init: str | None, sft_steps: int | None) -> dict:
    """What an alignment checkpoint records of its inputs, compared on resume (the data by content)."""
    from rizzearch.data.text import resolve_source

    src = resolve_source(data.source)
    digest = None
    if src.is_file():
        import hashlib

        digest = hashlib.sha256(src.read_bytes()).hexdigest()
    return {"source_sha256": digest, **{k: v for k, v in asdict(data).items() if k != "source"}, "method": method,
            "init": None if init is None else str(init), "sft_steps": sft_steps}


def _start_model(init, model, model_config, data: PreferenceDataConfig, pairs, run: Path, resume: bool):
    """The starting model and tokenizer: --init's checkpoint, or a new (seeded) model -> (net, tok, name)."""
    from rizzearch.data.tokenizer import Tokenizer
    from rizzearch.models.base import build_model
    from rizzearch.training import checkpoint as ckpt_io

    if init is not None:
        if model_config:
            raise ConfigError("model_config cannot be combined with --init (the checkpoint fixes the architecture)")
        net, tok, meta = ckpt_io.load_any(init, device="cpu")
        if tok is None:
            raise CheckpointError(f"{init}: no tokenizer (tokenizer.json next to the checkpoint, or the GGUF vocabulary)")
        net.train()
        if model is not None and model != meta["model"]:
            raise ConfigError(f"model: {model!r} given, but --init {init} is a {meta['model']!r} checkpoint; drop --model "
                              "(the checkpoint fixes the architecture)")
        return net, tok, meta["model"]
    if resume:  # the tokenizer the run's checkpoints were trained with
        f = run / "tokenizer.json"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; cannot resume without the run's tokenizer")
        tok = Tokenizer.load(f)
    else:
        tok = _build_tokenizer(data, pairs)
    overrides = dict(model_config or {})
    overrides.setdefault("vocab_size", tok.vocab_size)
    if int(overrides["vocab_size"]) < tok.vocab_size:
        raise ConfigError(f"model_config.vocab_size ({overrides['vocab_size']}) is smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    name = model or "gpt"
    return build_model(name, **overrides), tok, name


def _check_align_resume(run: Path, method: str, train: TrainConfig, sft_cfg: TrainConfig, record: dict, tok) -> None:
    """Refuse (naming the differences) a resume whose settings differ from the run's checkpoints."""
    from rizzearch.data.tokenizer import tokenizer_fingerprint
    from rizzearch.training import checkpoint as ckpt_io
    from rizzearch.training.loop import check_resume

    stages = ([(run / "sft", sft_cfg)] if method == "sft+dpo" else []) + [(run, train)]
    found = [(d, c) for d, c in stages if _has_checkpoint(d)]
    if not found:
        raise CheckpointError(f"{run}: no checkpoint to resume from; run without --resume to start it")
    for d, c in found:
        meta = ckpt_io.read_meta(check_resume(d, c, record))
        if meta.get("tokenizer") not in (None, tokenizer_fingerprint(tok)):
            raise CheckpointError(f"{d}: checkpoint was trained with another tokenizer than the one this run would use")


def _align_locked(run: Path, method, init, model, model_config, data, train, orpo, dpo, sft_steps, resume, progress,
                  lora: LoraConfig = LoraConfig()) -> dict:
    from dataclasses import replace

    from rizzearch.corpora import list as corpus_names
    from rizzearch.data.tokenizer import tokenizer_fingerprint
    from rizzearch.runs import write_run_config
    from rizzearch.training import checkpoint as ckpt_io

    for d in (run, run / "sft"):
        ckpt_io.clean_partial_checkpoints(d / "checkpoints")
    if not resume and (_has_checkpoint(run) or _has_checkpoint(run / "sft")):
        raise ConfigError(f"{run}: already holds an alignment run; pass --resume true to continue it, or choose another --out (nothing was overwritten)")
    if resume and not (_has_checkpoint(run) or _has_checkpoint(run / "sft")):
        raise CheckpointError(f"{run}: no checkpoint to resume from; run without --resume to start it")
    on_error = data.on_error if data.on_error != "auto" else ("skip" if data.source in corpus_names() else "raise")
    pairs, problems = read_preferences(data.source, data.format, on_error, data.limit)
    net, tok, model_name = _start_model(init, model, model_config, data, pairs, run, resume)
    data = replace(data, template=template_name(data.template, tok))  # "auto" recorded as what it resolved to
    setup_lora(net, lora)
    record = _align_data_record(data, method, init, sft_steps)
    sft_cfg = replace(train, steps=sft_steps or train.steps)
    if resume:
        _check_align_resume(run, method, train, sft_cfg, record, tok)
    ps = encode_pairs(pairs, tok, data.template, data.max_length, data.max_response_length, on_error=on_error)
    # validated: from here on the run folder is written
    write_run_config(run)
    tok.save(run / "tokenizer.json")
    problems = problems + ps.problems
    if problems:
        (run / "data_problems.txt").write_text("\n".join(problems) + "\n")
    train_set, val_set = ps.split(data.val_fraction, seed=train.seed)
    print(f"align {method}: model {model_name} ({net.num_params():,} parameters); {len(train_set)} train / "
          f"{len(val_set) if val_set else 0} held-out pairs; {len(problems)} records skipped"
          f"{' (see data_problems.txt)' if problems else ''}; {ps.stats['truncated_prompts']} prompts and "
          f"{ps.stats['truncated_responses']} responses truncated; run folder {run}")

    meta = {"tokenizer": tokenizer_fingerprint(tok), "align_method": method, "data": record}
    counter = ForwardCounter(net)
    stages = []
    before = evaluate_preferences(net, val_set.tensors, train.batch_size, chunk_size=orpo.chunk_size) if val_set else {}
    common = dict(val_set=val_set, orpo=orpo, dpo=dpo, counter=counter, meta=meta, progress=progress)
    try:
        if method == "sft+dpo":
            tok.save(run / "sft" / "tokenizer.json")
            # a resumed run whose SFT stage had finished reloads it (no steps left) to get the DPO start
            _, rec = run_stage("sft", net, train_set, sft_cfg, run / "sft", resume=resume and _has_checkpoint(run / "sft"), **common)
            stages.append(rec)
            result, rec = run_stage("dpo", net, train_set, train, run, resume=resume and _has_checkpoint(run), **common)
        else:
            result, rec = run_stage(method, net, train_set, train, run, resume=resume, reference_base=method == "dpo", **common)
        stages.append(rec)
    finally:
        counter.close()
    return _write_summary(run, method, model_name, result, train_set, val_set, problems, ps, before, stages, orpo, dpo, train)


def _write_summary(run, method, model_name, result, train_set, val_set, problems, ps, before, stages, orpo, dpo, train) -> dict:
    final = {k[len("val_"):]: v for k, v in result.final_eval.items() if k.startswith("val_")}
    summary = {
        "method": method,
        "model": model_name,
        "run": str(run),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "pairs": {"train": len(train_set), "val": len(val_set) if val_set else 0, "skipped": len(problems)},
        "data": ps.stats,
        "val_before": before,
        "val_after": final,
        "stages": stages,
        "forward_sequences": sum(s["forward_sequences"] for s in stages),
        "forward_tokens": sum(s["forward_tokens"] for s in stages),
        "seconds": sum(s["seconds"] for s in stages),
        "config": {"orpo": asdict(orpo), "dpo": asdict(dpo), "train": asdict(train)},
    }
    (run / "align_summary.json").write_text(json.dumps(summary, indent=2))
    if final:
        print(f"held-out preference accuracy {before.get('pref_accuracy', float('nan')):.3f} -> {final['pref_accuracy']:.3f}; "
              f"{summary['forward_sequences']:,} sequences forwarded for training in {summary['seconds']:.1f}s; checkpoint {result.checkpoint}")
    return summary
