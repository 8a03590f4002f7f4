"""Goldfish study, real tier: the paper's extreme-memorization setting on SmolLM2-135M-Instruct.

Hans et al. 2024 ("Be like a Goldfish, Don't Memorize!", Sec. 4.1, Fig. 1-2) fine-tune TinyLlama-1.1B
on 100 Wikipedia articles for 100 epochs: with the standard loss it regurgitates most of them
verbatim (84/100 exact), with the goldfish loss (k = 4, h = 13, hashed mask) none, and the goldfish
model's held-out loss stays close to the standard one's. Our version, at the scale 2 CPU cores allow:

- **Data**: the bundled WikiText-2 *test* split, cut into articles at its ``" = Title = "`` lines.
  ``articles`` of those with at least ``tokens + 1`` SmolLM2 tokens, chosen by a seeded permutation,
  each truncated to its first ``tokens + 1`` tokens, are the training documents (one row each);
  the next ``heldout_documents`` of the permutation are held out (membership inference and an
  extraction control). The held-out loss is measured on ``val_windows`` windows of
  ``val_window_tokens`` tokens spread evenly over the WikiText-2 *validation* split (never trained on).
- **Models**: full fine-tuning (every weight, the paper's setting) of SmolLM2-135M-Instruct from the
  same pretrained weights, data order, steps and optimizer: the standard loss, goldfish k = 4 (the
  paper's headline) and goldfish k = 8 (drops half as many tokens: the paper's Sec. 4.2 shows that
  memorization grows with k, so k = 8 tests whether that dose-response shows at our scale).
- **Audit** (``rizzearch.eval.memorization``): prompt with the first ``prompt_tokens`` tokens of each
  training document and decode greedily the rest of it (``tokens + 1 - prompt_tokens`` tokens): exact
  match, RougeL (the paper's Fig. 2 histogram) and the longest verbatim run, for the pretrained model
  (the control: what it knew before), and each fine-tuned model.

Claims (thresholds fixed here before any run): standard fine-tuning regurgitates *most* articles
(the Wilson 95% interval of the exact-match rate lies above 50%); goldfish k = 4 regurgitates
(almost) none (exact-match rate <= ``GOLDFISH_MAX_EXACT``); the goldfish model's held-out loss is
within ``VAL_MARGIN_NATS`` of the standard model's (the upper end of the paired bootstrap interval
of goldfish - standard over validation windows is below the margin); memorization grows with k
(mean RougeL of k = 8 above that of k = 4, paired bootstrap interval above 0).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rizzearch import corpora
from rizzearch.data.batches import RowBatches
from rizzearch.errors import DataError
from rizzearch.eval.memorization import audit_memorization, document_losses
from rizzearch.eval.memorization import write_report as write_audit_report
from rizzearch.objectives.goldfish import GoldfishConfig
from rizzearch.reproduce.common import (Claim, Markdown, Modes, StudyRun, figure, fmt_ci, load_averages, md_table, mean_ci, rate_ci,
                                        real_model)
from rizzearch.reproduce.goldfish import split_articles
from rizzearch.training.losses import GoldfishLoss, lm_loss
from rizzearch.training.loop import TrainConfig
from rizzearch.training.loop import train as train_loop

STUDY = "goldfish"
GOLDFISH_MAX_EXACT = 0.05  # "(almost) none": at most 5% of the articles regurgitated exactly
VAL_MARGIN_NATS = 0.05  # the goldfish model's held-out loss may exceed the standard one's by at most this
QUIET_S_PER_TRAIN_TOKEN = 4.4 / 1024  # forward + backward of SmolLM2 (full fine-tune), 2 quiet cores
QUIET_S_PER_EVAL_TOKEN = 1.4 / 1024  # forward only


@dataclass(frozen=True)
class Size:
    """Sizes of one mode of the real tier.

    Args:
        articles: N, training articles (WikiText-2 test split, chosen by a seeded permutation).
        tokens: L, tokens of each article trained on (each row holds L + 1 ids).
        epochs: E, passes over the training articles (identical for every run).
        batch_size: articles per optimizer step.
        lr: peak learning rate (AdamW, no weight decay, short warmup then cosine decay to 10%).
        ks: goldfish k of each goldfish run (the first one is the headline claim's).
        h: goldfish hash context width.
        prompt_tokens: P, audit prompt tokens; the rest of the trained span (L + 1 - P) is compared.
        heldout_documents: held-out test-split articles audited (membership inference, control).
        val_windows: validation windows (held-out loss; the unit of the bootstrap).
        val_window_tokens: tokens per validation window.
        audit_batch: documents per generation batch of the audit.
    """

    articles: int
    tokens: int
    epochs: int
    batch_size: int
    lr: float
    ks: tuple[int, ...] = (4, 8)
    h: int = 13
    prompt_tokens: int = 32
    heldout_documents: int = 12
    val_windows: int = 32
    val_window_tokens: int = 256
    audit_batch: int = 16

    @property
    def new_tokens(self) -> int:
        return self.tokens + 1 - self.prompt_tokens

    @property
    def steps(self) -> int:
        return self.epochs * self.articles // self.batch_size


# lr 3e-4: a pilot (standard loss only, 8 articles x 128 tokens, batch 4, constant lr 2e-4; exact match
# read from teacher-forced argmaxes, which equals greedy exact match) reached 4/8 exact after 7 epochs
# at 99.1% token accuracy (loss 0.11, falling ~0.6x per epoch): near-total regurgitation needs about
# 12 epochs at 2e-4 (a cumulative per-article lr of ~2.4e-3). With warmup and cosine decay to 10%
# the quick run gives each article 20 epochs at a mean lr of ~1.65e-4 (cumulative ~3.3e-3).
QUICK = Size(articles=20, tokens=128, epochs=20, batch_size=4, lr=3e-4)
FULL = Size(articles=48, tokens=256, epochs=20, batch_size=4, lr=3e-4, val_windows=64)
TINY = Size(articles=6, tokens=40, epochs=2, batch_size=3, lr=1e-3, prompt_tokens=16, heldout_documents=3, val_windows=4,
            val_window_tokens=32, audit_batch=4)
MODES = Modes(tiny=TINY, quick=QUICK, full=FULL, budget_s={"tiny": 120.0, "quick": 18 * 60.0, "full": 90 * 60.0}, tier="real")


@dataclass
class Data:
    """Training rows, audited held-out articles and validation windows, all in SmolLM2 tokens."""

    titles: list[str]  # training article titles, one per row
    train_idx: list[int]  # indices of the training articles in the test split
    held_idx: list[int]  # indices of the held-out articles
    rows: torch.Tensor  # (N, L + 1)
    held_titles: list[str]
    held: list[list[int]]  # held-out articles, truncated to L + 1 tokens
    val: list[list[int]]  # validation windows of val_window_tokens + 1 ids (valid split)
    candidates: int  # test-split articles long enough to be chosen


def prepare_data(size: Size, tok, seed: int, out: Path) -> Data:
    """Choose the articles (seeded permutation of the long-enough test-split articles), cut the
    validation windows and write documents.jsonl / heldout.jsonl (the exact training text)."""
    arts = split_articles(corpora.path("wikitext-2-test").read_text(encoding="utf-8"))
    enc = [tok.encode(t) for _, t in arts]
    long = [i for i, e in enumerate(enc) if len(e) >= size.tokens + 1]
    if len(long) < size.articles + 2:
        raise DataError(f"wikitext-2-test: {len(long)} articles have >= {size.tokens + 1} tokens; the study needs {size.articles} + 2 held-out")
    perm = torch.randperm(len(long), generator=torch.Generator().manual_seed(seed)).tolist()
    train_idx = [long[p] for p in perm[: size.articles]]
    held_idx = [long[p] for p in perm[size.articles : size.articles + size.heldout_documents]]
    rows = torch.tensor([enc[i][: size.tokens + 1] for i in train_idx])  # (N, L + 1)
    valid = tok.encode(corpora.path("wikitext-2-valid").read_text(encoding="utf-8"))
    W, n = size.val_window_tokens, size.val_windows
    if len(valid) < n * (W + 1):
        raise DataError(f"wikitext-2-valid: {len(valid)} tokens, fewer than {n} windows of {W + 1}")
    starts = [round(j * (len(valid) - W - 1) / max(n - 1, 1)) for j in range(n)]  # evenly spread, fixed
    for fname, idx in (("documents.jsonl", train_idx), ("heldout.jsonl", held_idx)):
        (out / fname).write_text("".join(json.dumps({"id": arts[i][0], "text": tok.decode(enc[i][: size.tokens + 1])}) + "\n" for i in idx))
    return Data([arts[i][0] for i in train_idx], train_idx, held_idx, rows, [arts[i][0] for i in held_idx], [enc[i][: size.tokens + 1] for i in held_idx],
                [valid[s : s + W + 1] for s in starts], len(long))


def check_disjoint(data: Data) -> None:
    """No article is both trained on and held out (DataError naming it); titles can repeat (``<unk>``), indices cannot."""
    both = sorted(set(data.train_idx) & set(data.held_idx))
    if both:
        raise DataError(f"test-split article(s) {both[:3]} both trained on and held out")


def window_losses(model, windows: list[list[int]], batch_size: int = 8) -> list[float]:
    """Mean next-token loss (nats) of each validation window."""
    return [nll / n for nll, n in document_losses(model, windows, batch_size=batch_size)]


class Progress:
    """Progress lines with an ETA on stderr: phases weighted by their estimated quiet-machine seconds."""

    def __init__(self, r: StudyRun, phases: dict[str, float]):
        self.r, self.phases, self.done = r, phases, 0.0
        total = sum(phases.values())
        print(f"[goldfish real] {r.mode}: estimated {total / 60:.1f} min on 2 quiet cores ({', '.join(f'{k} {v:.0f}s' for k, v in phases.items())})",
              file=sys.stderr, flush=True)

    def finished(self, phase: str) -> None:
        self.done += self.phases[phase]
        left = sum(self.phases.values()) - self.done
        el = self.r.budget.elapsed()
        eta = el / max(self.done, 1e-9) * left  # the estimate's phase weights, scaled by the speed measured so far
        loads = load_averages()
        print(f"[goldfish real] {phase} done; {el:.0f}s elapsed, ETA {eta:.0f}s (1-min load {loads[0] if loads else math.nan:.1f})",
              file=sys.stderr, flush=True)


def estimate(size: Size) -> dict[str, float]:
    """Quiet-machine seconds of each phase (from the measured per-token costs of SmolLM2)."""
    train_s = QUIET_S_PER_TRAIN_TOKEN * size.steps * size.batch_size * size.tokens
    val_s = QUIET_S_PER_EVAL_TOKEN * size.val_windows * size.val_window_tokens
    audit_s = QUIET_S_PER_EVAL_TOKEN * (size.articles + size.heldout_documents) * (size.tokens + 1) * 4  # greedy decode ~4x a forward
    phases = {"base": val_s + audit_s}
    for name in run_names(size):
        phases[name] = train_s + val_s + audit_s
    return phases


def run_names(size: Size) -> list[str]:
    return ["standard"] + [f"goldfish-k{k}" for k in size.ks]


def loss_for(name: str, size: Size, tok, seed: int):
    """The loss of a run: ``lm_loss`` for standard, the goldfish loss (hash, h) for goldfish-kK."""
    if name == "standard":
        return lm_loss, {"objective": "lm"}
    cfg = GoldfishConfig(k=int(name.split("-k")[1]), h=size.h, strategy="hash", seed=seed)
    return GoldfishLoss(cfg, protected_ids=tok.special_ids), {"objective": "goldfish", "goldfish": asdict(cfg)}


def fine_tune(base, name: str, r: StudyRun[Size], data: Data, tok):
    """Full fine-tuning of a copy of ``base`` (same data order and optimizer for every run) -> (model, info)."""
    size = r.size
    loss_fn, meta = loss_for(name, size, tok, r.seed)
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(True)
    rows = data.rows
    batches = RowBatches({"input_ids": rows[:, :-1], "targets": rows[:, 1:]}, size.batch_size, seed=r.seed)
    cfg = TrainConfig(steps=size.steps, batch_size=size.batch_size, lr=size.lr, warmup_steps=max(1, size.steps // 20), weight_decay=0.0,
                      log_every=1, seed=r.seed, device=r.device)
    t0 = time.perf_counter()
    res = train_loop(model, loss_fn, batches, cfg, r.out / name, meta=meta, progress=True, save_checkpoints=False)
    model.eval()
    hist = [{"step": h["step"], "loss": h["loss"], "all_token_loss": h.get("all_token_loss", h["loss"])} for h in res.history]
    return model, {"train_seconds": time.perf_counter() - t0, "steps": size.steps, "epochs": size.steps * size.batch_size / rows.shape[0],
                   "final_train_loss": hist[-1]["all_token_loss"], "history": hist, "objective": meta}


def audit(model, name: str, r: StudyRun[Size], data: Data, tok) -> dict:
    """The memorization audit of one model (greedy only, as the paper) -> summary + per-article rows."""
    size = r.size
    rep = audit_memorization(model, data.rows.tolist(), heldout=data.held, prompt_tokens=size.prompt_tokens, new_tokens=size.new_tokens,
                             num_beams=1, tokenizer=tok, ids=data.titles, heldout_ids=data.held_titles, batch_size=size.audit_batch,
                             device=r.device)
    write_audit_report(rep, r.out / name / "audit")
    train_rows = [x for x in rep.rows if x["split"] == "train" and not x["skipped"]]
    return {"summary": rep.summary, "rougeL": [x["greedy_rougeL"] for x in train_rows], "exact": [bool(x["greedy_exact"]) for x in train_rows],
            "longest_run": [x["greedy_longest_run"] for x in train_rows]}


def evaluate(model, name: str, r: StudyRun[Size], data: Data, tok, info: dict) -> dict:
    t0 = time.perf_counter()
    info["val_window_losses"] = window_losses(model, data.val)
    info["val_loss"] = sum(info["val_window_losses"]) / len(info["val_window_losses"])
    info["audit"] = audit(model, name, r, data, tok)
    info["eval_seconds"] = time.perf_counter() - t0
    return info


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Run the real-tier Goldfish study; writes results.json (last), report.md, two plots and one folder per run."""
    r = StudyRun.start(STUDY, out_dir, MODES, full=full, tiny=tiny, device=device, seed=seed)
    prog = Progress(r, estimate(r.size))
    pretrained, model_name = real_model(r)
    base, tok = pretrained.model, pretrained.tokenizer
    data = prepare_data(r.size, tok, seed, r.out)
    check_disjoint(data)
    results = {"base": evaluate(base, "base", r, data, tok, {"train_seconds": 0.0, "history": []})}
    prog.finished("base")
    for name in run_names(r.size):
        model, info = fine_tune(base, name, r, data, tok)
        results[name] = evaluate(model, name, r, data, tok, info)
        del model
        prog.finished(name)
    stats = compare(results, r.size, seed)
    claims = make_claims(stats, r.size, model_name)
    metrics = collect_metrics(r, data, results, stats, model_name)
    plot_rouge(results, r.out / "rougeL_histogram.png", r.size)
    plot_training(results, r.out / "training.png")
    write_report(r.out / "report.md", claims, results, stats, metrics, r.size)
    return r.finish(claims, metrics)


def compare(results: dict, size: Size, seed: int) -> dict:
    """Rates with Wilson intervals, held-out loss differences and RougeL differences with paired bootstrap intervals."""
    out: dict = {"exact": {}, "rougeL": {}, "val_loss": {}}
    for name, res in results.items():
        a = res["audit"]
        out["exact"][name] = rate_ci(sum(a["exact"]), len(a["exact"]))
        out["rougeL"][name] = mean_ci(a["rougeL"], seed=seed, key=f"rougeL-{name}")
        out["val_loss"][name] = mean_ci(res["val_window_losses"], seed=seed, key=f"val-{name}")
    std = results["standard"]["val_window_losses"]
    out["val_diff_vs_standard"] = {name: mean_ci([g - s for g, s in zip(results[name]["val_window_losses"], std)], seed=seed, key=f"dval-{name}")
                                   for name in results if name != "standard"}
    gf = [f"goldfish-k{k}" for k in size.ks]
    if len(gf) > 1:
        lo_k, hi_k = results[gf[0]]["audit"]["rougeL"], results[gf[-1]]["audit"]["rougeL"]
        out["rougeL_diff_k"] = mean_ci([b - a for a, b in zip(lo_k, hi_k)], seed=seed, key="drougeL-k")
    return out


def make_claims(stats: dict, size: Size, model: str) -> list[Claim]:
    """The study's claims from the measured statistics (pure: hand-made numbers can make any claim fail)."""
    k0 = f"goldfish-k{size.ks[0]}"
    std_ex, gf_ex = stats["exact"]["standard"], stats["exact"][k0]
    dval = stats["val_diff_vs_standard"][k0]
    claims = [
        Claim("standard_regurgitates_most",
              f"Standard full fine-tuning ({size.epochs} epochs on {size.articles} WikiText-2 articles of {size.tokens} tokens) regurgitates most "
              f"articles: greedy exact match of the {size.new_tokens}-token continuation after a {size.prompt_tokens}-token prompt "
              "(95% Wilson interval above 50%)",
              "84/100 articles memorized exactly (TinyLlama-1.1B, 100 epochs, Fig. 1)",
              f"{fmt_ci(std_ex, pct=True)} exact; RougeL {fmt_ci(stats['rougeL']['standard'])}; pretrained model before fine-tuning "
              f"{fmt_ci(stats['exact']['base'], pct=True)}", std_ex["ci95"][0] > 0.5, model),
        Claim("goldfish_regurgitates_none",
              f"Goldfish fine-tuning (k={size.ks[0]}, h={size.h}, hashed mask), same data, steps and optimizer, regurgitates (almost) none "
              f"(exact-match rate <= {GOLDFISH_MAX_EXACT:.0%})",
              "0/100 articles memorized exactly (k=4, Fig. 1)",
              f"{fmt_ci(gf_ex, pct=True)} exact; RougeL {fmt_ci(stats['rougeL'][k0])}", gf_ex["rate"] <= GOLDFISH_MAX_EXACT, model),
        Claim("goldfish_heldout_loss_cost",
              f"The goldfish (k={size.ks[0]}) model's held-out WikiText-2 loss is within {VAL_MARGIN_NATS} nats of the standard model's "
              "(upper end of the paired bootstrap 95% interval of goldfish - standard, over validation windows, below the margin)",
              "little to no cost in validation loss / benchmark performance (Sec. 4.1-4.2)",
              f"goldfish - standard = {fmt_ci(dval)} nats; standard {fmt_ci(stats['val_loss']['standard'])}, goldfish "
              f"{fmt_ci(stats['val_loss'][k0])}, pretrained {fmt_ci(stats['val_loss']['base'])}", dval["ci95"][1] <= VAL_MARGIN_NATS, model),
    ]
    if "rougeL_diff_k" in stats:
        k1 = f"goldfish-k{size.ks[-1]}"
        d = stats["rougeL_diff_k"]
        claims.append(Claim(
            "memorization_grows_with_k",
            f"Memorization grows with k: mean RougeL of goldfish k={size.ks[-1]} above k={size.ks[0]} (paired bootstrap interval above 0)",
            "larger k (fewer dropped tokens) memorizes more (Sec. 4.2, Fig. 3)",
            f"RougeL k={size.ks[-1]} - k={size.ks[0]} = {fmt_ci(d)}; exact k={size.ks[-1]} {fmt_ci(stats['exact'][k1], pct=True)}",
            d["ci95"][0] > 0, model))
    return claims


def collect_metrics(r: StudyRun[Size], data: Data, results: dict, stats: dict, model_name: str) -> dict:
    loads = load_averages()
    runs = {}
    for name, res in results.items():
        runs[name] = {k: v for k, v in res.items() if k not in ("audit", "val_window_losses")}
        runs[name]["audit_summary"] = res["audit"]["summary"]
        runs[name]["rougeL_per_article"] = res["audit"]["rougeL"]
    return {
        "mode": r.mode, "tier": r.tier, "model": model_name, "size": {**asdict(r.size), "steps": r.size.steps, "new_tokens": r.size.new_tokens},
        "subset": {"training_articles": data.titles, "heldout_articles": data.held_titles, "candidate_articles": data.candidates,
                   "val_tokens": sum(len(w) - 1 for w in data.val), "source": "WikiText-2 test split (training), validation split (held-out loss)"},
        "fine_tuning": "full (every weight)", "lr_grid": [r.size.lr], "selected_lr": r.size.lr,
        "lr_note": "one learning rate, fixed from a pilot on the training loss and memorization of the standard run only (no held-out number seen)",
        "thresholds": {"goldfish_max_exact": GOLDFISH_MAX_EXACT, "val_margin_nats": VAL_MARGIN_NATS},
        "stats": stats, "runs": runs,
        "phase_seconds": {name: res.get("train_seconds", 0.0) + res["eval_seconds"] for name, res in results.items()},
        "quiet_estimate_seconds": sum(estimate(r.size).values()),
        "wall_seconds": r.budget.elapsed(), "cpu_seconds": r.budget.cpu_elapsed(), "budget_seconds": r.budget.seconds,
        "torch_threads": torch.get_num_threads(), "loadavg_1min_start": r.budget.load_start, "loadavg_end": list(loads) if loads else None,
    }


def write_report(path: Path, claims: list[Claim], results: dict, stats: dict, metrics: dict, size: Size) -> None:
    setup = (f"Mode **{metrics['mode']}**, model **{metrics['model']}**, full fine-tuning. {size.articles} WikiText-2 test-split articles "
             f"x {size.tokens} tokens, {size.epochs} epochs ({size.steps} steps of {size.batch_size} articles), lr {size.lr}; goldfish "
             f"k in {list(size.ks)}, h={size.h}, hashed mask. Audit: prompt {size.prompt_tokens} tokens, greedy continuation of "
             f"{size.new_tokens} tokens. Held-out loss: {size.val_windows} windows x {size.val_window_tokens} tokens of the validation split.")
    rows = []
    for name, res in results.items():
        s = res["audit"]["summary"]
        mia = s.get("membership") or {}
        rows.append([name, fmt_ci(stats["exact"][name], pct=True), fmt_ci(stats["rougeL"][name]), f"{s['greedy']['train']['longest_run']:.1f}",
                     f"{s['greedy'].get('heldout', {}).get('exact_match_rate', float('nan')):.1%}", f"{mia.get('loss_auc', float('nan')):.3f}",
                     fmt_ci(stats["val_loss"][name]), f"{res.get('train_seconds', 0.0):.0f}"])
    table = md_table(["model", "exact match", "RougeL", "longest run", "held-out exact", "loss AUC", "held-out loss (nats)", "train s"], rows,
                     "l" + "r" * 7)
    clock = (f"Wall time {metrics['wall_seconds']:.0f} s ({metrics['cpu_seconds']:.0f} s CPU, {metrics['torch_threads']} threads); 1-min load "
             f"average {metrics['loadavg_1min_start'] or float('nan'):.1f} at the start, {(metrics['loadavg_end'] or [float('nan')])[0]:.1f} at the "
             f"end; quiet-machine estimate {metrics['quiet_estimate_seconds']:.0f} s.")
    doc = Markdown("Goldfish loss on a real model: SmolLM2-135M-Instruct, extreme memorization").section(None, setup).claims(claims)
    doc.section("Memorization audit and held-out loss", table, clock)
    doc.image("rougeL_histogram.png", "RougeL histogram").image("training.png", "training loss").write(path)


def plot_rouge(results: dict, path: Path, size: Size) -> None:
    """The paper's Fig. 2: histogram of the per-article RougeL of each model."""
    names = list(results)
    with figure(path, len(names), (3.2 * len(names), 3.2)) as axes:
        for ax, name in zip(axes, names):
            ax.hist(results[name]["audit"]["rougeL"], bins=[i / 10 for i in range(11)], color="tab:red" if name == "standard" else "tab:blue")
            ax.set_xlim(0, 1)
            a = results[name]["audit"]
            ax.set_title(f"{name}: {sum(a['exact'])}/{len(a['exact'])} exact", fontsize=9)
            ax.set_xlabel("RougeL")
        axes[0].set_ylabel(f"articles (of {size.articles})")


def plot_training(results: dict, path: Path) -> None:
    with figure(path, 2, (10, 3.6)) as (ax1, ax2):
        names = [n for n in results if results[n]["history"]]
        for name in names:
            h = results[name]["history"]
            ax1.plot([x["step"] for x in h], [x["all_token_loss"] for x in h], label=f"{name} (all tokens)")
        ax1.set_yscale("log")
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (nats/token)")
        ax1.legend(fontsize=8)
        vals = [sum(results[n]["val_window_losses"]) / len(results[n]["val_window_losses"]) for n in results]
        ax2.bar(list(results), vals, color=["gray"] + ["tab:red"] + ["tab:blue"] * (len(results) - 2))
        ax2.set_ylim(min(vals) - 0.2, max(vals) + 0.1)
        ax2.set_ylabel("held-out WikiText-2 loss (nats)")
