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
goldfish training memorizes <= 5% (each rate with its Wilson 95% interval).

The paper's third result, that goldfish training costs little validation loss, is *not* a claim of
this quick tier. The claim is about the model that does not memorize: its held-out loss should be
close to the standard model's. Trained on 12,800 tokens, our models reach their lowest held-out
loss after a few epochs, before either has memorized anything, and at the end of training, where
the audit measures memorization, both are overfit far past a uniform guess (ln V). So no point of
the quick run measures the trade-off: the best checkpoints are not the models that were audited,
and the audited models' held-out losses mean nothing. The real tier (a pretrained model that
generalizes) measures it. The report still shows both validation curves, the best-checkpoint
losses (``best_val_loss`` per run) and a unigram reference (``unigram_val_loss``).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rizzearch import corpora
from rizzearch.data.batches import EvalWindows, RowBatches
from rizzearch.data.tokenizer import Tokenizer, tokenizer_fingerprint, train_bpe
from rizzearch.errors import DataError
from rizzearch.eval.memorization import audit_memorization
from rizzearch.eval.memorization import write_report as write_audit_report
from rizzearch.models.base import build_model
from rizzearch.objectives.goldfish import GoldfishConfig
from rizzearch.reproduce.common import Claim, Markdown, Modes, StudyRun, figure, fmt_ci, load_average, md_table, rate_ci, torch_threads
from rizzearch.training.losses import GoldfishLoss, lm_loss
from rizzearch.training.loop import TrainConfig
from rizzearch.training.loop import train as train_loop

STUDY = "goldfish"
QUICK_BUDGET_S = 360.0
STANDARD_MIN_EXACT = 0.5
GOLDFISH_MAX_EXACT = 0.05
_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class Size:
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
        evals: validation-loss evaluations during training (the curve and the best checkpoint's loss).
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
    evals: int = 12
    extra_strategies: tuple[str, ...] = ()
    heldout_documents: int = 20


QUICK = Size()
FULL = Size(tokens=256, d_model=192, n_layer=3, n_head=6, steps=480, prompt_tokens=32, new_tokens=128, num_beams=4,
                 val_tokens=65536, extra_strategies=("product", "static"))
TINY = Size(articles=12, tokens=40, vocab_size=300, d_model=32, n_layer=1, n_head=2, steps=24, batch_size=6,
                 prompt_tokens=16, new_tokens=16, num_beams=2, val_tokens=2048, evals=3, heldout_documents=8)
MODES = Modes(tiny=TINY, quick=QUICK, full=FULL, budget_s={"tiny": QUICK_BUDGET_S, "quick": QUICK_BUDGET_S, "full": QUICK_BUDGET_S})


def split_articles(text: str) -> list[tuple[str, str]]:
    """(title, text) of each article of a WikiText file: an article starts at a ``" = Title = "`` line
    followed by a blank line (one line of the test split looks like a title but is not followed by one)."""
    lines = text.splitlines(keepends=True)
    out: list[list[str]] = []
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


def wikitext_articles() -> list[tuple[str, str]]:
    """(title, text) of every article in the bundled WikiText-2 validation and test splits."""
    return [a for name in ("wikitext-2-valid", "wikitext-2-test") for a in split_articles(corpora.path(name).read_text(encoding="utf-8"))]


def _train_one(name: str, loss_fn, rows: torch.Tensor, eval_tokens: torch.Tensor, size: Size, tok: Tokenizer,
               out: Path, seed: int, device: str, meta: dict) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)  # identical initialization for every run
    model = build_model("gpt", vocab_size=tok.vocab_size, d_model=size.d_model, n_layer=size.n_layer, n_head=size.n_head)
    data = RowBatches({"input_ids": rows[:, :-1], "targets": rows[:, 1:]}, size.batch_size, seed=seed)
    ev = EvalWindows(eval_tokens, size.batch_size, size.tokens)
    cfg = TrainConfig(steps=size.steps, batch_size=size.batch_size, lr=size.lr, warmup_steps=max(1, size.steps // 12),
                      weight_decay=0.0, log_every=max(1, size.steps // 40), eval_every=max(1, size.steps // size.evals), seed=seed, device=device)
    run_dir = out / name
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_loop(model, loss_fn, data, cfg, run_dir, eval_data=ev, eval_loss_fn=lm_loss, meta={"tokenizer": tokenizer_fingerprint(tok), **meta},
                     progress=True)
    tok.save(run_dir / "tokenizer.json")
    curve = [(e["step"], e["val_loss"]) for e in res.evals]
    best_step, best_loss = min(curve, key=lambda c: c[1])
    return model, {
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
        "val_loss": res.final_eval["val_loss"],
        "val_tokens": res.final_eval["val_tokens"],
        "val_curve": curve,
        "best_val_loss": best_loss,
        "best_val_step": best_step,
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
    r = StudyRun.start(STUDY, out_dir, MODES, full=full, tiny=tiny, device=device, seed=seed)
    with torch_threads(1, device):
        data = prepare_data(r.size, r.out)
        results, model = {}, None
        for name, (loss_fn, meta) in objectives(r.size, data.tok, seed).items():
            model, results[name] = train_and_audit(r, data, name, loss_fn, meta)
        claims = make_claims(r.size, results, data.rows.shape[0])
        metrics = collect_metrics(r, data, results, model.num_params())
        plot(results, r.out / "goldfish.png", r.size)
        write_report(r.out / "report.md", claims, results, metrics, r.size)
        print(f"[goldfish study] {r.mode}: {metrics['wall_seconds']:.0f}s wall, {metrics['cpu_seconds']:.0f}s CPU, load average "
              f"{metrics['loadavg_1min_start']:.1f} -> {metrics['loadavg_1min_end']:.1f}")
        return r.finish(claims, metrics)


@dataclass
class Data:
    """The tokenizer, the training rows (one per document) and the held-out documents and tokens."""

    arts: list[tuple[str, str]]  # (title, text) of every article
    tok: Tokenizer
    train_idx: list[int]
    rows: torch.Tensor  # (D, tokens + 1)
    held: list[tuple[str, list[int]]]  # (title, token ids) of the audited held-out articles
    val_stream: torch.Tensor  # (val_tokens + 1,) held-out tokens for the validation loss
    skipped_short: list[str]


def prepare_data(size: Size, out: Path) -> Data:
    """Articles, a BPE tokenizer trained on all of them, training rows and held-out text; writes
    tokenizer.json, documents.jsonl and heldout.jsonl into ``out``."""
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
    val_stream = torch.tensor([t for i in held_idx for t in encoded[i]][: size.val_tokens + 1])
    for fname, idx in (("documents.jsonl", train_idx), ("heldout.jsonl", held_idx)):
        (out / fname).write_text("".join(json.dumps({"id": arts[i][0], "text": arts[i][1]}) + "\n" for i in idx))
    return Data(arts, tok, train_idx, rows, held[: size.heldout_documents], val_stream, skipped_short)


def objectives(size: Size, tok: Tokenizer, seed: int) -> dict[str, tuple]:
    """name -> (loss function, run metadata): the standard loss, then goldfish with each mask strategy."""
    runs: dict[str, tuple] = {"standard": (lm_loss, {"objective": "lm"})}
    for strategy in ("hash", *size.extra_strategies):
        cfg = GoldfishConfig(k=4, h=13, strategy=strategy, seed=seed)
        name = "goldfish" if strategy == "hash" else f"goldfish-{strategy}"
        runs[name] = (GoldfishLoss(cfg, protected_ids=tok.special_ids), {"objective": "goldfish", "goldfish": asdict(cfg)})
    return runs


def train_and_audit(r: StudyRun[Size], data: Data, name: str, loss_fn, meta: dict) -> tuple[torch.nn.Module, dict]:
    """Train one model (same initialization and data order for every run), then audit its memorization."""
    size = r.size
    print(f"[goldfish study] training {name} ({size.steps} steps, {data.rows.shape[0]} documents x {size.tokens} tokens)")
    model, info = _train_one(name, loss_fn, data.rows, data.val_stream, size, data.tok, r.out, r.seed, r.device, meta)
    t0 = time.perf_counter()
    report = audit_memorization(model, data.rows.tolist(), heldout=[d for _, d in data.held], prompt_tokens=size.prompt_tokens,
                                new_tokens=size.new_tokens, num_beams=size.num_beams, tokenizer=data.tok,
                                ids=[data.arts[i][0] for i in data.train_idx], heldout_ids=[t for t, _ in data.held],
                                batch_size=25, device=r.device, progress=True)
    write_audit_report(report, r.out / name / "audit")
    info["audit_seconds"] = time.perf_counter() - t0
    info["audit"] = report.summary
    print(report.table())
    return model, info


def make_claims(size: Size, results: dict, n_docs: int) -> list[Claim]:
    """The two memorization claims, each rate with its Wilson 95% interval over the training documents."""
    std, gf = (results[k]["audit"]["greedy"]["train"] for k in ("standard", "goldfish"))
    std_exact, gf_exact = std["exact_match_rate"], gf["exact_match_rate"]
    return [
        Claim("standard_memorizes",
              f"Standard training for {results['standard']['epochs']:.0f} epochs on {n_docs} WikiText-2 articles memorizes at least half of them "
              f"(greedy exact match of the {size.new_tokens}-token continuation after a {size.prompt_tokens}-token prompt)",
              "most of 100 Wikipedia articles regurgitated verbatim (LLaMA-2-7B, 100 epochs); target >= 50%",
              f"{fmt_ci(rate_ci(std['exact_match'], n_docs), pct=True)} ({std['exact_match']}/{n_docs})", std_exact >= STANDARD_MIN_EXACT),
        Claim("goldfish_does_not_memorize",
              "Goldfish training (k=4, h=13, hashed mask) on identical data and steps memorizes at most 5% of the documents",
              "no article regurgitated verbatim; target <= 5%",
              f"{fmt_ci(rate_ci(gf['exact_match'], n_docs), pct=True)} ({gf['exact_match']}/{n_docs})", gf_exact <= GOLDFISH_MAX_EXACT),
    ]


def unigram_loss(rows: torch.Tensor, val_stream: torch.Tensor, vocab_size: int) -> float:
    """Held-out loss (nats/token) of the add-one unigram model of the training tokens: the level a model
    reaches by learning token frequencies only."""
    counts = torch.bincount(rows[:, 1:].flatten(), minlength=vocab_size).double() + 1.0  # (V,)
    logp = (counts / counts.sum()).log()
    return float(-logp[val_stream[1:]].mean())


def collect_metrics(r: StudyRun[Size], data: Data, results: dict, model_params: int) -> dict:
    size = r.size
    std, gf = results["standard"], results["goldfish"]
    return {
        "mode": r.mode,
        "subset": {
            "training_documents": data.rows.shape[0],
            "tokens_per_document": size.tokens,
            "heldout_documents": len(data.held),
            "val_tokens": int(data.val_stream.numel() - 1),
            "skipped_short_articles": data.skipped_short,
            "source": "WikiText-2 validation + test articles (bundled), in file order",
        },
        "size": asdict(size),
        "model_params": model_params,
        "runs": {name: {k: v for k, v in res.items() if k != "history"} for name, res in results.items()},
        "standard_exact_match_rate": std["audit"]["greedy"]["train"]["exact_match_rate"],
        "goldfish_exact_match_rate": gf["audit"]["greedy"]["train"]["exact_match_rate"],
        "val_loss_ratio": gf["val_loss"] / std["val_loss"],
        "best_val_loss_ratio": gf["best_val_loss"] / std["best_val_loss"],
        "unigram_val_loss": unigram_loss(data.rows, data.val_stream, data.tok.vocab_size),
        "wall_seconds": r.budget.elapsed(),
        "cpu_seconds": r.budget.cpu_elapsed(),
        "quick_budget_seconds": r.budget.seconds,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_start": r.budget.load_start,
        "loadavg_1min_end": load_average(),
    }


def write_report(path: Path, claims: list[Claim], results: dict, metrics: dict, size: Size) -> None:
    setup = (f"Mode **{metrics['mode']}**: {metrics['subset']['training_documents']} WikiText-2 articles x {size.tokens} tokens, "
             f"GPT d={size.d_model} x {size.n_layer} layers ({metrics['model_params']:,} parameters), {size.steps} steps of "
             f"{size.batch_size} documents ({results['standard']['epochs']:.0f} epochs), BPE vocab {size.vocab_size}. "
             f"Audit: prompt P={size.prompt_tokens}, continuation N={size.new_tokens}, beam width {size.num_beams}; "
             f"{metrics['subset']['heldout_documents']} held-out articles.")
    rows = []
    for name, res in results.items():
        a = res["audit"]
        g, b = a["greedy"]["train"], a.get("beam", {}).get("train", {})
        mia = a.get("membership") or {}
        rows.append([name, f"{g['exact_match_rate']:.1%}", f"{b.get('exact_match_rate', float('nan')):.1%}", f"{g['token_match']:.3f}",
                     f"{g['rougeL']:.3f}", f"{g['longest_run']:.1f}", f"{a['greedy'].get('heldout', {}).get('exact_match_rate', float('nan')):.1%}",
                     f"{mia.get('loss_auc', float('nan')):.3f}", f"{mia.get('zlib_auc', float('nan')):.3f}",
                     f"{res['best_val_loss']:.3f} (step {res['best_val_step']})", f"{res['val_loss']:.3f}", f"{res['train_seconds']:.0f}"])
    table = md_table(["run", "greedy exact", "beam exact", "token match", "RougeL", "longest run", "held-out exact", "loss AUC", "zlib AUC",
                      "best val loss", "final val loss", "train s"], rows, "l" + "r" * 11)
    clock = (f"Wall time {metrics['wall_seconds']:.0f} s ({metrics['cpu_seconds']:.0f} s CPU), 1-min load average "
             f"{metrics['loadavg_1min_start']:.1f} at start and {metrics['loadavg_1min_end']:.1f} at the end.")
    doc = Markdown("Goldfish loss: memorization with and without goldfish training").section(None, setup).claims(claims)
    doc.section("Memorization audit", table, clock)
    doc.section("Validation loss: not a claim in the quick tier",
                f"Held-out WikiText-2 loss: best checkpoint standard {results['standard']['best_val_loss']:.3f} (step "
                f"{results['standard']['best_val_step']}), goldfish {results['goldfish']['best_val_loss']:.3f} (step {results['goldfish']['best_val_step']}), "
                f"ratio {metrics['best_val_loss_ratio']:.3f}; after the last step {results['standard']['val_loss']:.3f} and {results['goldfish']['val_loss']:.3f}. "
                f"A unigram model of the training tokens scores {metrics['unigram_val_loss']:.3f}, a uniform guess {math.log(size.vocab_size):.3f}. "
                "The claim is about the model that does not memorize; but the best checkpoints come early, before either model has "
                "memorized anything (not the models the audit measures), and the audited models are overfit past a uniform guess. "
                "No point of this run measures the trade-off, so the claim is left to the real tier (a pretrained model).")
    doc.image("goldfish.png", "goldfish").write(path)


AUDIT_BARS = (("greedy exact", lambda a: a["greedy"]["train"]["exact_match_rate"]),
              ("beam exact", lambda a: a.get("beam", {}).get("train", {}).get("exact_match_rate", 0.0)),
              ("token match", lambda a: a["greedy"]["train"]["token_match"]),
              ("RougeL", lambda a: a["greedy"]["train"]["rougeL"]))


def plot(results: dict, path: Path, size: Size) -> None:
    with figure(path, 2, (11, 4)) as (ax1, ax2):
        for name, res in results.items():
            steps = [h["step"] for h in res["history"]]
            (line,) = ax1.plot(steps, [h.get("all_token_loss", h["loss"]) for h in res["history"]], label=f"{name}: all tokens")
            if "all_token_loss" in res["history"][-1]:
                ax1.plot(steps, [h["loss"] for h in res["history"]], "--", color=line.get_color(), label=f"{name}: kept tokens")
            ax1.plot([st for st, _ in res["val_curve"]], [v for _, v in res["val_curve"]], ":o", ms=3, color=line.get_color(),
                     label=f"{name}: held-out (validation)")
        ax1.set_yscale("log")
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss (nats/token)")
        ax1.set_title("training and held-out loss")
        ax1.legend(fontsize=8)
        names = list(results)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            vals = [f(results[name]["audit"]) for _, f in AUDIT_BARS]
            ax2.bar([i + j * width for i in range(len(AUDIT_BARS))], vals, width, label=name)
        ax2.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(AUDIT_BARS))], [m for m, _ in AUDIT_BARS])
        ax2.set_ylim(0, 1.05)
        ax2.set_title(f"memorization of the training documents (P={size.prompt_tokens}, N={size.new_tokens})")
        ax2.legend(fontsize=8)
