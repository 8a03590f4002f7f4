"""Thin recipes behind ``rizz train``, ``rizz generate`` and ``rizz eval``.

A recipe only chooses data and loss; the loop in ``training/loop.py`` does the rest. The function
signatures below are the CLI and YAML schema (see ``rizzearch.cli``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rizzearch.data.batches import EvalWindows, RandomWindows
from rizzearch.data.text import prepare_text, read_source, read_source_digest, split_text
from rizzearch.data.tokenizer import Tokenizer, make_tokenizer, tokenizer_fingerprint
from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.models.base import build_model, generate
from rizzearch.objectives.goldfish import GoldfishConfig
from rizzearch.runs import RunLock, make_run_dir, seed_everything, write_run_config
from rizzearch.training import checkpoint as ckpt_io
from rizzearch.training.distributed import check_device
from rizzearch.training.losses import GoldfishLoss, lm_loss
from rizzearch.training.loop import TrainConfig, TrainResult, check_resume
from rizzearch.training.lora import LoraConfig, setup_lora
from rizzearch.training.loop import train as train_loop


@dataclass(frozen=True)
class DataConfig:
    """Text data for pretraining.

    Args:
        source: a bundled corpus name (e.g. tinyshakespeare, wikitext-2-valid) or a UTF-8 text file.
        tokenizer: "bpe" (train a byte-level BPE on the training split; the default), "byte" (one
            token per byte), or the path of an existing tokenizer.json. Not with --init (the
            pretrained model's own tokenizer is used).
        vocab_size: BPE vocabulary size (default 1024; ignored for "byte" and for a given tokenizer.json).
        seq_len: training context length in tokens.
        val_fraction: fraction of the text (at its end) held out for validation.
        eval_batches: validation batches per evaluation (None: the whole validation split).
    """

    source: str = "tinyshakespeare"
    tokenizer: str | None = None
    vocab_size: int | None = None
    seq_len: int = 128
    val_fraction: float = 0.1
    eval_batches: int | None = 20

    def __post_init__(self):
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"data.vocab_size must be >= 1, got {self.vocab_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"data.eval_batches must be >= 1 or null, got {self.eval_batches}")


def build_tokenizer(data: DataConfig, run: Path, resume: bool = False) -> Tokenizer:
    """The run's tokenizer. A resumed run reuses ``run/tokenizer.json`` (the one its checkpoint was
    trained with); a new run always builds the one ``data.tokenizer`` names, so a tokenizer.json left
    by an earlier failed attempt is never picked up silently. Nothing is written here."""
    existing = run / "tokenizer.json"
    if resume:
        if not existing.is_file():
            raise CheckpointError(f"{existing}: missing; cannot resume without the run's tokenizer")
        return Tokenizer.load(existing)
    return make_tokenizer(data.tokenizer or "bpe", data.vocab_size or 1024, lambda: [split_text(read_source(data.source)[0], data.val_fraction)[0]])


def data_record(data: DataConfig, init: str | None = None) -> dict:
    """What a checkpoint records of its data, compared on resume: the corpus by content (sha256 and
    size of its bytes, not its path), the tokenizer setting (or the --init source whose tokenizer
    is used), the split and the context length."""
    _, _, digest = read_source_digest(data.source)
    rec = {"corpus_sha256": digest["sha256"], "corpus_bytes": digest["bytes"], "tokenizer": data.tokenizer or "bpe",
           "seq_len": data.seq_len, "val_fraction": data.val_fraction}
    if init is not None:
        rec["tokenizer"] = f"init:{init}"
        rec["init"] = str(init)  # a LoRA run's checkpoints hold only adapters: their base is rebuilt from here
    elif rec["tokenizer"] == "bpe":
        rec["vocab_size"] = data.vocab_size or 1024
    return rec


def build_objective(objective: str, **options):
    """``loss_fn(model, batch)`` for a named objective."""
    if objective == "lm":
        return lm_loss
    if objective == "goldfish":
        # options: goldfish (GoldfishConfig), protected_ids (special tokens never dropped)
        return GoldfishLoss(options.get("goldfish") or GoldfishConfig(), options.get("protected_ids", ()))
    raise ConfigError(f"objective: unknown objective {objective!r}; choose one of: lm, goldfish")


def train(
    model: str | None = None,
    model_config: dict | None = None,
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    objective: str = "lm",
    goldfish: GoldfishConfig = GoldfishConfig(),
    lora: LoraConfig = LoraConfig(),
    out: str | None = None,
    resume: bool = False,
    progress: bool = True,
    init: str | None = None,
) -> TrainResult:
    """Pretrain a registered model (gpt, xlstm, rwkv) on a text corpus, or fine-tune a pretrained one (--init).

    Writes everything into one run folder: config.yaml, tokenizer.json, data/ (token shards),
    metrics.jsonl and checkpoints/. Resume an interrupted run with ``--resume true --out RUN``.

    Args:
        model: registered model name: gpt (default), xlstm, rwkv or llama. With --init it may be
            given only if it names the pretrained model's own.
        model_config: overrides of the model's config dataclass (e.g. --model_config.d_model 128);
            vocab_size defaults to the tokenizer's.
        data: text corpus, tokenizer and context length.
        train: training loop settings (steps, batch size, learning rate, ...).
        objective: training objective: lm (next-token cross-entropy) or goldfish (cross-entropy
            on all but about 1 in k tokens, Hans et al. 2024; settings under --goldfish.*).
        goldfish: goldfish loss settings (k, h, strategy, seed, protected_ids), used when
            objective is goldfish; the tokenizer's special tokens are always protected.
        lora: LoRA adapters (--lora.r 16 --lora.alpha 32 [--lora.targets ...]): only they train and
            only they are checkpointed; r = 0 (default) trains every weight.
        out: run folder (default: runs/train-<timestamp>).
        resume: continue from the latest checkpoint in ``out``.
        progress: show a progress bar.
        init: fine-tune from this model instead of a new one, with its own tokenizer: a run or
            checkpoint folder, an HF model folder, a .gguf file or a short name (smollm2).
    """
    seed_everything(train.seed)  # before anything draws a random number: same config, same model
    check_device(train.device)
    run = make_run_dir(out, "train", write_config=False)
    with RunLock(run, "train"):
        return _train_locked(run, model, model_config, data, train, objective, goldfish, resume, progress, init, lora)


def _validated_start(run: Path, model: str | None, model_config: dict | None, data: DataConfig, train: TrainConfig, resume: bool,
                     init: str | None = None):
    """Every check a (resumed) training run needs, before anything is written -> (tokenizer, model, data record)."""
    ckpt_root = run / "checkpoints"
    ckpt_io.clean_partial_checkpoints(ckpt_root)
    if not resume and ckpt_root.is_dir() and any(ckpt_root.glob("step_*")):
        raise ConfigError(f"{run}: already has checkpoints; pass --resume true to continue it, or choose another --out (nothing was overwritten)")
    if init is not None:
        check_init_options(init, model_config, data)
    record = data_record(data, init)
    meta = None
    if resume:
        ckpt = check_resume(run, train, record)  # train and data settings, differences named
        meta = ckpt_io.read_meta(ckpt)
        expected = model or (meta["model"] if init is not None else "gpt")
        if meta["model"] != expected:
            raise CheckpointError(f"{ckpt}: checkpoint is a {meta['model']!r} model, not {expected!r}")
    if init is not None:
        tok, net = _init_model(init, model, run, meta, train.device)
        return tok, net, record
    model = model or "gpt"
    tok = build_tokenizer(data, run, resume)
    overrides = dict(model_config or {})
    if "vocab_size" in overrides and int(overrides["vocab_size"]) < tok.vocab_size:
        raise ConfigError(f"model_config.vocab_size ({overrides['vocab_size']}) is smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    overrides.setdefault("vocab_size", tok.vocab_size)
    net = build_model(model, **overrides)
    if resume:
        ckpt_io.check_tokenizer(tok, meta, str(run / "tokenizer.json"))
        theirs, ours = meta["config"], ckpt_io.model_meta(net)["config"]
        if theirs != ours:
            diffs = "; ".join(f"model_config.{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
            raise CheckpointError(f"{ckpt}: model config differs from the requested one ({diffs}); resume with the same model_config")
    return tok, net, record


def check_init_options(init: str, model_config: dict | None, data: DataConfig) -> None:
    """Options that --init makes meaningless are refused, not ignored."""
    if model_config:
        raise ConfigError(f"model_config cannot be combined with --init {init} (the pretrained model fixes the architecture)")
    if data.tokenizer is not None or data.vocab_size is not None:
        given = "data.tokenizer" if data.tokenizer is not None else "data.vocab_size"
        raise ConfigError(f"{given} cannot be combined with --init {init}: the pretrained model's own tokenizer is used")


def _init_model(init: str, model: str | None, run: Path, meta: dict | None, device: str):
    """The --init model and its tokenizer -> (tok, net). A new run loads ``init``; a resumed run
    rebuilds the checkpoint's model (its weights are restored by the loop) with the run's tokenizer."""
    if meta is not None:
        f = run / "tokenizer.json"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; cannot resume without the run's tokenizer")
        tok = Tokenizer.load(f)
        ckpt_io.check_tokenizer(tok, meta, str(f))
        if "lora" in meta:  # the checkpoints hold only the adapters: the base weights come from --init again
            return tok, ckpt_io.load_any(init, tokenizer=False)[0].train()
        return tok, build_model(meta["model"], **meta["config"])
    net, tok, info = load_source(init, device="cpu")
    if model is not None and model != info["model"]:
        raise ConfigError(f"model: {model!r} given, but --init {init} is a {info['model']!r} model; drop --model or give --model {info['model']}")
    return tok, net.train()


def _train_locked(run: Path, model: str | None, model_config: dict | None, data: DataConfig, train: TrainConfig, objective: str,
                  goldfish: GoldfishConfig, resume: bool, progress: bool, init: str | None = None,
                  lora: LoraConfig = LoraConfig()) -> TrainResult:
    tok, net, record = _validated_start(run, model, model_config, data, train, resume, init)
    model = net.registry_name
    setup_lora(net, lora)  # the base is the seeded new model or --init's; checkpoints then hold the adapters only
    write_run_config(run)  # only now: a refused resume leaves the folder as it was
    if not resume:
        tok.save(run / "tokenizer.json")
    ds = prepare_text(data.source, run / "data", tok, data.val_fraction)
    train_src = RandomWindows(ds.train, train.batch_size, data.seq_len, seed=train.seed)
    eval_src = EvalWindows(ds.val or ds.train, train.batch_size, data.seq_len, data.eval_batches, bytes_per_token=ds.bytes_per_token) if ds.meta["val"]["tokens"] > data.seq_len else None
    loss_fn = build_objective(objective, goldfish=goldfish, protected_ids=tok.special_ids)
    print(f"model {model}: {net.num_params():,} parameters; tokenizer vocab {tok.vocab_size}; "
          f"{ds.meta['train']['tokens']:,} train / {ds.meta['val']['tokens']:,} val tokens; run folder {run}")
    result = train_loop(net, loss_fn, train_src, train, run, eval_data=eval_src, eval_loss_fn=lm_loss, resume=resume,
                        meta={"tokenizer": tokenizer_fingerprint(tok), "objective": objective, "data": record,
                              **({"goldfish": asdict(goldfish)} if objective == "goldfish" else {})}, progress=progress)
    ev = result.final_eval
    summary = f"step {result.steps}: train loss {result.final_loss:.4f}"
    if "val_loss" in ev:
        summary += f", val loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}, {ev.get('val_bpb', float('nan')):.3f} bits/byte)"
    print(summary + f"; {result.seconds:.1f}s, checkpoint {result.checkpoint}")
    return result


def model_source(checkpoint: str | None, init: str | None) -> str:
    """The one model source of ``--checkpoint`` / ``--init`` (the same option under two names)."""
    if checkpoint is not None and init is not None and str(checkpoint) != str(init):
        raise ConfigError(f"--checkpoint {checkpoint} and --init {init}: give one model source, not two")
    source = checkpoint if checkpoint is not None else init
    if source is None:
        raise ConfigError(f"no model given: pass --init (or --checkpoint) with {ckpt_io.INIT_KINDS}")
    return source


def load_source(source: str, device: str = "cpu"):
    """``ckpt_io.load_any`` that also requires a tokenizer -> (model, tokenizer, meta)."""
    model, tok, meta = ckpt_io.load_any(source, device=device)
    if tok is None:
        raise CheckpointError(f"{source}: no tokenizer (tokenizer.json next to the checkpoint, or the GGUF vocabulary)")
    return model, tok, meta


def generate_text(
    checkpoint: str | None = None,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    num_beams: int = 1,
    seed: int = 0,
    device: str = "cpu",
    init: str | None = None,
    chat: bool = False,
) -> str:
    """Generate text from a checkpoint or pretrained model and print it.

    Args:
        checkpoint: the model: a run or checkpoint folder, an HF model folder, a .gguf file or a
            short name (smollm2). The same as --init.
        prompt: text to continue (with --chat: the user's message).
        max_new_tokens: tokens to generate.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k: sample only among the k most likely tokens (None: all).
        top_p: nucleus sampling mass (None: off).
        num_beams: beam search width (1: no beam search).
        seed: sampling seed.
        device: cpu or cuda.
        init: the same as --checkpoint (any model source).
        chat: render the prompt as one user turn with the model's chat template, stop at its eos
            and print only the answer.
    """
    check_device(device)
    source = model_source(checkpoint, init)
    model, tok, _ = load_source(source, device=device)
    if chat:
        from rizzearch.training.chat import chat_prompt_ids

        ids = chat_prompt_ids(tok, [{"role": "user", "content": prompt}], source)
    else:
        ids = tok.encode(prompt) or [tok.eot_id]
    x = torch.tensor([ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                   generator=g, eos_id=tok.eos_id if chat else None)[0].tolist()
    if chat:
        out = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
        text = tok.decode(out, skip_special_tokens=True)
    else:
        text = tok.decode(ids + out)
    print(text)
    return text


def evaluate(
    checkpoint: str | None = None,
    source: str = "tinyshakespeare",
    split: str = "val",
    seq_len: int = 128,
    batch_size: int = 8,
    max_batches: int | None = None,
    val_fraction: float = 0.1,
    device: str = "cpu",
    init: str | None = None,
) -> dict:
    """Loss, perplexity and bits per byte of a checkpoint or pretrained model on a text corpus; prints JSON.

    Args:
        checkpoint: the model: a run or checkpoint folder, an HF model folder, a .gguf file or a
            short name (smollm2). The same as --init.
        source: bundled corpus name or text file.
        split: "val" (the held-out end of the text, as in training), or "all".
        seq_len: evaluation context length.
        batch_size: windows per batch.
        max_batches: stop after this many batches (None: all).
        val_fraction: the validation fraction used to split (as in training).
        device: cpu or cuda.
        init: the same as --checkpoint (any model source).
    """
    import tempfile

    if split not in ("val", "all"):
        raise ConfigError(f"split: expected 'val' or 'all', got {split!r} (the training part alone is not an evaluation split)")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1 or null, got {max_batches}")
    if not 0.0 <= val_fraction < 1.0 or (split == "val" and val_fraction == 0.0):
        raise ConfigError(f"val_fraction must be in (0, 1) for split 'val', got {val_fraction}")
    check_device(device)
    checkpoint = model_source(checkpoint, init)
    model, tok, meta = load_source(checkpoint, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        ds = prepare_text(source, tmp, tok, val_fraction if split == "val" else 0.0)
        tokens = ds.val if split == "val" else ds.train
        ev = EvalWindows([torch.from_numpy(t.astype("int64")) for t in tokens], batch_size, seq_len, max_batches, bytes_per_token=ds.bytes_per_token if split == "val" else ds.meta["train"]["bytes"] / max(ds.meta["train"]["tokens"], 1))
        from rizzearch.training.loop import evaluate_loss

        out = evaluate_loss(model, lm_loss, ev, TrainConfig(), torch.device(device))
    out = {"checkpoint": meta.get("init_source") or str(ckpt_io.resolve_checkpoint(checkpoint)), "source": source, "split": split, **out}
    print(json.dumps(out, indent=2))
    return out


EXPORT_FORMATS = {"hf": "an HF model folder (config.json, model.safetensors, tokenizer files) for the Llama family"}


def export(checkpoint: str, out: str, format: str = "hf") -> str:
    """Write a checkpoint in another format (today: an HF folder that transformers loads).

    Args:
        checkpoint: the model: a run or checkpoint folder (or any model source: HF folder, .gguf, smollm2).
        out: the folder to write.
        format: hf (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with
            the chat template; Llama-family models only).
    """
    from rizzearch.models.llama import Llama
    from rizzearch.models.pretrained import save_pretrained

    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format: unknown export format {format!r}; formats: " + "; ".join(f"{k} ({v})" for k, v in EXPORT_FORMATS.items()))
    model, tok, meta = load_source(checkpoint)
    if not isinstance(model, Llama):
        raise ConfigError(f"{checkpoint}: a {meta['model']!r} model has no {format!r} form; export format hf exists for the Llama family "
                          f"(model 'llama') only")
    folder = save_pretrained(model, tok, out)
    print(f"wrote {folder} ({format})")
    return str(folder)
