"""xLSTM study (Beck et al. 2024): memory mixing solves state tracking; matrix memory recalls.

Two synthetic tasks from the paper (section 4.1), at laptop scale, every model trained through the
shared loop (``rizzearch.training.loop.train``) with the same optimizer, steps and data order:

- **Parity** (formal language, paper figure 4 / Deletang et al. 2023): train on bit strings of
  lengths 3..40 with the running parity as the target, test the answer after the last bit on
  lengths 64, 128 and 256 (never seen in training). Each model gets up to 3 seeds and reports the
  best (the protocol of Deletang et al. 2023, which the paper follows). The paper: sLSTM (exponential gating *and*
  memory mixing through its recurrent matrices) solves parity and extrapolates; Transformers and
  the mLSTM (no memory mixing) do not. Models: GPT (2 layers), xLSTM[1:0] (two mLSTM blocks) and
  xLSTM[0:1] (one sLSTM block); ``full`` adds xLSTM[1:1].
- **MQAR** (multi-query associative recall, paper figure 5 / Arora et al. 2023): 8 key-value
  pairs, then all 8 keys queried in a random order. GPT, xLSTM[1:0] and xLSTM[1:1] at (about) the
  same parameter count: each model's width is chosen so its parameters are closest to those of
  xLSTM[1:1] at d_model = 64. Accuracy on held-out sequences.

Claims: (1) the sLSTM model reaches >= 0.9 accuracy on every test length longer than the training
lengths; (2) GPT and the mLSTM-only model stay near chance there (<= 0.6; chance = 0.5);
(3) an xLSTM with mLSTM blocks solves MQAR at this scale (>= 0.9). GPT's MQAR accuracy is reported
beside them (the paper's Transformer baseline solves MQAR; at our budget it may not have
converged, and the report says so). Each claim's ``holds`` is what we measured.

The models are tiny, so the run uses one intra-op thread (``StudySize.threads``): per-op overhead
dominates, and on a shared 2-core machine two threads per process are many times slower.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from rizzearch.eval.tasks import PARITY_VOCAB, MQARData, MQARSpec, ParityData, mqar_accuracy, parity_accuracy
from rizzearch.models.base import build_model
from rizzearch.training.losses import lm_loss
from rizzearch.reproduce.common import Budget, Claim, load_average, pyplot, read_results, save_figure, study_mode, torch_threads, write_results
from rizzearch.training.loop import TrainConfig
from rizzearch.training.loop import train as train_loop

STUDY = "xlstm"
QUICK_BUDGET_S = 300.0
EXTRAPOLATION_MIN = 0.9  # sLSTM accuracy on every longer test length
CHANCE_MAX = 0.6  # "near chance" (0.5) for GPT and mLSTM-only on the longer lengths
MQAR_MIN = 0.9  # best xLSTM-with-mLSTM accuracy on MQAR


@dataclass(frozen=True)
class StudySize:
    """Sizes of one study mode.

    Args:
        parity_train_len: (min, max) bit-string lengths seen in training.
        parity_test_lens: test lengths (all longer than the training maximum).
        parity_steps: optimizer steps of each parity run.
        parity_models: which parity models to train (gpt, mlstm, slstm, mixed).
        parity_seeds: at most this many training seeds per parity model; the best is reported
            (Deletang et al. 2023 report the best of several seeds) and every seed's result is
            kept. A model stops trying seeds once one reaches EXTRAPOLATION_MIN on every longer
            length (the same rule for every model, so the reported maximum is unchanged).
        parity_eval_n: test strings per length.
        mqar: the MQAR layout (pairs, key and value alphabets).
        mqar_steps: optimizer steps of each MQAR run.
        mqar_d: width of the reference model xLSTM[1:1] whose parameter count the others match.
        mqar_eval_n: held-out MQAR sequences.
        d_model: width of the parity models.
        batch_size: sequences per step.
        parity_lr: peak learning rate of the parity runs (all models).
        lr: peak learning rate of the MQAR runs (all models).
        threads: torch intra-op threads during the study (restored afterwards).
    """

    parity_train_len: tuple[int, int] = (3, 40)
    parity_test_lens: tuple[int, ...] = (64, 128, 256)
    parity_steps: int = 300
    parity_models: tuple[str, ...] = ("gpt", "mlstm", "slstm")
    parity_seeds: int = 3
    parity_eval_n: int = 256
    mqar: MQARSpec = field(default_factory=MQARSpec)
    mqar_steps: int = 600
    mqar_d: int = 64
    mqar_eval_n: int = 512
    d_model: int = 64
    batch_size: int = 32
    parity_lr: float = 1e-2
    lr: float = 3e-3
    threads: int = 1


QUICK = StudySize()
TINY = StudySize(
    parity_train_len=(3, 12),
    parity_test_lens=(16, 24),
    parity_steps=40,
    parity_seeds=1,
    parity_eval_n=64,
    mqar=MQARSpec(n_pairs=4, n_keys=16, n_values=16),
    mqar_steps=30,
    mqar_d=32,
    mqar_eval_n=64,
    d_model=32,
    batch_size=16,
)
FULL = replace(
    QUICK, parity_steps=1000, parity_seeds=5, parity_models=("gpt", "mlstm", "slstm", "mixed"), mqar_steps=2000, parity_eval_n=512, mqar_eval_n=2048
)

LABELS = {
    "gpt": "GPT",
    "mlstm": "xLSTM[1:0] (mLSTM only)",
    "slstm": "xLSTM[0:1] (sLSTM)",
    "mixed": "xLSTM[1:1]",
}


def model_overrides(kind: str, d_model: int, vocab_size: int) -> tuple[str, dict]:
    """(registry name, overrides) of each study model at width ``d_model``."""
    if kind == "gpt":
        return "gpt", dict(vocab_size=vocab_size, n_layer=2, d_model=d_model, n_head=4)
    common = dict(vocab_size=vocab_size, d_model=d_model, mlstm_heads=4, slstm_heads=4, round_to=8, chunk_size=64)
    if kind == "mlstm":
        return "xlstm", dict(common, n_blocks=2, slstm_at=())
    if kind == "slstm":
        return "xlstm", dict(common, n_blocks=1, slstm_at=(0,))
    if kind == "mixed":
        return "xlstm", dict(common, n_blocks=2, slstm_at=(1,))
    raise ValueError(f"unknown study model {kind!r}")


def n_params(kind: str, d_model: int, vocab_size: int) -> int:
    name, kw = model_overrides(kind, d_model, vocab_size)
    with torch.device("meta"):
        return build_model(name, **kw).num_params()


def matched_width(kind: str, target: int, vocab_size: int) -> int:
    """The width (a multiple of 8, at most 512) whose parameter count is closest to ``target``.

    Parameter counts grow with the width, so a bisection finds the first width at or above the
    target; the answer is it or its predecessor.
    """
    widths = list(range(8, 513, 8))
    lo, hi = 0, len(widths) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if n_params(kind, widths[mid], vocab_size) < target:
            lo = mid + 1
        else:
            hi = mid
    near = widths[max(lo - 1, 0) : lo + 1]
    return min(near, key=lambda d: abs(n_params(kind, d, vocab_size) - target))


def _train(kind: str, d_model: int, vocab_size: int, data, steps: int, lr: float, size: StudySize, run_dir: Path, seed: int, device: str, max_s: float | None):
    name, kw = model_overrides(kind, d_model, vocab_size)
    torch.manual_seed(seed)
    model = build_model(name, **kw)
    cfg = TrainConfig(
        steps=steps, batch_size=size.batch_size, lr=lr, warmup_steps=min(20, steps // 4), weight_decay=0.0,
        grad_clip=1.0, log_every=max(1, steps // 20), seed=seed, device=device, max_seconds=max_s,
    )
    t0 = time.perf_counter()
    result = train_loop(model, lm_loss, data, cfg, run_dir, progress=True, save_checkpoints=False)
    info = {
        "d_model": d_model,
        "params": model.num_params(),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "final_loss": result.final_loss,
        "train_seconds": time.perf_counter() - t0,
        "loss_curve": [(h["step"], h["loss"]) for h in result.history],
    }
    return model, info


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Run the study; writes results.json, report.md, xlstm.png and one folder per training run."""
    mode = study_mode(full, tiny)
    size = {"tiny": TINY, "quick": QUICK, "full": FULL}[mode]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(QUICK_BUDGET_S * (10 if full else 1))
    load_start = load_average()
    with torch_threads(size.threads):
        parity, mqar = _run_tasks(size, out, seed, device, budget, full)
    wall = budget.elapsed()
    load_end = load_average()

    longer = [L for L in size.parity_test_lens if L > size.parity_train_len[1]]
    acc = {k: {L: parity[k]["accuracy"][L] for L in longer} for k in parity}
    s_min = min(acc["slstm"].values())
    others = {k: max(acc[k].values()) for k in ("gpt", "mlstm") if k in acc}
    xl = {k: mqar[k]["accuracy"] for k in ("mlstm", "mixed") if k in mqar}
    best_xl = max(xl, key=xl.get)
    claims = [
        Claim(
            id="parity_slstm_extrapolates",
            statement=f"A model with sLSTM blocks solves parity on lengths longer than seen in training "
            f"(trained on {size.parity_train_len[0]}-{size.parity_train_len[1]}, tested on {list(longer)})",
            paper_value="sLSTM-based xLSTM solves parity and extrapolates (figure 4: accuracy ~1 on test lengths 40-256)",
            our_value={"min_accuracy_longer": s_min, **{str(L): a for L, a in acc["slstm"].items()}},
            holds=s_min >= EXTRAPOLATION_MIN,
        ),
        Claim(
            id="parity_no_memory_mixing_fails",
            statement="GPT and the mLSTM-only xLSTM stay near chance (0.5) on the longer parity strings",
            paper_value="Transformers and mLSTM (no memory mixing) fail to extrapolate on parity (figure 4)",
            our_value={k: round(v, 4) for k, v in others.items()},
            holds=all(v <= CHANCE_MAX for v in others.values()),
        ),
        Claim(
            id="mqar_xlstm_recalls",
            statement=f"An xLSTM with mLSTM blocks solves MQAR ({size.mqar.n_pairs} pairs) at about "
            f"{mqar['mixed']['params']:,} parameters",
            paper_value="xLSTM[1:1] and xLSTM[1:0] are the best non-Transformer models on MQAR (figure 5)",
            our_value={LABELS[k]: round(v, 4) for k, v in xl.items()} | {"GPT (same size)": round(mqar["gpt"]["accuracy"], 4)},
            holds=xl[best_xl] >= MQAR_MIN,
        ),
    ]
    metrics = {
        "mode": mode,
        "size": asdict(size),
        "parity": parity,
        "mqar": mqar,
        "wall_seconds": wall,
        "budget_seconds": budget.seconds,
        "load_average": {"start": load_start, "end": load_end, "cpu_count": os.cpu_count()},
        "torch_threads": size.threads,
        "device": device,
        "seed": seed,
    }
    _plot(parity, mqar, size, out / "xlstm.png")
    (out / "report.md").write_text(_report(claims, parity, mqar, size, metrics))
    return read_results(write_results(out, STUDY, claims, metrics))


def _run_tasks(size: StudySize, out: Path, seed: int, device: str, budget: Budget, full: bool):
    runs_left = len(size.parity_models) * size.parity_seeds + 3

    def slice_of_budget() -> float | None:
        return None if full else max(5.0, budget.left() / max(runs_left, 1))

    parity = {}
    lo, hi = size.parity_train_len
    longer = [L for L in size.parity_test_lens if L > hi]
    for j, kind in enumerate(size.parity_models):
        tries = []
        for r in range(size.parity_seeds):
            s = seed + 1000 * r
            print(f"[xlstm study] parity: {LABELS[kind]} (seed {s})", flush=True)
            data = ParityData(size.batch_size, lo, hi, seed=s + 100)
            model, info = _train(
                kind, size.d_model, PARITY_VOCAB, data, size.parity_steps, size.parity_lr, size, out / "runs" / f"parity_{kind}_seed{s}", s + j, device, slice_of_budget()
            )
            t0 = time.perf_counter()
            info["accuracy"] = parity_accuracy(model, size.parity_test_lens, n_per_length=size.parity_eval_n, device=device)
            info["accuracy_train_max"] = parity_accuracy(model, [hi], n_per_length=size.parity_eval_n, device=device)[hi]
            info["eval_seconds"] = time.perf_counter() - t0
            info["seed"] = s
            tries.append(info)
            runs_left -= 1
            if min(info["accuracy"][L] for L in longer) >= EXTRAPOLATION_MIN:
                runs_left -= size.parity_seeds - 1 - r
                break
        best = max(tries, key=lambda t: sum(t["accuracy"][L] for L in longer))
        parity[kind] = {**best, "label": LABELS[kind], "seeds": [{k: t[k] for k in ("seed", "accuracy", "accuracy_train_max", "final_loss", "steps")} for t in tries]}

    mqar = {}
    V = size.mqar.vocab_size
    target = n_params("mixed", size.mqar_d, V)
    for j, kind in enumerate(("gpt", "mlstm", "mixed")):
        d = size.mqar_d if kind == "mixed" else matched_width(kind, target, V)
        print(f"[xlstm study] MQAR: {LABELS[kind]} (d_model={d})", flush=True)
        data = MQARData(size.batch_size, size.mqar, seed=seed + 200)
        model, info = _train(kind, d, V, data, size.mqar_steps, size.lr, size, out / "runs" / f"mqar_{kind}", seed + 10 + j, device, slice_of_budget())
        t0 = time.perf_counter()
        info["accuracy"] = mqar_accuracy(model, size.mqar, n=size.mqar_eval_n, device=device)
        info["eval_seconds"] = time.perf_counter() - t0
        info["label"] = LABELS[kind]
        mqar[kind] = info
        runs_left -= 1
    return parity, mqar


def _report(claims, parity, mqar, size: StudySize, metrics: dict) -> str:
    lo, hi = size.parity_train_len
    lines = [
        "# xLSTM study (Beck et al. 2024)",
        "",
        f"Mode: {metrics['mode']}; wall time {metrics['wall_seconds']:.0f} s (budget {metrics['budget_seconds']:.0f} s); "
        f"1-min load average {_fmt_load(metrics['load_average']['start'])} -> {_fmt_load(metrics['load_average']['end'])} "
        f"on {metrics['load_average']['cpu_count']} cores; "
        f"{size.threads} torch thread(s).",
        "",
        "## Claims",
        "",
        "| claim | paper | ours | holds |",
        "|---|---|---|---|",
    ]
    for c in claims:
        lines.append(f"| {c.statement} | {c.paper_value} | {c.our_value} | {'yes' if c.holds else 'no'} |")
    lines += [
        "",
        f"## Parity (trained on lengths {lo}-{hi}; accuracy of the answer after the last bit, chance 0.5)",
        "",
        f"Best of up to {size.parity_seeds} seed(s) per model, chosen by accuracy on the longer lengths (as in Deletang et al. 2023); "
        f"a model stops trying seeds once one reaches {EXTRAPOLATION_MIN} on every longer length. "
        "The last column lists every tried seed's mean accuracy on those lengths.",
        "",
    ]
    lens = list(size.parity_test_lens)
    longer = [L for L in lens if L > hi]
    lines.append("| model | parameters | steps | final train loss | " + " | ".join(f"L={L}" for L in [hi, *lens]) + " | train s | all seeds |")
    lines.append("|---|---:|---:|---:|" + "---:|" * (len(lens) + 1) + "---:|---|")
    for r in parity.values():
        accs = " | ".join(f"{a:.3f}" for a in [r["accuracy_train_max"], *(r["accuracy"][L] for L in lens)])
        per_seed = ", ".join(f"{sum(t['accuracy'][L] for L in longer) / len(longer):.2f}" for t in r["seeds"])
        lines.append(f"| {r['label']} | {r['params']:,} | {r['steps']} | {r['final_loss']:.4f} | {accs} | {r['train_seconds']:.0f} | {per_seed} |")
    sp = size.mqar
    lines += ["", f"## MQAR ({sp.n_pairs} pairs, {sp.n_keys} keys, {sp.n_values} values; widths matched to xLSTM[1:1] at d={size.mqar_d})", ""]
    lines.append("| model | d_model | parameters | steps | final train loss | accuracy | train s |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in mqar.values():
        lines.append(f"| {r['label']} | {r['d_model']} | {r['params']:,} | {r['steps']} | {r['final_loss']:.4f} | {r['accuracy']:.3f} | {r['train_seconds']:.0f} |")
    if any(r["stopped_early"] for r in [*parity.values(), *mqar.values()]):
        lines += ["", "Some runs stopped early at their share of the wall-clock budget (see `steps`)."]
    lines += ["", "![parity and MQAR](xlstm.png)", ""]
    return "\n".join(lines)


def _fmt_load(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _plot(parity, mqar, size: StudySize, path: Path) -> None:
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    lo, hi = size.parity_train_len
    for r in parity.values():
        xs = [hi, *size.parity_test_lens]
        ax1.plot(xs, [r["accuracy_train_max"], *(r["accuracy"][L] for L in size.parity_test_lens)], "o-", label=f"{r['label']} ({r['params']:,})")
    ax1.axvspan(lo, hi, color="0.9", label="training lengths")
    ax1.axhline(0.5, color="0.5", ls=":", lw=1)
    ax1.set_xscale("log", base=2)
    ax1.set_ylim(0.0, 1.05)
    ax1.set_xlabel("sequence length")
    ax1.set_ylabel("parity accuracy (last bit)")
    ax1.set_title("Parity: length extrapolation")
    ax1.legend(fontsize=8)
    names = [r["label"] for r in mqar.values()]
    ax2.bar(range(len(names)), [r["accuracy"] for r in mqar.values()], color=["C0", "C1", "C3"][: len(names)])
    ax2.set_xticks(range(len(names)), [f"{n}\n{r['params']:,} params" for n, r in zip(names, mqar.values())], fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("query accuracy")
    ax2.set_title(f"MQAR ({size.mqar.n_pairs} pairs), equal parameter count")
    save_figure(fig, path)
