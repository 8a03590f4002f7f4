"""ORPO study, real tier (Hong et al. 2024, Sec. 6, Fig. 3): SFT, SFT -> DPO and ORPO on SmolLM2-135M-Instruct.

Base: SmolLM2-135M-Instruct (``common.real_model``; a random tiny llama in tiny mode). Data: the
bundled HH-RLHF harmless-base pairs in the model's own chat template, kept whole when both sequences
fit ``max_tokens``, split by prompt into train / validation / test (``orpo_real_data``).

Methods, all from the same base weights, LoRA r=16 (alpha 32) on every linear layer of every block
(attention q/k/v/o and MLP gate/up/down; the tied embedding/head stays frozen), the same token
budget (one epoch over the same ``steps x batch`` training pairs, the same order) and the same
learning-rate grid ``LR_GRID`` (fixed in this file before any held-out number was seen):

- **SFT**: NLL of the chosen responses.
- **SFT -> DPO**: DPO (beta 0.1) starting from the selected SFT model, which is also the frozen
  reference: its log-probs are precomputed once (one no-grad pass, counted) and shared by the grid.
- **ORPO** lambda 0.1 (the paper's) and lambda 1.0: NLL + lambda * odds-ratio loss, one stage.

Selection (one criterion for every method, fixed in advance): the validation mean log-prob margin
(chosen minus rejected, ``SELECTION``); ties keep the earlier learning rate. The test split is
only read for the selected runs. On the test split: preference accuracy (mean token log-prob of
chosen > rejected), mean log-probs and their margin per pair; for SFT and ORPO also at
``curve_points`` points of training on its first ``curve_pairs`` pairs (adapter snapshots taken during
training, scored after selection: the paper's Fig. 3).

Claims: (1) under SFT the rejected log-prob rises too; (2) ORPO raises the margin more than SFT;
(3) ORPO's preference accuracy is at least SFT's (non-inferiority, ``NONINFERIORITY``); (4) ORPO
needs no reference model and forwards fewer sequences than SFT -> DPO. Every difference is paired
(the same test pairs), with a percentile-bootstrap 95% interval (``common.mean_ci``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rizzearch.data.batches import RowBatches
from rizzearch.errors import CheckpointError
from rizzearch.objectives.dpo import DPOConfig
from rizzearch.objectives.orpo import ORPOConfig
from rizzearch.reproduce.common import (
    Claim,
    Markdown,
    Modes,
    StudyRun,
    figure,
    fmt_ci,
    load_averages,
    lr_sweep,
    md_table,
    mean_ci,
    real_model,
)
from rizzearch.reproduce.orpo_real_data import load_splits, pair_logps, pair_tokens, split_overlap, summarize
from rizzearch.training.align import ForwardCounter
from rizzearch.training.loop import TrainConfig
from rizzearch.training.loop import train as train_loop
from rizzearch.training.lora import adapter_state_dict, adapters_disabled, apply_lora
from rizzearch.training.preference import make_dpo_loss, make_orpo_loss, make_sft_loss, precompute_reference_logps

STUDY = "orpo"
LR_GRID = (2e-4, 8e-4)  # every method's grid (LoRA learning rates), fixed before any held-out result
SELECTION = "validation mean log-prob margin (chosen - rejected), higher is better"
NONINFERIORITY = 0.05  # claim 3: "at least SFT's" = the interval of ORPO - SFT accuracy lies above -0.05
LORA_R, LORA_ALPHA = 16, 32.0
METHODS = ("base", "sft", "sft+dpo", "orpo", "orpo_lam1")
CURVE_METHODS = ("sft", "orpo")  # the Fig. 3 curves: SFT and ORPO at the paper's lambda
# seconds per 1024 real (unpadded) tokens on 2 quiet threads, LoRA forward+backward and forward only: single-thread
# CPU time of SmolLM2 steps on this study's batches (9.7 and 5.2 ms per token, load 11-16) divided by 1.9, the
# 2-thread speed-up implied by the quiet-machine reference (8x128 tokens forward+backward with LoRA r=16: 3.7 s)
SEC_PER_KTOK_TRAIN, SEC_PER_KTOK_FWD = 5.2, 2.8


@dataclass(frozen=True)
class Size:
    """Scale of one run. Training pairs = steps * batch (one epoch, the same pairs for every method)."""

    max_tokens: int = 128
    steps: int = 32
    batch: int = 4
    val_pairs: int = 32
    test_pairs: int = 150
    curve_pairs: int = 32
    curve_points: int = 4
    lam: float = 0.1
    lam_ablation: float = 1.0
    beta: float = 0.1
    eval_batch: int = 16
    read_limit: int | None = None
    bootstrap: int = 2000


QUICK = Size()
TINY = Size(max_tokens=80, steps=2, batch=2, val_pairs=2, test_pairs=4, curve_pairs=2, curve_points=2, read_limit=200, bootstrap=200)
FULL = Size(max_tokens=192, steps=160, val_pairs=128, test_pairs=400, curve_pairs=64)  # estimated ~2 h on 2 quiet cores
MODES = Modes(tiny=TINY, quick=QUICK, full=FULL, budget_s={"tiny": 60, "quick": 25 * 60, "full": 3 * 60 * 60}, tier="real")


def log(msg: str) -> None:
    print(f"[orpo real] {msg}", file=sys.stderr, flush=True)


class Progress:
    """Progress lines with an ETA: work is counted in forward-token equivalents (training tokens weigh
    ``SEC_PER_KTOK_TRAIN / SEC_PER_KTOK_FWD``); the ETA extrapolates the measured rate."""

    def __init__(self, run: StudyRun, total: float):
        self.run, self.total, self.done = run, total, 0.0

    def step(self, units: float, what: str) -> None:
        self.done += units
        el = self.run.budget.elapsed()
        eta = el * max(self.total - self.done, 0.0) / max(self.done, 1e-9)
        log(f"{what}: {el:.0f}s elapsed, ~{eta:.0f}s left ({self.done / self.total:.0%}; load {load_averages()})")


def work_plan(sz: Size, splits) -> dict:
    """Forward-token work of every phase and the quiet-machine estimate in seconds."""
    g, ratio = len(LR_GRID), SEC_PER_KTOK_TRAIN / SEC_PER_KTOK_FWD
    pair, chosen = pair_tokens(splits.train), pair_tokens(splits.train, ("chosen",))
    val, test = pair_tokens(splits.val), pair_tokens(splits.test)
    curve = pair_tokens(splits.test.subset(range(sz.curve_pairs)))
    units = {"sft": g * (ratio * chosen + val), "dpo": pair + g * (ratio * pair + val), "orpo": 2 * g * (ratio * pair + val),
             "test": len(METHODS) * test, "curves": len(CURVE_METHODS) * (sz.curve_points - 1) * curve}
    return {"units": units, "total": sum(units.values()), "quiet_seconds": sum(units.values()) * SEC_PER_KTOK_FWD / 1024}


# -- training -----------------------------------------------------------------------------------


class Trainer:
    """The model with its LoRA adapters and what every run needs: each run starts from a given adapter
    state (the shared initialisation, or the SFT model for DPO) and returns its adapters."""

    def __init__(self, run: StudyRun[Size], model, splits, progress: Progress):
        self.run, self.model, self.splits, self.progress = run, model, splits, progress
        torch.manual_seed(run.seed)
        apply_lora(model, LORA_R, LORA_ALPHA)  # default llama targets: attn.qkv, attn.proj, mlp.gate_up, mlp.down
        self.init = self.adapters()
        self.trainable = sum(v.numel() for v in self.init.values())

    def adapters(self) -> dict:
        return {k: v.detach().clone() for k, v in adapter_state_dict(self.model).items()}

    def load(self, state: dict) -> None:
        res = self.model.load_state_dict(state, strict=False)
        if res.unexpected_keys or any(".lora_" in k for k in res.missing_keys):
            raise CheckpointError(f"LoRA adapter state does not match the model: unexpected {res.unexpected_keys[:3]}, "
                                  f"missing {[k for k in res.missing_keys if '.lora_' in k][:3]}")

    def score(self, ps) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logps(self.model, ps.tensors, self.run.size.eval_batch, self.run.device)

    def train(self, method: str, lr: float, start: dict, tensors: dict, name: str, lam: float = 0.1, snapshots: bool = False):
        """One run -> (model: {"adapters", "snapshots"}, info: lr, validation summary, compute); ``lr_sweep``'s ``train``."""
        sz, r = self.run.size, self.run
        self.load(start)
        every = max(1, sz.steps // sz.curve_points) if snapshots else 0
        cfg = TrainConfig(steps=sz.steps, batch_size=sz.batch, lr=lr, warmup_steps=max(1, sz.steps // 10), weight_decay=0.0,
                          eval_every=every, log_every=max(1, sz.steps // 10), seed=r.seed, device=r.device)
        loss_fn = {"sft": make_sft_loss(), "orpo": make_orpo_loss(ORPOConfig(lam=lam)), "dpo": make_dpo_loss(DPOConfig(beta=sz.beta))}[method]
        snaps: list[dict] = []
        eval_fn = (lambda m: (snaps.append(self.adapters()), {"snapshot": len(snaps)})[1]) if snapshots else None
        counter = ForwardCounter(self.model)
        try:
            res = train_loop(self.model, loss_fn, RowBatches(tensors, sz.batch, seed=r.seed), cfg, r.out / "runs" / name,
                             eval_fn=eval_fn, progress=False, save_checkpoints=False)
        finally:
            counter.close()
        steps = [e["step"] for e in res.evals if "snapshot" in e]
        val = summarize(*self.score(self.splits.val))
        info = {"lr": lr, "val": val, "seconds": res.seconds, "final_loss": res.final_loss, **counter.snapshot()}
        model = {"adapters": self.adapters(), "snapshots": [(s, a) for s, a in zip(steps, snaps) if s < sz.steps]}
        return model, info

    def sweep(self, method: str, start: dict, tensors: dict, units: float, lam: float = 0.1, snapshots: bool = False, tag: str = ""):
        tag = tag or method
        def train(lr):
            model, info = self.train(method, lr, start, tensors, f"{tag}_lr{lr:g}", lam, snapshots)
            val = info["val"]
            self.progress.step(units / len(LR_GRID), f"{tag} lr {lr:g}: validation margin {val['logp_margin']:+.3f}, "
                               f"accuracy {val['pref_accuracy']:.3f}")
            return model, info
        return lr_sweep(LR_GRID, train, lambda m, info: info["val"]["logp_margin"], higher_is_better=True)


def train_all(t: Trainer, plan: dict) -> tuple[dict, dict, dict]:
    """Every method's sweep from the same start -> (selected adapters per method, sweep records, DPO reference record)."""
    sz, u = t.run.size, plan["units"]
    train = t.splits.train.tensors
    chosen, sweeps = {}, {}
    chosen["sft"], sweeps["sft"] = t.sweep("sft", t.init, train, u["sft"], snapshots=True)
    # SFT -> DPO: the selected SFT model is the start and the frozen reference (log-probs precomputed once)
    t.load(chosen["sft"]["adapters"])
    counter = ForwardCounter(t.model)
    try:
        ref = precompute_reference_logps(t.model, train, sz.eval_batch, device=torch.device(t.run.device))
    finally:
        counter.close()
    ref_record = {f"reference_{k}": v for k, v in counter.snapshot().items()}
    t.progress.step(pair_tokens(t.splits.train), "DPO reference log-probs (SFT model) precomputed")
    dpo_units = u["dpo"] - pair_tokens(t.splits.train)
    chosen["sft+dpo"], sweeps["sft+dpo"] = t.sweep("dpo", chosen["sft"]["adapters"], {**train, **ref}, dpo_units, tag="sft_dpo")
    for name, lam in (("orpo", sz.lam), ("orpo_lam1", sz.lam_ablation)):
        chosen[name], sweeps[name] = t.sweep("orpo", t.init, train, u["orpo"] / 2, lam=lam, snapshots=name in CURVE_METHODS, tag=name)
    return chosen, sweeps, ref_record


def evaluate_all(t: Trainer, chosen: dict) -> tuple[dict, dict]:
    """Per-pair test log-probs of the base and every selected model, and the Fig. 3 curves of SFT and ORPO."""
    sz = t.run.size
    with adapters_disabled(t.model):
        test = {"base": t.score(t.splits.test)}
    t.progress.step(pair_tokens(t.splits.test), "base model scored on the test split")
    for m in METHODS[1:]:
        t.load(chosen[m]["adapters"])
        test[m] = t.score(t.splits.test)
        t.progress.step(pair_tokens(t.splits.test), f"{m} scored on the test split")
    sub = t.splits.test.subset(range(sz.curve_pairs))
    curves = {}
    for m in CURVE_METHODS:
        points = [(0, test["base"][0][: sz.curve_pairs], test["base"][1][: sz.curve_pairs])]
        for step, state in chosen[m]["snapshots"]:
            t.load(state)
            points.append((step, *t.score(sub)))
        points.append((sz.steps, test[m][0][: sz.curve_pairs], test[m][1][: sz.curve_pairs]))
        curves[m] = [{"step": s, "chosen_logp": float(c.mean()), "rejected_logp": float(r.mean())} for s, c, r in points]
        t.progress.step(pair_tokens(sub) * (len(points) - 2), f"{m} training curve scored")
    return test, curves


# -- claims -------------------------------------------------------------------------------------


def _ci(d: torch.Tensor, sz: Size, seed: int, key: str) -> dict:
    return mean_ci(d, n_boot=sz.bootstrap, seed=seed, key=key)


def claim_sft_rejected_rises(base: tuple, sft: tuple, model: str, sz: Size, seed: int) -> tuple[Claim, dict]:
    """(1) The change of the rejected mean log-prob under SFT; holds when its interval lies above 0."""
    d_rej, d_ch = _ci(sft[1] - base[1], sz, seed, "rej"), _ci(sft[0] - base[0], sz, seed, "ch")
    return Claim("sft_raises_rejected", "Under SFT on the chosen responses, the held-out rejected responses' mean log-prob rises too "
                 "(95% paired-bootstrap interval of its change above 0)",
                 "Fig. 3: SFT raises the log-probabilities of the rejected responses along with the chosen ones",
                 f"rejected change {fmt_ci(d_rej)} (chosen change {fmt_ci(d_ch)})", d_rej["ci95"][0] > 0, model), \
        {"rejected_change": d_rej, "chosen_change": d_ch}


def claim_margin(sft: tuple, orpo: tuple, lam: float, model: str, sz: Size, seed: int, suffix: str = "") -> tuple[Claim, dict]:
    """(2) ORPO's margin change minus SFT's (= ORPO's margin minus SFT's, per pair); holds above 0."""
    d = _ci((orpo[0] - orpo[1]) - (sft[0] - sft[1]), sz, seed, "margin" + suffix)
    return Claim(f"orpo_margin_beats_sft{suffix}", f"ORPO (lambda {lam:g}) raises the chosen-minus-rejected mean log-prob margin more than "
                 "SFT (95% paired-bootstrap interval of the difference of margin changes above 0)",
                 "ORPO separates chosen from rejected where SFT raises both (Sec. 6, Fig. 3)",
                 f"ORPO minus SFT margin change {fmt_ci(d)}", d["ci95"][0] > 0, model), d


def claim_accuracy(sft: tuple, orpo: tuple, lam: float, model: str, sz: Size, seed: int, suffix: str = "") -> tuple[Claim, dict]:
    """(3) ORPO's preference accuracy minus SFT's; holds when the interval lies above -NONINFERIORITY."""
    wins = lambda x: (x[0] > x[1]).float()  # noqa: E731
    d = _ci(wins(orpo) - wins(sft), sz, seed, "acc" + suffix)
    return Claim(f"orpo_accuracy_at_least_sft{suffix}", f"ORPO (lambda {lam:g}) reaches at least SFT's held-out preference accuracy "
                 f"(95% paired-bootstrap interval of the difference above -{NONINFERIORITY:g})",
                 "ORPO beats SFT on preference (reward-model win rate, Sec. 6)",
                 f"ORPO {float(wins(orpo).mean()):.3f} vs SFT {float(wins(sft).mean()):.3f}: difference {fmt_ci(d)}",
                 d["ci95"][0] > -NONINFERIORITY, model), d


def claim_forwards(compute: dict, model: str) -> Claim:
    """(4) ORPO: no reference pass and fewer training sequences forwarded than SFT -> DPO (counted)."""
    o, p = compute["orpo"], compute["sft+dpo"]
    return Claim("orpo_fewer_forward_passes", "ORPO needs no reference model and forwards fewer sequences for training than SFT then DPO",
                 "no reference model: one policy forward per pair and step (Sec. 3)",
                 f"{o['forward_sequences']:,} vs {p['forward_sequences']:,} sequences ({p['reference_forward_sequences']:,} of them for the "
                 f"reference); {o['forward_calls']:,} vs {p['forward_calls']:,} forward calls",
                 o["forward_sequences"] < p["forward_sequences"] and o.get("reference_forward_sequences", 0) == 0, model)


def compute_record(sweeps: dict, ref: dict) -> dict:
    """Training forwards of each selected run; SFT -> DPO adds the SFT run and the reference pass."""
    keys = ("forward_calls", "forward_sequences", "forward_tokens")
    sel = {m: s["runs"][str(s["selected_lr"])] for m, s in sweeps.items()}
    out = {m: {k: sel[m][k] for k in (*keys, "seconds")} for m in ("sft", "orpo", "orpo_lam1")}
    out["sft+dpo"] = {k: sel["sft"][k] + sel["sft+dpo"][k] + ref.get(f"reference_{k}", 0) for k in keys}
    out["sft+dpo"].update(ref, seconds=sel["sft"]["seconds"] + sel["sft+dpo"]["seconds"])
    return out


def make_claims(test: dict, compute: dict, model: str, sz: Size, seed: int) -> tuple[list[Claim], dict]:
    c1, d1 = claim_sft_rejected_rises(test["base"], test["sft"], model, sz, seed)
    c2, d2 = claim_margin(test["sft"], test["orpo"], sz.lam, model, sz, seed)
    c3, d3 = claim_accuracy(test["sft"], test["orpo"], sz.lam, model, sz, seed)
    c2b, d2b = claim_margin(test["sft"], test["orpo_lam1"], sz.lam_ablation, model, sz, seed, "_lam1")
    c3b, d3b = claim_accuracy(test["sft"], test["orpo_lam1"], sz.lam_ablation, model, sz, seed, "_lam1")
    diffs = {"sft_minus_base": d1, "orpo_minus_sft_margin": d2, "orpo_minus_sft_accuracy": d3,
             "orpo_lam1_minus_sft_margin": d2b, "orpo_lam1_minus_sft_accuracy": d3b}
    return [c1, c2, c3, c2b, c3b, claim_forwards(compute, model)], diffs


# -- the study ----------------------------------------------------------------------------------


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Run the study; writes report.md, orpo_real.png, orpo_real_curves.png and results.json into ``out_dir``."""
    r = StudyRun.start(STUDY, out_dir, MODES, full=full, tiny=tiny, device=device, seed=seed)
    sz, clock = r.size, {}
    pretrained, model_name = real_model(r)
    clock["load_model"] = r.budget.elapsed()
    splits = load_splits(pretrained.tokenizer, sz.max_tokens, (sz.steps * sz.batch, sz.val_pairs, sz.test_pairs), seed, sz.read_limit)
    clock["data"] = r.budget.elapsed() - clock["load_model"]
    plan = work_plan(sz, splits)
    log(f"{r.mode} mode on {model_name}: {len(splits.train)} train / {len(splits.val)} validation / {len(splits.test)} test pairs, "
        f"{len(LR_GRID)} learning rates x 4 methods; estimated {plan['quiet_seconds'] / 60:.1f} min of compute on 2 quiet cores "
        f"(budget {r.budget.seconds / 60:.0f} min; load now {load_averages()})")
    t = Trainer(r, pretrained.model, splits, Progress(r, plan["total"]))
    t0 = r.budget.elapsed()
    chosen, sweeps, ref = train_all(t, plan)
    clock["train"] = r.budget.elapsed() - t0
    t0 = r.budget.elapsed()
    test, curves = evaluate_all(t, chosen)
    clock["evaluate"] = r.budget.elapsed() - t0
    compute = compute_record(sweeps, ref)
    claims, diffs = make_claims(test, compute, model_name, sz, seed)
    results = {m: summarize(*test[m]) for m in METHODS}
    for m in METHODS:
        wins = (test[m][0] > test[m][1]).float()
        results[m]["accuracy_ci"] = mean_ci(wins, n_boot=sz.bootstrap, seed=seed, key=f"acc_{m}")
        results[m]["margin_ci"] = mean_ci(test[m][0] - test[m][1], n_boot=sz.bootstrap, seed=seed, key=f"margin_{m}")
    metrics = collect_metrics(r, model_name, splits, plan, t, results, curves, sweeps, compute, diffs, clock)
    write_report(r.out, claims, metrics)
    plot(r.out, results, curves)
    return r.finish(claims, metrics)


def collect_metrics(r, model_name, splits, plan, t, results, curves, sweeps, compute, diffs, clock) -> dict:
    loads = load_averages()
    lr = {m: {"grid": s["grid"], "selected_lr": s["selected_lr"], "validation_margin": s["scores"],
              "validation_accuracy": {k: v["val"]["pref_accuracy"] for k, v in s["runs"].items()}} for m, s in sweeps.items()}
    wall = r.budget.elapsed()
    return {"mode": r.mode, "tier": r.tier, "model": model_name, "sizes": asdict(r.size), "data": splits.stats, "split_overlap": split_overlap(splits),
            "fine_tuning": {"kind": "LoRA", "r": LORA_R, "alpha": LORA_ALPHA, "targets": t.model.lora_config["targets"],
                            "trainable_parameters": t.trainable, "precision": "fp32"},
            "lr_grid": list(LR_GRID), "selection": SELECTION, "lr_sweeps": lr, "results": results, "curves": curves,
            "compute": compute, "paired_differences": diffs, "estimate_quiet_seconds": plan["quiet_seconds"],
            "phase_seconds": clock, "wall_seconds": wall, "cpu_seconds": r.budget.cpu_elapsed(), "budget_seconds": r.budget.seconds,
            "within_budget": wall <= r.budget.seconds, "torch_threads": torch.get_num_threads(),
            "load_average_start": None if r.budget.load_start is None else round(r.budget.load_start, 2), "load_average": None if loads is None else [round(x, 2) for x in loads]}


LABELS = {"base": "base (no fine-tuning)", "sft": "SFT", "sft+dpo": "SFT then DPO", "orpo": "ORPO (lambda {lam:g})",
          "orpo_lam1": "ORPO (lambda {lam:g}, ablation)"}


def write_report(out: Path, claims: list[Claim], metrics: dict) -> None:
    sz, res, comp, data, lr = metrics["sizes"], metrics["results"], metrics["compute"], metrics["data"], metrics["lr_sweeps"]
    rows = []
    for m in METHODS:
        x, c = res[m], comp.get(m, {})
        sel = lr.get("sft" if m == "sft" else m, {}).get("selected_lr", "")
        label = LABELS[m].format(lam=sz["lam"] if m == "orpo" else sz["lam_ablation"])
        rows.append([label, fmt_ci(x["accuracy_ci"]), f"{x['chosen_logp']:.3f}", f"{x['rejected_logp']:.3f}", fmt_ci(x["margin_ci"]),
                     str(sel), f"{c.get('forward_sequences', 0):,}"])
    table = md_table(["method", "test preference accuracy", "chosen logp", "rejected logp", "logp margin", "selected lr",
                      "training sequences forwarded"], rows, "lrrrrrr")
    setup = (f"Model: {metrics['model']}, LoRA r={LORA_R} (alpha {LORA_ALPHA:g}) on {', '.join(metrics['fine_tuning']['targets'][:4])}, ... "
             f"({metrics['fine_tuning']['trainable_parameters']:,} trainable parameters), fp32. Data: HH-RLHF harmless-base pairs in the "
             f"model's chat template, kept whole when both sequences fit {data['max_tokens']} tokens ({data['within_max_tokens']} of "
             f"{data['read']}), split by first user turn: {data['train_pairs']} train / {data['val_pairs']} validation / {data['test_pairs']} "
             f"test pairs (shared prompts between splits: {sum(metrics['split_overlap'].values())}). Every method: {sz['steps']} steps of "
             f"{sz['batch']} pairs (one epoch, same order), learning-rate grid {list(LR_GRID)}, selected by the {SELECTION}; DPO beta "
             f"{sz['beta']} after the selected SFT model.")
    sweep = md_table(["method", *[f"val margin @ {x:g}" for x in LR_GRID], "selected"],
                     [[m, *[f"{s['validation_margin'][str(x)]:+.3f}" for x in LR_GRID], f"{s['selected_lr']:g}"] for m, s in lr.items()], "lrrr")
    curve_rows = [[m, c["step"], f"{c['chosen_logp']:.3f}", f"{c['rejected_logp']:.3f}"] for m, pts in metrics["curves"].items() for c in pts]
    curves = md_table(["method", "step", "chosen logp", "rejected logp"], curve_rows, "lrrr")
    clock = (f"Wall time {metrics['wall_seconds']:.0f}s (phases: {', '.join(f'{k} {v:.0f}s' for k, v in metrics['phase_seconds'].items())}), "
             f"CPU time {metrics['cpu_seconds']:.0f}s on {metrics['torch_threads']} torch thread(s); estimate on 2 quiet cores "
             f"{metrics['estimate_quiet_seconds']:.0f}s; load average at the start {metrics['load_average_start']}, at the end {metrics['load_average']}.")
    doc = Markdown(f"ORPO study, real tier ({metrics['mode']} mode)").section(None, setup, table).claims(claims)
    doc.section("Learning-rate selection (validation split only)", sweep)
    doc.section(f"Fig. 3: mean log-probs during training (first {sz['curve_pairs']} test pairs)", curves)
    doc.image("orpo_real_curves.png", "chosen and rejected log-probs during training").image("orpo_real.png", "test metrics per method")
    doc.section(None, clock).write(out / "report.md")


def plot(out: Path, results: dict, curves: dict) -> None:
    with figure(out / "orpo_real_curves.png", len(curves), (4.2 * len(curves), 3.6)) as axes:
        for ax, (m, pts) in zip(axes, curves.items()):
            steps = [p["step"] for p in pts]
            ax.plot(steps, [p["chosen_logp"] for p in pts], "o-", label="chosen")
            ax.plot(steps, [p["rejected_logp"] for p in pts], "s--", label="rejected")
            ax.set_title(m)
            ax.set_xlabel("step")
            ax.set_ylabel("mean token log-prob (test subset)")
            ax.legend(fontsize=8)
    with figure(out / "orpo_real.png", 2, (11, 4)) as axes:
        for ax, key, title in ((axes[0], "accuracy_ci", "test preference accuracy"), (axes[1], "margin_ci", "test log-prob margin")):
            vals = [results[m][key] for m in METHODS]
            centre = [v["mean"] for v in vals]
            err = [[c - v["ci95"][0] for c, v in zip(centre, vals)], [v["ci95"][1] - c for c, v in zip(centre, vals)]]
            ax.bar(list(METHODS), centre, yerr=err, capsize=4, color=["C7", "C0", "C3", "C2", "C4"])
            ax.set_title(title + " (95% interval)")
            ax.tick_params(axis="x", labelsize=8)
