"""``rizz import SOURCE --out RUN``: any ``load_pretrained`` source as a rizzearch run folder.

The source (an HF model folder, a ``.gguf`` file, a BlinkDL RWKV-4 ``.pth``, an official xLSTM-7B
checkpoint folder in the ``xlstm.xlstm_large`` layout (config.yaml or a config.json of
``xLSTMLargeConfig`` fields + model.safetensors or model_0/1/... shards; unknown config keys are a
``ConfigError`` naming the file and key), the bundled ``"smollm2"``) is read into our own model by ``models.pretrained.load_pretrained`` and written in the
checkpoint layout of ``training/checkpoint.py``::

    RUN/config.yaml                    the import command's resolved config
    RUN/tokenizer.json                 the checkpoint's tokenizer (+ tokenizer_config.json: special
                                       tokens, chat template)
    RUN/checkpoints/latest.json
    RUN/checkpoints/step_00000000/model.safetensors, model.json
                                       (model.json also records the source and its format)

so every command that takes ``--checkpoint`` / ``--init RUN`` (generate, eval, align, memorization,
the lm-eval adapter) reads it like a trained run.
"""

from __future__ import annotations

from pathlib import Path

from rizzearch.errors import ConfigError
from rizzearch.runs import make_run_dir
from rizzearch.training import checkpoint as ckpt_io


def import_checkpoint(source: str, out: str, dtype: str = "float32") -> dict:
    """Import a pretrained checkpoint into the run folder ``out``; prints and returns a summary.

    Args:
        source: HF model folder, .gguf file, RWKV-4 .pth file, official xLSTM checkpoint folder, or a
            short name ("smollm2").
        out: the run folder to create (must not exist or be empty).
        dtype: weight dtype written to model.safetensors (float32, bfloat16, float16).
    """
    import json

    from rizzearch.data.tokenizer import tokenizer_fingerprint
    from rizzearch.models.pretrained import load_pretrained

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    run = Path(out)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ConfigError(f"{run}: already exists and is not an empty folder; choose a new --out")
    pre = load_pretrained(source, dtype=dtype)  # before creating the folder: bad input leaves nothing behind
    tok = pre.tokenizer
    if tok is not None and tok.chat_template is None and pre.chat_template is not None:
        tok.chat_template = pre.chat_template
    run = make_run_dir(out, "import", allow_existing=True)
    extra = {"source": pre.source, "source_format": pre.format}
    if tok is not None:
        extra["tokenizer"] = tokenizer_fingerprint(tok)
        tok.save(run / "tokenizer.json")
    meta = ckpt_io.model_meta(pre.model, **extra)
    ckpt = ckpt_io.save_checkpoint(run / "checkpoints", 0, pre.model, meta, None)
    summary = {
        "run": str(run),
        "checkpoint": str(ckpt),
        "model": meta["model"],
        "parameters": sum(p.numel() for p in pre.model.parameters()),
        "source": pre.source,
        "format": pre.format,
        "tokenizer": tok is not None,
    }
    print(json.dumps(summary))
    return summary
