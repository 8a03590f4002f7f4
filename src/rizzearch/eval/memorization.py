"""Memorization audit: how much of its training text does a model reproduce verbatim?

Two measurements, as in Hans et al. 2024 (Goldfish loss, Sec. 4) and Carlini et al. 2021:

1. **Extraction.** For each document, feed the first P tokens and generate the next N, greedily
   and with beam search (width W); compare with the true continuation:
   - *exact match*: all N generated tokens equal the true ones (the paper's headline metric);
   - *token match*: fraction of the N positions where the generated token equals the true one;
   - *RougeL*: F-measure of the longest common subsequence between the decoded generation and the
     decoded true continuation (``rouge-score``, its default word tokenizer, no stemming);
   - *longest verbatim run*: the longest contiguous token sequence the generation shares with the
     true continuation (longest common substring, in tokens).
2. **Membership inference** (training documents vs held-out documents): ROC AUC of two scores,
   higher = "was trained on":
   - *loss*: minus the mean next-token cross-entropy of the document;
   - *zlib ratio*: minus (model code length in bits / zlib code length in bits) of the same span,
     i.e. how much better than zlib the model compresses it (Carlini et al. 2021 divide the
     log-perplexity by the zlib entropy; we divide the *total* log-loss, so the ratio does not
     depend on the document's length; with equal-length documents both rank identically).

A document shorter than P + N tokens cannot be audited: it is skipped, its row says why, and the
summary counts the skips (never a silently wrong number). ``memorization_command`` is
``rizz memorization``: it loads a checkpoint (and checks the tokenizer belongs to it), reads the
documents, writes ``memorization.jsonl`` (one row per document), ``summary.json`` and
``summary.md`` into a run folder, and prints the summary table.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import ConfigError, DataError
from rizzearch.models.base import eval_mode, generate

# ----------------------------------------------------------------------------------------------
# per-continuation metrics


def longest_common_run(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest contiguous run of tokens shared by ``a`` and ``b`` (longest common substring)."""
    if not len(a) or not len(b):
        return 0
    x = np.asarray(a)
    y = np.asarray(b)
    eq = x[:, None] == y[None, :]  # (|a|, |b|)
    best = 0
    prev = np.zeros(len(y) + 1, dtype=np.int64)
    for i in range(len(x)):  # DP over rows: run[i, j] = run[i-1, j-1] + 1 where a_i == b_j
        cur = np.zeros_like(prev)
        cur[1:] = np.where(eq[i], prev[:-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best


def continuation_metrics(generated: Sequence[int], reference: Sequence[int]) -> dict:
    """Exact match, token match rate and longest verbatim run of one generated continuation."""
    if len(generated) != len(reference):
        raise ValueError(f"generated ({len(generated)}) and reference ({len(reference)}) continuations differ in length")
    same = [int(g) == int(r) for g, r in zip(generated, reference)]
    return {
        "exact": all(same),
        "token_match": sum(same) / max(len(same), 1),
        "longest_run": longest_common_run(generated, reference),
    }


_ROUGE = None


def rouge_l(reference: str, generated: str) -> float:
    """RougeL F-measure (``rouge-score``, default tokenizer, no stemming)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(reference, generated)["rougeL"].fmeasure)


def zlib_bits(data: bytes) -> int:
    """Code length of ``data`` under zlib (level 9), in bits."""
    return 8 * len(zlib.compress(data, 9))


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U / (n_pos n_neg))."""
    p = np.asarray(positive, dtype=np.float64)
    n = np.asarray(negative, dtype=np.float64)
    if p.size == 0 or n.size == 0:
        raise DataError(f"roc_auc: needs scores of both classes, got {p.size} positive and {n.size} negative")
    wins = 0.0
    for chunk in np.array_split(p, max(1, p.size // 1024)):
        wins += float((chunk[:, None] > n[None, :]).sum()) + 0.5 * float((chunk[:, None] == n[None, :]).sum())
    return wins / (p.size * n.size)


# ----------------------------------------------------------------------------------------------
# the audit


@dataclass
class MemorizationReport:
    """Rows (one per document) and the summary of an audit."""

    rows: list[dict]
    summary: dict
    config: dict = field(default_factory=dict)

    def table(self) -> str:
        """The summary as a Markdown table (one line per decoding x split)."""
        s = self.summary
        lines = [
            f"P = {s['prompt_tokens']} prompt tokens, N = {s['new_tokens']} generated tokens; "
            f"skipped (shorter than P + N): {s['skipped']['train']} training, {s['skipped']['heldout']} held-out documents.",
            "",
            "| decoding | documents | n | exact match | token match | RougeL | longest run (tokens) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for dec in ("greedy", "beam"):
            for split in ("train", "heldout"):
                m = s.get(dec, {}).get(split)
                if not m:
                    continue
                name = dec if dec == "greedy" else f"beam (width {s['num_beams']})"
                lines.append(
                    f"| {name} | {split} | {m['count']} | {m['exact_match_rate']:.1%} | {m['token_match']:.3f} | "
                    f"{m['rougeL']:.3f} | {m['longest_run']:.1f} |"
                )
        mia = s.get("membership")
        lines.append("")
        if mia:
            lines += [
                "| membership inference (train vs held-out) | AUC |",
                "|---|---:|",
                f"| loss | {mia['loss_auc']:.3f} |",
                f"| zlib ratio | {mia['zlib_auc']:.3f} |",
                "",
                f"mean loss: training documents {mia['train_loss']:.4f}, held-out {mia['heldout_loss']:.4f} nats/token",
            ]
        else:
            lines.append(f"membership inference: not computed ({s.get('membership_note', 'no held-out documents')})")
        return "\n".join(lines)


@torch.no_grad()
def document_losses(model, docs: Sequence[Sequence[int]], batch_size: int = 16, device=None) -> list[tuple[float, int]]:
    """(sum of next-token cross-entropy in nats, number of predicted tokens) per document.

    Documents are batched with right padding; the models are causal, so padding after a
    document never changes its own positions' logits.
    """
    device = device or next(model.parameters()).device
    with eval_mode(model):
        order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
        res: dict[int, tuple[float, int]] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            L = max(len(docs[i]) for i in idx)
            x = torch.zeros(len(idx), L, dtype=torch.long)
            y = torch.full((len(idx), L - 1), -100, dtype=torch.long)
            for r, i in enumerate(idx):
                d = torch.as_tensor(list(docs[i]), dtype=torch.long)
                x[r, : len(d)] = d
                y[r, : len(d) - 1] = d[1:]
            logits, _ = model(x[:, :-1].to(device))
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="none").view(y.shape)
            for r, i in enumerate(idx):
                res[i] = (float(nll[r].sum()), len(docs[i]) - 1)
    return [res[i] for i in range(len(docs))]


def _check_settings(prompt_tokens: int, new_tokens: int, num_beams: int, batch_size: int) -> None:
    for name, v in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("num_beams", num_beams), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")


def audit_memorization(
    model,
    documents: Sequence[Sequence[int]],
    *,
    heldout: Sequence[Sequence[int]] = (),
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    num_beams: int = 4,
    tokenizer=None,
    ids: Sequence[str] | None = None,
    heldout_ids: Sequence[str] | None = None,
    batch_size: int = 16,
    device=None,
    progress: bool = False,
) -> MemorizationReport:
    """Audit ``model`` on token ``documents`` (training) and optional ``heldout`` documents.

    Args:
        model: a CausalLM.
        documents: token ids of each training document (the audited span; truncate beforehand).
        heldout: token ids of documents the model did not train on (membership inference, and
            a control for the extraction metrics).
        prompt_tokens: P, tokens fed as the prompt.
        new_tokens: N, tokens generated and compared with the true continuation.
        num_beams: beam width for the beam-search pass (1: greedy only).
        tokenizer: decodes tokens for RougeL, zlib and the rows' text (None: token ids are
            compared as words, and zlib compresses the ids as 32-bit integers).
        ids / heldout_ids: names of the documents in the rows (default: train-0, heldout-0, ...).
        batch_size: documents per generation / scoring batch.
        device: where to run (default: the model's device).
        progress: show a progress bar.
    """
    _check_settings(prompt_tokens, new_tokens, num_beams, batch_size)
    device = device or next(model.parameters()).device
    P, N = prompt_tokens, new_tokens
    entries = _entries(documents, ids, heldout, heldout_ids, model.config.vocab_size)
    rows: list[dict] = []
    usable = []
    for e in entries:
        row = {"id": e["id"], "split": e["split"], "num_tokens": len(e["tokens"]), "skipped": False}
        if len(e["tokens"]) < P + N:
            row.update(skipped=True, skip_reason=f"document has {len(e['tokens'])} tokens, fewer than prompt_tokens + new_tokens = {P + N}")
        else:
            usable.append((e, row))
        rows.append(row)
    decodings = [("greedy", 1)] + ([("beam", num_beams)] if num_beams > 1 else [])
    _score(model, usable, decodings, P, N, _Text(tokenizer), batch_size, device, progress)
    summary = _summary(rows, decodings, P, N, num_beams, had_heldout=bool(heldout))
    config = {"prompt_tokens": P, "new_tokens": N, "num_beams": num_beams, "batch_size": batch_size}
    return MemorizationReport(rows, summary, config)


def _entries(documents, ids, heldout, heldout_ids, vocab: int) -> list[dict]:
    """``{"id", "split", "tokens"}`` per document, every token id checked against the vocabulary."""
    entries = []
    for split, docs, names in (("train", documents, ids), ("heldout", heldout, heldout_ids)):
        if names is not None and len(names) != len(docs):
            raise DataError(f"{split}: {len(names)} ids for {len(docs)} documents")
        for i, d in enumerate(docs):
            toks = [int(t) for t in d]
            bad = [t for t in toks if not 0 <= t < vocab]
            if bad:
                raise DataError(f"{split} document {i}: token id {bad[0]} outside the model's vocabulary (0..{vocab - 1}); was it tokenized with another tokenizer?")
            entries.append({"id": names[i] if names is not None else f"{split}-{i}", "split": split, "tokens": toks})
    if not any(e["split"] == "train" for e in entries):
        raise DataError("memorization audit: no training documents given")
    return entries


class _Text:
    """Tokens as text (decoded, or the ids as words without a tokenizer) and as bytes for zlib."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, toks: Sequence[int]) -> str:
        return self.tokenizer.decode(toks) if self.tokenizer is not None else " ".join(str(t) for t in toks)

    def raw(self, toks: Sequence[int]) -> bytes:
        return self(toks).encode("utf-8") if self.tokenizer is not None else np.asarray(toks, dtype="<i4").tobytes()


def _score(model, usable: list, decodings: list, P: int, N: int, text: _Text, batch_size: int, device, progress: bool) -> None:
    """Fill each usable row: the continuation metrics of every decoding, the loss and the zlib ratio."""
    from tqdm.auto import tqdm

    steps = math.ceil(len(usable) / batch_size) * (len(decodings) + 1)
    with tqdm(total=steps, disable=not progress, desc="memorization", dynamic_ncols=True) as bar:
        for s in range(0, len(usable), batch_size):
            chunk = usable[s : s + batch_size]
            prompts = torch.tensor([e["tokens"][:P] for e, _ in chunk], device=device)
            for name, width in decodings:
                gen = generate(model, prompts, N, num_beams=width).tolist()
                for (e, row), g in zip(chunk, gen):
                    ref = e["tokens"][P : P + N]
                    row.update({f"{name}_{k}": v for k, v in continuation_metrics(g, ref).items()})
                    row[f"{name}_rougeL"] = rouge_l(text(ref), text(g))
                    if text.tokenizer is not None:
                        row[f"{name}_text"] = text(g)
                bar.update(1)
            for (e, row), (nll, n) in zip(chunk, document_losses(model, [e["tokens"] for e, _ in chunk], batch_size, device)):
                row["loss"] = nll / n
                row["zlib_ratio"] = (nll / math.log(2)) / zlib_bits(text.raw(e["tokens"]))
                if text.tokenizer is not None:
                    row["prompt_text"] = text(e["tokens"][:P])
                    row["reference_text"] = text(e["tokens"][P : P + N])
            bar.update(1)


def _summary(rows: list[dict], decodings: list, P: int, N: int, num_beams: int, had_heldout: bool) -> dict:
    """Counts, the extraction metrics per decoding and split, and the membership-inference AUCs."""
    summary: dict = {
        "prompt_tokens": P,
        "new_tokens": N,
        "num_beams": num_beams,
        "documents": {sp: sum(1 for r in rows if r["split"] == sp) for sp in ("train", "heldout")},
        "skipped": {sp: sum(1 for r in rows if r["split"] == sp and r["skipped"]) for sp in ("train", "heldout")},
    }
    for name, _ in decodings:
        summary[name] = {}
        for sp in ("train", "heldout"):
            rs = [r for r in rows if r["split"] == sp and not r["skipped"]]
            if rs:
                summary[name][sp] = {
                    "count": len(rs),
                    "exact_match": sum(r[f"{name}_exact"] for r in rs),
                    "exact_match_rate": sum(r[f"{name}_exact"] for r in rs) / len(rs),
                    "token_match": float(np.mean([r[f"{name}_token_match"] for r in rs])),
                    "rougeL": float(np.mean([r[f"{name}_rougeL"] for r in rs])),
                    "longest_run": float(np.mean([r[f"{name}_longest_run"] for r in rs])),
                }
    tr = [r for r in rows if r["split"] == "train" and not r["skipped"]]
    ho = [r for r in rows if r["split"] == "heldout" and not r["skipped"]]
    if not tr:
        raise DataError(f"memorization audit: every training document is shorter than prompt_tokens + new_tokens = {P + N} tokens; lower them")
    if ho:
        summary["membership"] = {
            "loss_auc": roc_auc([-r["loss"] for r in tr], [-r["loss"] for r in ho]),
            "zlib_auc": roc_auc([-r["zlib_ratio"] for r in tr], [-r["zlib_ratio"] for r in ho]),
            "train_loss": float(np.mean([r["loss"] for r in tr])),
            "heldout_loss": float(np.mean([r["loss"] for r in ho])),
            "train_zlib_ratio": float(np.mean([r["zlib_ratio"] for r in tr])),
            "heldout_zlib_ratio": float(np.mean([r["zlib_ratio"] for r in ho])),
        }
    else:
        summary["membership"] = None
        summary["membership_note"] = "no usable held-out documents given" if not had_heldout else "every held-out document was skipped"
    return summary


# ----------------------------------------------------------------------------------------------
# documents on disk


def _read_utf8(f: Path) -> str:
    """A document file's text; DataError naming the file when it is not UTF-8 text (binary)."""
    try:
        raw = f.read_bytes()
        if b"\x00" in raw:
            raise DataError(f"{f}: a binary file (NUL bytes), not a UTF-8 text document")
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not UTF-8 text (byte {e.start}); every document must be UTF-8 text") from e
    except OSError as e:
        raise DataError(f"{f}: cannot read ({e.strerror})") from e


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """(id, text) of each document in a file or folder.

    - ``*.jsonl``: one JSON object per line with a ``text`` field (and optionally ``id`` or ``title``);
    - a folder: every ``*.txt`` file in it is one document (id = file name);
    - any other file: plain text, documents separated by one or more blank lines.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: documents file not found")
    docs: list[tuple[str, str]] = []
    if p.is_dir():
        for f in sorted(p.glob("*.txt")):
            docs.append((f.name, _read_utf8(f)))
    elif p.suffix == ".jsonl":
        for n, obj in read_jsonl(p):
            if not isinstance(obj.get("text"), str):
                raise DataError(f"{p}:{n}: expected an object with a string field 'text'")
            docs.append((str(obj.get("id", obj.get("title", f"{p.stem}-{len(docs)}"))), obj["text"]))
    else:
        text = _read_utf8(p)
        blocks, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line)
            elif cur:
                blocks.append("\n".join(cur))
                cur = []
        if cur:
            blocks.append("\n".join(cur))
        docs = [(f"{p.stem}-{i}", b) for i, b in enumerate(blocks)]
    if not docs:
        raise DataError(f"{p}: no documents found")
    return docs


def write_report(report: MemorizationReport, out: str | Path) -> Path:
    """Write ``memorization.jsonl``, ``summary.json`` and ``summary.md`` into ``out``."""
    from rizzearch.runs import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "memorization.jsonl", "".join(json.dumps(r) + "\n" for r in report.rows))
    atomic_write_text(out / "summary.json", json.dumps({**report.summary, "config": report.config}, indent=2))
    atomic_write_text(out / "summary.md", "# Memorization audit\n\n" + report.table() + "\n")
    return out


def _model_and_tokenizer(checkpoint: str, tokenizer: str | None, device: str):
    """The audited model and its tokenizer (the source's own, or ``tokenizer`` checked against it) -> (model, tok, meta)."""
    from rizzearch.data.tokenizer import Tokenizer
    from rizzearch.errors import CheckpointError
    from rizzearch.training import checkpoint as ckpt_io

    model, tok, meta = ckpt_io.load_any(checkpoint, device=device, tokenizer=tokenizer is None)
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        ckpt_io.check_tokenizer(tok, meta, tokenizer)
    if tok is None:
        raise CheckpointError(f"{checkpoint}: no tokenizer.json next to the checkpoint; pass --tokenizer")
    return model, tok, meta


def memorization_command(
    checkpoint: str | None = None,
    documents: str | None = None,
    heldout: str | None = None,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    num_beams: int = 4,
    max_tokens: int | None = None,
    tokenizer: str | None = None,
    batch_size: int = 16,
    out: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    init: str | None = None,
) -> dict:
    """Audit how much of its training text a checkpoint regurgitates; writes a run folder.

    For each document the first ``prompt_tokens`` tokens are the prompt and the next
    ``new_tokens`` are compared with what the model generates (greedy and beam search): exact
    match, token match rate, RougeL and the longest verbatim run. With ``--heldout`` also the
    membership-inference AUC of the loss and zlib-ratio scores. Writes memorization.jsonl (one row
    per document), summary.json and summary.md, and prints the summary table.

    Args:
        checkpoint: the model to audit: a run or checkpoint folder, an HF model folder, a .gguf
            file or a short name (smollm2). The same as --init.
        documents: (required) the training documents: a .jsonl file (one {"text": ...} per line), a folder
            of .txt files, or a text file with documents separated by blank lines.
        heldout: documents the model did not train on (same formats), for membership inference.
        prompt_tokens: P, the number of prompt tokens taken from the start of each document.
        new_tokens: N, the number of tokens generated and compared.
        num_beams: beam width of the beam-search pass (1: greedy only).
        max_tokens: truncate each document to its first max_tokens tokens, the span scored for
            membership inference (None: the whole document); use the length trained on.
        tokenizer: a tokenizer.json to use instead of the checkpoint's (must match it).
        batch_size: documents per batch.
        out: run folder (default: runs/memorization-<timestamp>).
        device: cpu or cuda.
        progress: show a progress bar.
        init: the same as --checkpoint (any model source).
    """
    from rizzearch.runs import make_run_dir
    from rizzearch.training import checkpoint as ckpt_io
    from rizzearch.training.distributed import check_device
    from rizzearch.training.recipes import model_source

    if documents is None:
        raise ConfigError("documents: required (a .jsonl file, a folder of .txt files or a text file)")
    checkpoint = model_source(checkpoint, init)
    _check_settings(prompt_tokens, new_tokens, num_beams, batch_size)
    check_device(device)
    if max_tokens is not None and max_tokens < prompt_tokens + new_tokens:
        raise ConfigError(f"max_tokens ({max_tokens}) must be >= prompt_tokens + new_tokens ({prompt_tokens + new_tokens})")
    model, tok, meta = _model_and_tokenizer(checkpoint, tokenizer, device)
    train_docs = read_documents(documents)
    held_docs = read_documents(heldout) if heldout else []

    def encode(docs):
        toks = [tok.encode(t) for _, t in docs]
        return [d[:max_tokens] if max_tokens else d for d in toks]

    run = make_run_dir(out, "memorization")
    report = audit_memorization(
        model, encode(train_docs), heldout=encode(held_docs), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        num_beams=num_beams, tokenizer=tok, ids=[i for i, _ in train_docs], heldout_ids=[i for i, _ in held_docs],
        batch_size=batch_size, device=device, progress=progress,
    )
    report.config.update({"checkpoint": meta.get("init_source") or str(ckpt_io.resolve_checkpoint(checkpoint)), "documents": str(documents),
                          "heldout": heldout, "max_tokens": max_tokens})
    write_report(report, run)
    print(report.table())
    print(f"\nrows: {run / 'memorization.jsonl'}; summary: {run / 'summary.json'}")
    return report.summary
