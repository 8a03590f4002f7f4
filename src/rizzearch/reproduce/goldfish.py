"""Goldfish study (Hans et al. 2024): standard training memorizes, goldfish training does not.

The paper's extreme-memorization setting (Sec. 4.1) trains a model for many epochs on 100
Wikipedia articles; with the standard loss it regurgitates most of them verbatim, with the
goldfish loss (k = 4, h = 13) it regurgitates none. Our laptop-scale version:

- **Data**: the bundled WikiText-2 validation + test splits, cut into articles at their
  ``" = Title = "`` lines (120 articles). The first ``articles`` of them (100 in quick and full
  mode) are the training documents, each truncated to its first ``tokens + 1`` BPE tokens (one
  row per document, every epoch sees every document once: ``RowBatches``); the remaining
  articles are held out (validation loss on their full text, membership-inference controls).
- **Models**: two GPTs from the same initialization, trained through the shared loop with the
  same data order, steps and optimizer: one with the standard loss, one with the goldfish loss
  (hashed mask, k = 4, h = 13). ``full`` adds a goldfish run with the reference code's
  ``product`` mask.
- **Audit** (``rizzearch.eval.memorization``): prompt with the first P tokens of each training
  document, generate N greedily (and with beam search), and count exact matches of the true
  continuation; RougeL, token match, longest verbatim run; membership-inference AUC (loss and
  zlib ratio, training vs held-out documents).

Claims: standard training memorizes >= half of the documents (exact match of the continuation);
goldfish training memorizes <= 5%; goldfish validation loss on held-out text is within
``VAL_LOSS_MARGIN`` of the standard run's (the paper: "little cost" in validation loss).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rizzearch import corpora
from rizzearch.data.batches import EvalWindows, RowBatches
from rizzearch.data.tokenizer import Tokenizer, tokenizer_fingerprint, train_bpe
from rizzearch.errors import DataError
from rizzearch.eval.memorization import audit_memorization, write_report
from rizzearch.models.base import build_model
from rizzearch.objectives.goldfish import GoldfishConfig
from rizzearch.reproduce.common import Budget, Claim, pyplot, read_results, save_figure, study_mode, torch_threads, write_results
from rizzearch.training.losses import GoldfishLoss, lm_loss
from rizzearch.training.loop import TrainConfig
from rizzearch.training.loop import train as train_loop

STUDY = "goldfish"
QUICK_BUDGET_S = 360.0
VAL_LOSS_MARGIN = 0.05  # "little cost": goldfish validation loss at most 5% above standard
STANDARD_MIN_EXACT = 0.5
GOLDFISH_MAX_EXACT = 0.05
_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class StudySize:
    """Sizes of one study mode.

    Args:
        articles: training documents (the first articles of WikiText-2 valid + test).
        tokens: tokens of each training document that are trained on (row = tokens + 1 ids).
        vocab_size: BPE vocabulary size (trained on all 120 articles).
        d_model: GPT width.
        n_layer: GPT depth.
        n_head: attention heads.
        steps: optimizer steps (identical for both runs).
        batch_size: documents per step.
        lr: peak learning rate.
        prompt_tokens: P, prompt tokens of the audit.
        new_tokens: N, generated tokens compared with the true continuation (P + N <= tokens + 1).
        num_beams: beam width of the audit's beam-search pass.
        val_tokens: held-out tokens for the validation loss.
        extra_strategies: goldfish strategies run in addition to "hash".
        heldout_documents: held-out articles audited (membership inference and extraction control).
    """

    articles: int = 100
    tokens: int = 128
    vocab_size: int = 1024
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    steps: int = 240
    batch_size: int = 20
    lr: float = 3e-3
    prompt_tokens: int = 32
    new_tokens: int = 64
    num_beams: int = 4
    val_tokens: int = 16384
    extra_strategies: tuple[str, ...] = ()
    heldout_documents: int = 20


QUICK = StudySize()
FULL = StudySize(tokens=256, d_model=192, n_layer=3, n_head=6, steps=480, prompt_tokens=32, new_tokens=128, num_beams=4,
                 val_tokens=65536, extra_strategies=("product", "static"))
TINY = StudySize(articles=12, tokens=40, vocab_size=300, d_model=32, n_layer=1, n_head=2, steps=24, batch_size=6,
                 prompt_tokens=16, new_tokens=16, num_beams=2, val_tokens=2048, heldout_documents=8)


def wikitext_articles() -> list[tuple[str, str]]:
    """(title, text) of every article in the bundled WikiText-2 validation and test splits.

    An article starts at a ``" = Title = "`` line that is followed by a blank line (one line of
    the test split looks like a title but is not followed by one).
    """
    out = []
    for name in ("wikitext-2-valid", "wikitext-2-test"):
        lines = corpora.path(name).read_text(encoding="utf-8").splitlines(keepends=True)
        cur: list[str] | None = None
        for i, line in enumerate(lines):
            if _TITLE.match(line.rstrip("\n")) and i + 1 < len(lines) and not lines[i + 1].strip():
                if cur:
                    out.append(cur)
                cur = [line]
            elif cur is not None:
                cur.append(line)
        if cur:
            out.append(cur)
    return [(a[0].strip().strip("=").strip(), "".join(a)) for a in out]


def _train_one(name: str, loss_fn, rows: torch.Tensor, eval_tokens: torch.Tensor, size: StudySize, tok: Tokenizer,
               out: Path, seed: int, device: str, meta: dict) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)  # identical initialization for every run
    model = build_model("gpt", vocab_size=tok.vocab_size, d_model=size.d_model, n_layer=size.n_layer, n_head=size.n_head)
    data = RowBatches({"input_ids": rows[:, :-1], "targets": rows[:, 1:]}, size.batch_size, seed=seed)
    ev = EvalWindows(eval_tokens, size.batch_size, size.tokens)
    cfg = TrainConfig(steps=size.steps, batch_size=size.batch_size, lr=size.lr, warmup_steps=max(1, size.steps // 12),
                      weight_decay=0.0, log_every=max(1, size.steps // 40), seed=seed, device=device)
    run_dir = out / name
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_loop(model, loss_fn, data, cfg, run_dir, eval_data=ev, eval_loss_fn=lm_loss, meta={"tokenizer": tokenizer_fingerprint(tok), **meta},
                     progress=True)
    tok.save(run_dir / "tokenizer.json")
    return model, {
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
        "val_loss": res.final_eval["val_loss"],
        "val_tokens": res.final_eval["val_tokens"],
        "final_train_loss": res.final_loss,
        "epochs": size.steps * size.batch_size / rows.shape[0],
        "history": res.history,
    }


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Run the study; writes results.json, report.md, goldfish.png and one folder per run.

    On CPU the study runs single-threaded (``torch.set_num_threads(1)``, restored afterwards): the
    models are small (d=128), so intra-op threads gain little on a quiet machine, while on a
    shared one two spinning threads per process made it 4x slower in wall time (781 s vs 201 s
    measured side by side); one thread also makes the numbers independent of the core count.
    """
    with torch_threads(1, device):
        return _run(out_dir, full=full, tiny=tiny, device=device, seed=seed)


def _run(out_dir: str, *, full: bool, tiny: bool, device: str, seed: int) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mode = study_mode(full, tiny)
    size = {"tiny": TINY, "quick": QUICK, "full": FULL}[mode]
    budget = Budget(QUICK_BUDGET_S)
    cpu0 = time.process_time()
    load0 = os.getloadavg()[0]

    # -- data -------------------------------------------------------------------------------
    arts = wikitext_articles()
    if len(arts) < size.articles + 2:
        raise DataError(f"bundled WikiText-2 has {len(arts)} articles; the study needs {size.articles} + held-out ones")
    tok = train_bpe([t for _, t in arts], size.vocab_size)
    tok.save(out / "tokenizer.json")
    encoded = [tok.encode(t) for _, t in arts]
    train_idx = [i for i in range(len(arts)) if len(encoded[i]) >= size.tokens + 1][: size.articles]
    skipped_short = [arts[i][0] for i in range(train_idx[-1] + 1) if i not in train_idx]
    held_idx = [i for i in range(train_idx[-1] + 1, len(arts))]
    if len(train_idx) < size.articles or len(held_idx) < 2:
        raise DataError(f"not enough WikiText-2 articles with >= {size.tokens + 1} tokens for {size.articles} training documents")
    rows = torch.tensor([encoded[i][: size.tokens + 1] for i in train_idx])  # (D, tokens + 1)
    held = [(arts[i][0], encoded[i][: size.tokens + 1]) for i in held_idx if len(encoded[i]) >= size.prompt_tokens + size.new_tokens]
    held = held[: size.heldout_documents]
    val_stream = torch.tensor([t for i in held_idx for t in encoded[i]][: size.val_tokens + 1])
    for fname, idx in (("documents.jsonl", train_idx), ("heldout.jsonl", held_idx)):
        (out / fname).write_text("".join(json.dumps({"id": arts[i][0], "text": arts[i][1]}) + "\n" for i in idx))

    # -- training ---------------------------------------------------------------------------
    runs: dict[str, tuple] = {"standard": (lm_loss, {"objective": "lm"})}
    for strategy in ("hash", *size.extra_strategies):
        cfg = GoldfishConfig(k=4, h=13, strategy=strategy, seed=seed)
        name = "goldfish" if strategy == "hash" else f"goldfish-{strategy}"
        runs[name] = (GoldfishLoss(cfg, protected_ids=tok.special_ids), {"objective": "goldfish", "goldfish": asdict(cfg)})
    results: dict[str, dict] = {}
    for name, (loss_fn, meta) in runs.items():
        print(f"[goldfish study] training {name} ({size.steps} steps, {rows.shape[0]} documents x {size.tokens} tokens)")
        model, info = _train_one(name, loss_fn, rows, val_stream, size, tok, out, seed, device, meta)
        t0 = time.perf_counter()
        report = audit_memorization(model, rows.tolist(), heldout=[d for _, d in held], prompt_tokens=size.prompt_tokens,
                                    new_tokens=size.new_tokens, num_beams=size.num_beams, tokenizer=tok,
                                    ids=[arts[i][0] for i in train_idx], heldout_ids=[t for t, _ in held],
                                    batch_size=25, device=device, progress=True)
        write_report(report, out / name / "audit")
        info["audit_seconds"] = time.perf_counter() - t0
        info["audit"] = report.summary
        results[name] = info
        print(report.table())

    # -- claims -----------------------------------------------------------------------------
    std, gf = results["standard"], results["goldfish"]
    std_exact = std["audit"]["greedy"]["train"]["exact_match_rate"]
    gf_exact = gf["audit"]["greedy"]["train"]["exact_match_rate"]
    ratio = gf["val_loss"] / std["val_loss"]
    n_docs = rows.shape[0]
    claims = [
        Claim("standard_memorizes",
              f"Standard training for {std['epochs']:.0f} epochs on {n_docs} WikiText-2 articles memorizes at least half of them "
              f"(greedy exact match of the {size.new_tokens}-token continuation after a {size.prompt_tokens}-token prompt)",
              "most of 100 Wikipedia articles regurgitated verbatim (LLaMA-2-7B, 100 epochs); target >= 50%",
              f"{std_exact:.1%} ({std['audit']['greedy']['train']['exact_match']}/{n_docs})", std_exact >= STANDARD_MIN_EXACT),
        Claim("goldfish_does_not_memorize",
              "Goldfish training (k=4, h=13, hashed mask) on identical data and steps memorizes at most 5% of the documents",
              "no article regurgitated verbatim; target <= 5%",
              f"{gf_exact:.1%} ({gf['audit']['greedy']['train']['exact_match']}/{n_docs})", gf_exact <= GOLDFISH_MAX_EXACT),
        Claim("goldfish_val_loss_cost",
              f"Goldfish costs little validation loss: its loss on held-out WikiText-2 text is within {VAL_LOSS_MARGIN:.0%} of standard training's",
              "validation loss close to the standard loss's (little cost)",
              f"goldfish {gf['val_loss']:.4f} / standard {std['val_loss']:.4f} = {ratio:.3f}", ratio <= 1 + VAL_LOSS_MARGIN),
    ]
    wall = budget.elapsed()
    cpu = time.process_time() - cpu0
    metrics = {
        "mode": mode,
        "subset": {
            "training_documents": n_docs,
            "tokens_per_document": size.tokens,
            "heldout_documents": len(held),
            "val_tokens": int(val_stream.numel() - 1),
            "skipped_short_articles": skipped_short,
            "source": "WikiText-2 validation + test articles (bundled), in file order",
        },
        "size": asdict(size),
        "model_params": model.num_params(),
        "runs": {name: {k: v for k, v in r.items() if k != "history"} for name, r in results.items()},
        "standard_exact_match_rate": std_exact,
        "goldfish_exact_match_rate": gf_exact,
        "val_loss_ratio": ratio,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "quick_budget_seconds": QUICK_BUDGET_S,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_start": load0,
        "loadavg_1min_end": os.getloadavg()[0],
    }
    _plot(results, out / "goldfish.png", size)
    (out / "report.md").write_text(_report(claims, results, metrics, size))
    print(f"[goldfish study] {mode}: {wall:.0f}s wall, {cpu:.0f}s CPU, load average {load0:.1f} -> {metrics['loadavg_1min_end']:.1f}")
    return read_results(write_results(out, STUDY, claims, metrics))


def _report(claims: list[Claim], results: dict, metrics: dict, size: StudySize) -> str:
    lines = [
        "# Goldfish loss: memorization with and without goldfish training",
        "",
        f"Mode **{metrics['mode']}**: {metrics['subset']['training_documents']} WikiText-2 articles x {size.tokens} tokens, "
        f"GPT d={size.d_model} x {size.n_layer} layers ({metrics['model_params']:,} parameters), {size.steps} steps of "
        f"{size.batch_size} documents ({results['standard']['epochs']:.0f} epochs), BPE vocab {size.vocab_size}. "
        f"Audit: prompt P={size.prompt_tokens}, continuation N={size.new_tokens}, beam width {size.num_beams}; "
        f"{metrics['subset']['heldout_documents']} held-out articles.",
        "",
        "| claim | paper | ours | holds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c.statement} | {c.paper_value} | {c.our_value} | {'yes' if c.holds else 'NO'} |" for c in claims]
    lines += [
        "",
        "| run | greedy exact | beam exact | token match | RougeL | longest run | held-out exact | loss AUC | zlib AUC | val loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        a = r["audit"]
        g, b = a["greedy"]["train"], a.get("beam", {}).get("train", {})
        mia = a.get("membership") or {}
        lines.append(
            f"| {name} | {g['exact_match_rate']:.1%} | {b.get('exact_match_rate', float('nan')):.1%} | {g['token_match']:.3f} | "
            f"{g['rougeL']:.3f} | {g['longest_run']:.1f} | {a['greedy'].get('heldout', {}).get('exact_match_rate', float('nan')):.1%} | "
            f"{mia.get('loss_auc', float('nan')):.3f} | {mia.get('zlib_auc', float('nan')):.3f} | {r['val_loss']:.4f} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Wall time {metrics['wall_seconds']:.0f} s ({metrics['cpu_seconds']:.0f} s CPU), 1-min load average "
        f"{metrics['loadavg_1min_start']:.1f} at start and {metrics['loadavg_1min_end']:.1f} at the end.",
        "",
        "![goldfish](goldfish.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(results: dict, path: Path, size: StudySize) -> None:
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [h["step"] for h in r["history"]]
        (line,) = ax1.plot(steps, [h.get("all_token_loss", h["loss"]) for h in r["history"]], label=f"{name}: all tokens")
        if "all_token_loss" in r["history"][-1]:
            ax1.plot(steps, [h["loss"] for h in r["history"]], "--", color=line.get_color(), label=f"{name}: kept tokens")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats/token)")
    ax1.set_title("training loss on the memorized documents")
    ax1.legend(fontsize=8)
    names = list(results)
    metrics = [("greedy exact", lambda a: a["greedy"]["train"]["exact_match_rate"]),
               ("beam exact", lambda a: a.get("beam", {}).get("train", {}).get("exact_match_rate", 0.0)),
               ("token match", lambda a: a["greedy"]["train"]["token_match"]),
               ("RougeL", lambda a: a["greedy"]["train"]["rougeL"])]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [f(results[name]["audit"]) for _, f in metrics]
        ax2.bar([i + j * width for i in range(len(metrics))], vals, width, label=name)
    ax2.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(metrics))], [m for m, _ in metrics])
    ax2.set_ylim(0, 1.05)
    ax2.set_title(f"memorization of the training documents (P={size.prompt_tokens}, N={size.new_tokens})")
    ax2.legend(fontsize=8)
    save_figure(fig, path)
