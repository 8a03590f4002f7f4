"""ORPO study (Hong et al. 2024): one-stage ORPO vs SFT alone vs SFT then DPO, at laptop scale.

Task: questions whose preferences are checkable. Each prompt lists five distinct numbers below 100
and asks for the largest or the smallest one:

    Numbers: 58 96 42 53 17. Question: Which number is the smallest? Answer:

    chosen   " 17"   the correct answer
    rejected " 42"   the runner-up: the most plausible wrong answer, also taken from the prompt

Pipeline, every stage through the shared training loop (``training/loop.py``):

1. A byte-level BPE tokenizer and a base GPT trained from scratch in this run on number lists
   followed by their sorted (or reverse-sorted) versions: the base model learns the order of the
   number tokens but never sees the question format.
2. From the same base weights: **SFT** on the chosen answers; **SFT -> DPO** (DPO starts from the
   SFT model, which is also the frozen reference; its log-probs are precomputed once, one no-grad
   pass); **ORPO** in one stage with as many steps as SFT (lambda = 0.1, the paper's setting; an
   ablation row uses lambda = 1). DPO runs at a tenth of the SFT learning rate, the usual practice
   (Zephyr: 5e-7 for DPO after 2e-5 for SFT), fixed before any result was seen.
3. On held-out pairs (new number lists): preference accuracy (mean token log-prob of chosen >
   rejected), greedy task accuracy (the generated answer is the right number), and compute
   (sequences forwarded for training, DPO's reference pass included; wall and CPU time).

Claims (paper Sec. 6, Fig. 1, Sec. 3): ORPO beats SFT alone on preference accuracy (judged by a
paired bootstrap: the 95% interval of the difference must lie above 0); ORPO is competitive with
SFT+DPO (within ``COMPETITIVE_MARGIN`` on preference and task accuracy); ORPO needs no reference
model and forwards fewer sequences than SFT+DPO.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rizzearch.data.batches import RandomWindows
from rizzearch.data.preference import PreferencePair, PreferenceSet, encode_pairs
from rizzearch.data.tokenizer import Tokenizer, train_bpe
from rizzearch.models.base import build_model, eval_mode, generate
from rizzearch.objectives.dpo import DPOConfig
from rizzearch.objectives.orpo import ORPOConfig
from rizzearch.reproduce.common import Claim, Markdown, Modes, StudyRun, figure, load_averages, md_table, torch_threads
from rizzearch.training.align import ForwardCounter, evaluate_preferences, run_stage
from rizzearch.training.losses import lm_loss
from rizzearch.training.loop import TrainConfig
from rizzearch.training.loop import train as train_loop
from rizzearch.training.preference import score_pairs

STUDY = "orpo"
COMPETITIVE_MARGIN = 0.05  # "competitive": within 5 accuracy points of SFT+DPO, or better
QUESTIONS = {"largest": max, "smallest": min}
METHODS = ("base", "sft", "sft+dpo", "orpo", "orpo_lam1")


@dataclass(frozen=True)
class Size:
    """Scale of one study run (quick / tiny / full)."""

    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    vocab_size: int = 640
    list_len: int = 5
    high: int = 100
    seq_len: int = 64
    pretrain_docs: int = 6000
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    train_pairs: int = 2000
    val_pairs: int = 400
    align_steps: int = 300
    dpo_steps: int = 300
    align_batch: int = 32
    align_lr: float = 1e-3
    dpo_lr_ratio: float = 0.1
    lam: float = 0.1
    lam_ablation: float = 1.0
    beta: float = 0.1
    gen_eval: int = 400
    bootstrap: int = 2000


QUICK = Size()
TINY = Size(d_model=32, n_head=2, vocab_size=400, pretrain_docs=300, pretrain_steps=10, pretrain_batch=8, train_pairs=64, val_pairs=24,
             align_steps=4, dpo_steps=4, align_batch=8, gen_eval=8, bootstrap=200)
FULL = Size(d_model=96, pretrain_docs=12000, pretrain_steps=2500, train_pairs=6000, val_pairs=2000, align_steps=800, dpo_steps=800,
             gen_eval=2000)
MODES = Modes(tiny=TINY, quick=QUICK, full=FULL, budget_s={"tiny": 30, "quick": 6 * 60, "full": 60 * 60})


# ----------------------------------------------------------------------------------------------
# Task


def _fmt(nums) -> str:
    return " ".join(str(n) for n in nums)


def make_pretraining_text(n_docs: int, rng: random.Random, k: int = 5, high: int = 100) -> str:
    """Number lists and their sorted versions (ascending or descending): teaches the order of the
    number tokens, never the question format."""
    docs = []
    for _ in range(n_docs):
        nums = rng.sample(range(high), k)
        if rng.random() < 0.5:
            docs.append(f"Numbers: {_fmt(nums)}. Sorted: {_fmt(sorted(nums))}.")
        else:
            docs.append(f"Numbers: {_fmt(nums)}. Reversed order: {_fmt(sorted(nums, reverse=True))}.")
    return "\n".join(docs) + "\n"


def make_pairs(n: int, rng: random.Random, k: int = 5, high: int = 100) -> list[PreferencePair]:
    """Preference pairs: chosen = the correct number, rejected = the runner-up (second largest /
    second smallest: the most plausible wrong answer)."""
    pairs = []
    for i in range(n):
        nums = rng.sample(range(high), k)
        q = rng.choice(sorted(QUESTIONS))
        ranked = sorted(nums, reverse=(q == "largest"))
        prompt = f"Numbers: {_fmt(nums)}. Question: Which number is the {q}? Answer:"
        pairs.append(PreferencePair((("user", prompt),), f" {ranked[0]}", f" {ranked[1]}", f"synthetic:{i}"))
    return pairs


@torch.no_grad()
def task_correct(model, pairs: list[PreferencePair], tok, device, batch_size: int = 64) -> torch.Tensor:
    """Greedy generation per prompt -> bool (N,): the first generated word is the correct answer."""
    out_flags = []
    with eval_mode(model):
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            ids = [tok.encode(p.messages[0][1]) for p in chunk]
            T = max(len(x) for x in ids)
            x = torch.full((len(ids), T), tok.pad_id, dtype=torch.long)
            mask = torch.zeros(len(ids), T, dtype=torch.long)
            for i, seq in enumerate(ids):  # left padding
                x[i, T - len(seq) :] = torch.tensor(seq)
                mask[i, T - len(seq) :] = 1
            out = generate(model, x.to(device), 3, attention_mask=mask.to(device), eos_id=tok.eot_id)
            for p, row in zip(chunk, out.tolist()):
                words = tok.decode([t for t in row if t != tok.eot_id]).split()
                out_flags.append(bool(words) and words[0].rstrip(".") == p.chosen.strip())
    return torch.tensor(out_flags, dtype=torch.bool)


@torch.no_grad()
def pair_wins(model, tensors: dict, device, batch_size: int = 128) -> torch.Tensor:
    """bool (N,): the chosen response has the higher mean token log-prob (per held-out pair)."""
    return torch.cat([(fw.chosen.mean > fw.rejected.mean).cpu() for fw in score_pairs(model, tensors, batch_size, device=device)])


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over paired 0/1 outcomes and its 95% percentile bootstrap interval."""
    d = a.float() - b.float()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (n, d.numel()), generator=g)
    means = d[idx].mean(1)
    return float(d.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


# ----------------------------------------------------------------------------------------------
# Study: data, pretrain, align + evaluate, claims, report


@dataclass
class Data:
    """The study's data: pretraining text and token stream, preference pairs, tokenizer, encoded sets."""

    text: str
    stream: torch.Tensor  # (N,) token ids of the pretraining text
    train_pairs: list[PreferencePair]
    val_pairs: list[PreferencePair]
    tok: Tokenizer
    train_set: PreferenceSet
    val_set: PreferenceSet


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Run the study; writes results.json, report.md and orpo.png into ``out_dir``; returns the results dict.

    On CPU the study runs single-threaded (``torch.set_num_threads(1)``, restored afterwards): the
    models are tiny (d=64), so intra-op threads gain little on a quiet machine, while on a shared
    one two spinning threads per process made a training step 4x more expensive (45 ms vs 200 ms
    of CPU per pretraining step, measured side by side); one thread also makes the numbers
    independent of the core count.
    """
    from tqdm.auto import tqdm

    r = StudyRun.start(STUDY, out_dir, MODES, full=full, tiny=tiny, device=device, seed=seed)
    with torch_threads(1, device):
        torch.manual_seed(seed)
        bar = tqdm(total=7, desc="orpo study", disable=tiny)
        bar.set_postfix_str("data")
        data = prepare_data(r.size, random.Random(seed))
        bar.set_postfix_str("pretrain")
        base, pretrain = pretrain_base(r, data)
        evals = {"base": evaluate(base, data, r)}
        bar.update(1)
        compute = align_all(r, data, base, evals, bar)
        bar.set_postfix_str("report")
        results, raw = {m: e[0] for m, e in evals.items()}, {m: e[1] for m, e in evals.items()}
        claims, diffs = make_claims(r.size, results, raw, compute, seed)
        metrics = collect_metrics(r, data, results, compute, diffs, pretrain)
        write_report(r.out, claims, metrics)
        plot(r.out / "orpo.png", metrics["results"], compute)
        bar.update(1)
        bar.close()
        return r.finish(claims, metrics)


def prepare_data(sz: Size, rng: random.Random) -> Data:
    """Pretraining text, training and held-out pairs, a BPE tokenizer trained on them, encoded sets."""
    text = make_pretraining_text(sz.pretrain_docs, rng, sz.list_len, sz.high)
    train_pairs = make_pairs(sz.train_pairs, rng, sz.list_len, sz.high)
    val_pairs = make_pairs(sz.val_pairs, rng, sz.list_len, sz.high)
    tok = train_bpe([text, "\n".join(p.messages[0][1] + p.chosen for p in train_pairs[:500])], sz.vocab_size)
    enc = dict(template="plain", max_length=sz.seq_len, max_response_length=8)
    return Data(text=text, stream=torch.tensor(tok.encode(text), dtype=torch.long), train_pairs=train_pairs, val_pairs=val_pairs,
                tok=tok, train_set=encode_pairs(train_pairs, tok, **enc), val_set=encode_pairs(val_pairs, tok, **enc))


def pretrain_base(r: StudyRun[Size], data: Data) -> tuple[torch.nn.Module, dict]:
    """The base GPT, pretrained from scratch on the number lists through the shared loop."""
    sz = r.size
    base = build_model("gpt", n_layer=sz.n_layer, n_head=sz.n_head, d_model=sz.d_model, vocab_size=data.tok.vocab_size).to(torch.device(r.device))
    cfg = TrainConfig(steps=sz.pretrain_steps, batch_size=sz.pretrain_batch, lr=sz.pretrain_lr, warmup_steps=max(1, sz.pretrain_steps // 10),
                      weight_decay=0.1, log_every=max(1, sz.pretrain_steps // 10), seed=r.seed, device=r.device)
    t0, c0 = time.perf_counter(), time.process_time()
    pre = train_loop(base, lm_loss, RandomWindows(data.stream, sz.pretrain_batch, sz.seq_len, seed=r.seed), cfg, r.out / "runs" / "pretrain",
                     progress=False, save_checkpoints=False)
    return base, {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "final_loss": pre.final_loss,
                  "steps": pre.steps, "tokens": pre.tokens}


def evaluate(model, data: Data, r: StudyRun[Size]) -> tuple[dict, dict]:
    """Held-out preference metrics and greedy task accuracy, and the per-pair outcomes for the bootstrap."""
    dev = torch.device(r.device)
    pref = evaluate_preferences(model, data.val_set.tensors, 128, device=dev)
    wins = pair_wins(model, data.val_set.tensors, dev)
    task = task_correct(model, data.val_pairs[: r.size.gen_eval], data.tok, dev)
    return {**pref, "task_accuracy": float(task.float().mean())}, {"wins": wins, "task": task}


def _stage(r: StudyRun[Size], data: Data, method: str, model, name: str, cfg: TrainConfig, bar, orpo: ORPOConfig = ORPOConfig()) -> dict:
    """One alignment stage through ``training.align.run_stage``, its forward passes and CPU time counted."""
    bar.set_postfix_str(name)
    counter = ForwardCounter(model)
    c = time.process_time()
    try:
        _, rec = run_stage(method, model, data.train_set, cfg, r.out / "runs" / name, orpo=orpo, dpo=DPOConfig(beta=r.size.beta),
                           counter=counter, progress=False, save_checkpoints=False)
    finally:
        counter.close()
    rec["cpu_seconds"] = time.process_time() - c
    bar.update(1)
    return rec


def align_all(r: StudyRun[Size], data: Data, base, evals: dict, bar) -> dict:
    """SFT, SFT then DPO, ORPO and the ORPO lambda ablation from the same base weights, each evaluated
    into ``evals`` right after its stage; returns the compute record of every stage."""
    sz = r.size
    align_cfg = TrainConfig(steps=sz.align_steps, batch_size=sz.align_batch, lr=sz.align_lr, warmup_steps=max(1, sz.align_steps // 10),
                            weight_decay=0.0, log_every=max(1, sz.align_steps // 10), seed=r.seed, device=r.device)
    compute: dict[str, dict] = {}
    # SFT alone; its final model is also the start and the frozen reference of DPO
    sft_model = copy.deepcopy(base)
    compute["sft"] = _stage(r, data, "sft", sft_model, "sft", align_cfg, bar)
    evals["sft"] = evaluate(sft_model, data, r)
    # SFT then DPO (lower learning rate, as is usual for DPO after SFT)
    dpo_cfg = replace(align_cfg, steps=sz.dpo_steps, lr=sz.align_lr * sz.dpo_lr_ratio)
    compute["dpo_stage"] = _stage(r, data, "dpo", sft_model, "sft_dpo", dpo_cfg, bar)
    keys = ("steps", "seconds", "cpu_seconds", "forward_calls", "forward_sequences", "forward_tokens")
    compute["sft+dpo"] = {k: compute["sft"].get(k, 0) + compute["dpo_stage"].get(k, 0) for k in keys}
    compute["sft+dpo"].update({k: v for k, v in compute["dpo_stage"].items() if k.startswith("reference_")})
    evals["sft+dpo"] = evaluate(sft_model, data, r)
    del sft_model
    # ORPO in one stage from the base model (the paper's lambda), and the lambda ablation
    for name, lam in (("orpo", sz.lam), ("orpo_lam1", sz.lam_ablation)):
        m = copy.deepcopy(base)
        compute[name] = _stage(r, data, "orpo", m, name, align_cfg, bar, ORPOConfig(lam=lam))
        evals[name] = evaluate(m, data, r)
        del m
    return compute


def make_claims(sz: Size, results: dict, raw: dict, compute: dict, seed: int) -> tuple[list[Claim], dict]:
    """The three claims, and the paired-bootstrap differences they are judged by."""
    r, c = results, compute
    d_sft = paired_bootstrap(raw["orpo"]["wins"], raw["sft"]["wins"], sz.bootstrap, seed)
    d_dpo = paired_bootstrap(raw["orpo"]["wins"], raw["sft+dpo"]["wins"], sz.bootstrap, seed)
    d_task = paired_bootstrap(raw["orpo"]["task"], raw["sft+dpo"]["task"], sz.bootstrap, seed)
    claims = [
        Claim("orpo_beats_sft_preference",
              "ORPO gives a higher held-out preference accuracy (chosen more likely than rejected) than SFT alone, "
              "with the 95% paired-bootstrap interval of the difference above 0",
              "SFT alone raises the rejected responses' likelihood too; ORPO separates them (Fig. 3, Sec. 6)",
              f"ORPO {r['orpo']['pref_accuracy']:.3f} vs SFT {r['sft']['pref_accuracy']:.3f}: "
              f"difference {d_sft[0]:+.3f} [{d_sft[1]:+.3f}, {d_sft[2]:+.3f}]",
              d_sft[1] > 0),
        Claim("orpo_competitive_with_sft_dpo",
              f"ORPO in one stage is competitive with SFT then DPO: preference and task accuracy within {COMPETITIVE_MARGIN:.2f} or better",
              "ORPO matches or beats SFT+DPO and RLHF models on AlpacaEval and MT-Bench (Tab. 1, Fig. 1)",
              f"preference {r['orpo']['pref_accuracy']:.3f} vs {r['sft+dpo']['pref_accuracy']:.3f} (diff {d_dpo[0]:+.3f} [{d_dpo[1]:+.3f}, {d_dpo[2]:+.3f}]); "
              f"task {r['orpo']['task_accuracy']:.3f} vs {r['sft+dpo']['task_accuracy']:.3f} (diff {d_task[0]:+.3f} [{d_task[1]:+.3f}, {d_task[2]:+.3f}])",
              r["orpo"]["pref_accuracy"] >= r["sft+dpo"]["pref_accuracy"] - COMPETITIVE_MARGIN
              and r["orpo"]["task_accuracy"] >= r["sft+dpo"]["task_accuracy"] - COMPETITIVE_MARGIN),
        Claim("orpo_fewer_forward_passes",
              "ORPO needs no reference model and forwards fewer sequences for training than SFT then DPO",
              "no reference model: one policy forward per pair and step (Sec. 3)",
              f"{c['orpo']['forward_sequences']:,} vs {c['sft+dpo']['forward_sequences']:,} sequences "
              f"({c['sft+dpo'].get('reference_forward_sequences', 0):,} of them for the reference); "
              f"{c['orpo']['seconds']:.1f}s vs {c['sft+dpo']['seconds']:.1f}s wall",
              c["orpo"]["forward_sequences"] < c["sft+dpo"]["forward_sequences"] and c["orpo"].get("reference_forward_sequences", 0) == 0),
    ]
    return claims, {"orpo_minus_sft_pref": d_sft, "orpo_minus_sft_dpo_pref": d_dpo, "orpo_minus_sft_dpo_task": d_task}


def collect_metrics(r: StudyRun[Size], data: Data, results: dict, compute: dict, diffs: dict, pretrain: dict) -> dict:
    wall, budget = r.budget.elapsed(), r.budget.seconds
    loads = load_averages()
    return {
        "mode": r.mode,
        "sizes": asdict(r.size),
        "results": results,
        "compute": compute,
        "paired_differences": diffs,
        "pretrain": pretrain,
        "data": {"train_pairs": len(data.train_set), "val_pairs": len(data.val_set), "tokenizer_vocab": data.tok.vocab_size,
                 "pretrain_tokens": int(data.stream.numel()), "mean_pair_tokens": data.train_set.stats["mean_tokens"]},
        "wall_seconds": wall,
        "cpu_seconds": r.budget.cpu_elapsed(),
        "torch_threads": torch.get_num_threads(),
        "budget_seconds": budget,
        "within_budget": wall <= budget,
        "load_average": None if loads is None else [round(x, 2) for x in loads],
    }


def write_report(out: Path, claims: list[Claim], metrics: dict) -> None:
    sz, results, compute, pre, data = metrics["sizes"], metrics["results"], metrics["compute"], metrics["pretrain"], metrics["data"]
    labels = {"base": "base (pretrained only)", "sft": "SFT", "sft+dpo": "SFT then DPO", "orpo": f"ORPO (lambda {sz['lam']})",
              "orpo_lam1": f"ORPO (lambda {sz['lam_ablation']}, ablation)"}
    rows = []
    for m in METHODS:
        r, c = results[m], compute.get(m, {})
        rows.append([labels[m], f"{r['pref_accuracy']:.3f}", f"{r['task_accuracy']:.3f}", f"{r['chosen_logp']:.3f}", f"{r['rejected_logp']:.3f}",
                     f"{r['logp_margin']:.3f}", f"{c.get('forward_sequences', 0):,}", f"{c.get('seconds', 0.0):.1f}", f"{c.get('cpu_seconds', 0.0):.1f}"])
    table = md_table(["method", "held-out preference accuracy", "greedy task accuracy", "chosen logp", "rejected logp", "logp margin",
                      "sequences forwarded (training)", "wall s", "CPU s"], rows, "lrrrrrrrr")
    setup = (f'Task: "which of these {sz["list_len"]} numbers (< {sz["high"]}) is the largest / smallest?"; chosen = the right number, '
             f"rejected = the runner-up. Base GPT ({sz['n_layer']} layers, d={sz['d_model']}, BPE vocab {data['tokenizer_vocab']}) pretrained "
             f"in this run on number lists and their sorted versions for {sz['pretrain_steps']} steps (final loss {pre['final_loss']:.3f}, "
             f"{pre['seconds']:.0f}s wall). Alignment: {sz['align_steps']} steps of SFT or ORPO, then {sz['dpo_steps']} DPO steps after SFT "
             f"(beta {sz['beta']}, learning rate x{sz['dpo_lr_ratio']}); batch {sz['align_batch']}, learning rate {sz['align_lr']}. "
             f"{data['train_pairs']} training pairs, {data['val_pairs']} held-out pairs (greedy accuracy on {min(sz['gen_eval'], data['val_pairs'])}).")
    ref = (f"SFT then DPO counts both stages and the reference pass ({compute['sft+dpo'].get('reference_forward_sequences', 0):,} sequences, "
           "one no-grad forward of every training pair).")
    clock = (f"Wall time {metrics['wall_seconds']:.0f}s, CPU time {metrics['cpu_seconds']:.0f}s on {metrics['torch_threads']} torch thread(s) "
             f"(budget {metrics['budget_seconds']:.0f}s); load average at the end {metrics['load_average']}.")
    doc = Markdown(f"ORPO study ({metrics['mode']} mode)").section(None, setup, table, ref).claims(claims).section(None, clock)
    doc.image("orpo.png", "accuracy and compute per method").write(out / "report.md")


def plot(path: Path, results: dict, compute: dict) -> None:
    with figure(path, 2, (11, 4), dpi=120) as axes:
        x = list(range(len(METHODS)))
        w = 0.38
        axes[0].bar([i - w / 2 for i in x], [results[m]["pref_accuracy"] for m in METHODS], w, label="held-out preference accuracy")
        axes[0].bar([i + w / 2 for i in x], [results[m]["task_accuracy"] for m in METHODS], w, label="greedy task accuracy")
        axes[0].set_xticks(x, list(METHODS), fontsize=8)
        axes[0].set_ylim(0, 1.05)
        axes[0].legend(loc="lower right", fontsize=8)
        axes[0].set_title("accuracy")
        ms = [m for m in METHODS if m in compute]
        axes[1].bar(ms, [compute[m]["forward_sequences"] for m in ms], color=["C2", "C3", "C4", "C5"][: len(ms)])
        axes[1].set_title("sequences forwarded for training")
        axes[1].tick_params(axis="x", labelsize=8)
