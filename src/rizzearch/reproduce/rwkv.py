"""RWKV study (Peng et al. 2023): constant-cost recurrent decoding, and quality on par with a transformer.

Two measurements, both against the GPT baseline (``rizzearch.models.gpt``, KV-cache decoding):

(a) Decoding cost versus context length. Each model reads a context of 256 ... 4096 tokens
    (quick mode), then generates greedily one token at a time; we time the per-token step (median
    over repeats, contexts interleaved, one CPU thread) and record the bytes of state carried per
    sequence (RWKV: 5 vectors per layer; GPT: the KV cache). The paper's claim (Sec. 1 and 4, Fig. 7): RWKV's
    inference cost per token is constant in the context length (time and memory), a transformer's
    grows linearly. We check ``time(4096) <= 1.3 x time(256)`` for RWKV and that GPT's grows.

(b) Language-modelling quality at equal size. RWKV-4 and GPT with the same parameter count (the
    GPT MLP width is solved to match) train through the shared loop on the same tiny-shakespeare
    token batches (BPE tokenizer trained on the corpus), each with the same learning-rate grid
    (``Size.lrs``, fixed before any test number was seen) and otherwise the same optimiser
    settings. The held-out 10% of the corpus is cut in two: the first half is the validation split
    (the curves, and the choice of each model's learning rate: lowest final validation loss), the
    second half the test split, scored once per selected model. The paper's claim (Sec. 5,
    Fig. 5) is parity: RWKV performs on par with transformers of the same size. We state the
    tolerance up front: parity holds when the 95% interval of the relative test-loss difference
    (RWKV - GPT) / GPT, a paired bootstrap over test windows, lies inside +-``PARITY_TOL`` (5%).

``run(out_dir, full=False, tiny=False, device="cpu", seed=0)`` writes ``results.json``,
``report.md`` and ``rwkv.png`` into ``out_dir``. Quick mode is sized for ~5-6 minutes on 2 CPU
cores (six training runs of 200 steps); ``tiny`` is a ~20 s smoke run; ``full`` uses larger models, longer training and contexts up
to 8192.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rizzearch.models.base import build_model
from rizzearch.reproduce.common import Claim, Markdown, Modes, StudyRun, figure, load_average, lr_sweep, md_table, mean_ci, torch_threads

STUDY = "rwkv"
FLAT_RATIO = 1.3  # RWKV per-token time at the longest context may be at most 1.3x the shortest
PARITY_TOL = 0.05  # parity: the 95% interval of (RWKV - GPT) / GPT test loss inside +-5%


@dataclass(frozen=True)
class Size:
    """Sizes of one study mode.

    Args:
        contexts: context lengths for the decoding measurement.
        decode_tokens: tokens generated (and timed) after each context.
        decode_repeats: interleaved repeats of the timing (median is reported).
        d_model: width of both models.
        n_layer: depth of both models.
        vocab_size: BPE vocabulary (None: byte-level tokenizer).
        steps: optimizer steps for each model.
        batch_size: rows per step.
        seq_len: training context.
        lrs: the learning-rate grid both models are trained with (each keeps its best on validation).
        eval_batches: validation batches (of batch_size x seq_len tokens) per evaluation, and test
            batches scored at the end (at most; each split is half of the held-out text).
        evals: number of evaluations during training (for the curves).
    """

    contexts: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    decode_tokens: int = 32
    decode_repeats: int = 5
    d_model: int = 128
    n_layer: int = 4
    vocab_size: int | None = 512
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    eval_batches: int = 8
    evals: int = 5


QUICK = Size()
TINY = Size(contexts=(16, 64), decode_tokens=4, decode_repeats=1, d_model=32, n_layer=2, vocab_size=None, steps=6, batch_size=4,
            seq_len=32, lrs=(3e-3, 6e-3), eval_batches=2, evals=1)
FULL = Size(contexts=(256, 512, 1024, 2048, 4096, 8192), decode_tokens=64, d_model=256, n_layer=6, vocab_size=1024, steps=2000,
            batch_size=32, seq_len=256, lrs=(5e-4, 1e-3, 2e-3), eval_batches=40, evals=10)
MODES = Modes(tiny=TINY, quick=QUICK, full=FULL, budget_s={"tiny": 5 * 60, "quick": 5 * 60, "full": 5 * 60})


# ----------------------------------------------------------------------------------------------
# Models


def make_models(size: Size, vocab_size: int, device) -> dict:
    """RWKV-4 and a GPT whose MLP width is chosen so both have (almost) the same parameter count."""
    rwkv = build_model("rwkv", vocab_size=vocab_size, n_layer=size.n_layer, d_model=size.d_model)
    n_head = max(1, size.d_model // 32)
    gpt_cfg = dict(vocab_size=vocab_size, n_layer=size.n_layer, d_model=size.d_model, n_head=n_head)
    base = build_model("gpt", **gpt_cfg, mlp_ratio=4.0).num_params()
    per_hidden = 2 * size.d_model * size.n_layer  # parameters per MLP hidden unit
    hidden = 4 * size.d_model + round((rwkv.num_params() - base) / per_hidden)
    gpt = build_model("gpt", **gpt_cfg, mlp_ratio=hidden / size.d_model)
    return {"rwkv": rwkv.to(device), "gpt": gpt.to(device)}


def state_bytes(state) -> int:
    """Bytes of every tensor in a (nested) model state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


# ----------------------------------------------------------------------------------------------
# (a) decoding cost versus context


def contexts_states(name: str, model, tokens: torch.Tensor, contexts: tuple[int, ...]) -> dict[int, object]:
    """The model state after each context length (one pass over the longest context)."""
    states = {}
    with torch.no_grad():
        if name == "gpt":  # the KV cache of a prefix is the prefix of the KV cache
            _, full = model(tokens[:, : max(contexts)])
            for n in contexts:
                states[n] = {
                    "k": [k[:, :, :n].clone() for k in full["k"]],
                    "v": [v[:, :, :n].clone() for v in full["v"]],
                    "valid": full["valid"][:, :n].clone(),
                    "pos": torch.full_like(full["pos"], n),
                }
        else:  # RWKV: continue the recurrence from one context length to the next
            state, done = None, 0
            for n in sorted(contexts):
                _, state = model(tokens[:, done:n], state)
                states[n] = state
                done = n
    return states


def time_decode(model, state, first: torch.Tensor, n: int, device) -> float:
    """Seconds per token of greedy one-token steps from ``state``."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad():
        x, s = first, state
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            logits, s = model.step(x, s)
            x = logits.argmax(-1)
        sync()
    return (time.perf_counter() - t0) / n


def decoding_cost(models: dict, tokens: torch.Tensor, size: Size, device, progress) -> list[dict]:
    """Per-token decode time (median over interleaved repeats) and state bytes at each context.

    Steps are timed on one CPU thread (restored afterwards): batch-1 decoding is latency-bound, and
    on a shared machine two OpenMP threads make every small op wait for a descheduled thread,
    which swamps the measurement (we saw 8 vs 0.6 ms/token for the same RWKV step).
    """
    states = {name: contexts_states(name, m.eval(), tokens, size.contexts) for name, m in models.items()}
    first = tokens[:, -1]
    with torch_threads(1, device):
        for name, m in models.items():  # warm-up (allocator, caches, the fused kernel build)
            time_decode(m, states[name][size.contexts[0]], first, 2, device)
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(size.decode_repeats):  # interleave models and contexts so load changes hit all alike
            for n in size.contexts:
                for name, m in models.items():
                    times.setdefault((name, n), []).append(time_decode(m, states[name][n], first, size.decode_tokens, device))
                    progress.update(1)
    rows = []
    for n in size.contexts:
        row = {"context": n}
        for name in models:
            row[f"{name}_ms_per_token"] = 1e3 * statistics.median(times[(name, n)])
            row[f"{name}_state_bytes"] = state_bytes(states[name][n])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# (b) equal-size training


def prepare_data(out: Path, size: Size):
    from rizzearch import corpora
    from rizzearch.data.text import prepare_text
    from rizzearch.data.tokenizer import byte_tokenizer, train_bpe

    source = corpora.path("tinyshakespeare")
    if size.vocab_size is None:
        tok = byte_tokenizer()
    else:
        tok = train_bpe([source.read_text(encoding="utf-8")], size.vocab_size)
    return tok, prepare_text(str(source), out / "data", tok, val_fraction=0.1)


def split_heldout(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out tokens cut in two: (validation: selection and curves, test: the reported losses)."""
    val = torch.from_numpy(ds.val[0].astype("int64"))
    half = len(val) // 2
    return val[:half], val[half:]


def train_one(name: str, lr: float, vocab_size: int, ds, valid: torch.Tensor, size: Size, out: Path, device: str, seed: int, progress: bool):
    """Train one model at one learning rate (same initialisation and batches for every run) -> (model, info)."""
    from rizzearch.data.batches import EvalWindows, RandomWindows
    from rizzearch.training.losses import lm_loss
    from rizzearch.training.loop import TrainConfig, train

    cfg = TrainConfig(steps=size.steps, batch_size=size.batch_size, lr=lr, warmup_steps=max(1, size.steps // 10), weight_decay=0.1,
                      eval_every=max(1, size.steps // size.evals), log_every=max(1, size.steps // 20), seed=seed, device=device)
    torch.manual_seed(seed)
    model = make_models(size, vocab_size, device)[name]
    data = RandomWindows(ds.train, size.batch_size, size.seq_len, seed=seed)  # same batches for every run
    evals = EvalWindows(valid, size.batch_size, size.seq_len, max_batches=size.eval_batches, bytes_per_token=ds.bytes_per_token)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(model.train(), lm_loss, data, cfg, out / f"train_{name}_lr{lr:g}", eval_data=evals, progress=progress, save_checkpoints=False)
    return model, {
        "lr": lr,
        "params": model.num_params(),
        "val_loss": res.final_eval["val_loss"],
        "val_bpb": res.final_eval.get("val_bpb"),
        "train_loss": res.final_loss,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "tokens": res.tokens,
        "curve": [(e["step"], e["val_loss"]) for e in res.evals if "step" in e],
    }


@torch.no_grad()
def window_losses(model, tokens: torch.Tensor, size: Size, device: str) -> torch.Tensor:
    """Mean next-token loss (nats) of every test window -> (n_windows,), the same windows for every model."""
    from rizzearch.data.batches import EvalWindows

    model.eval()
    out = []
    for b in EvalWindows(tokens, size.batch_size, size.seq_len, max_batches=size.eval_batches).batches():
        logits, _ = model(b["input_ids"].to(device))
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["targets"].to(device).flatten(), reduction="none")
        out.append(nll.view(b["targets"].shape).mean(1).cpu())  # (B,)
    return torch.cat(out)


def train_both(vocab_size: int, ds, size: Size, out: Path, device: str, seed: int, progress: bool) -> dict:
    """Each model through the whole learning-rate grid; the one with the lowest validation loss is
    scored on the test split. Returns name -> the selected run's info, its test loss, and the sweep."""
    valid, test = split_heldout(ds)
    results = {}
    for name in ("rwkv", "gpt"):
        model, sweep = lr_sweep(size.lrs, lambda lr, name=name: train_one(name, lr, vocab_size, ds, valid, size, out, device, seed, progress),
                                lambda m, info: info["val_loss"], higher_is_better=False)
        losses = window_losses(model, test, size, device)
        results[name] = {**sweep["runs"][str(sweep["selected_lr"])], "test_loss": float(losses.mean()), "test_window_losses": losses.tolist(),
                         "sweep": sweep["runs"]}
    return results


def parity(training: dict) -> dict:
    """Paired bootstrap of the relative test-loss difference (RWKV - GPT) / GPT over the same test windows."""
    r, g = torch.tensor(training["rwkv"]["test_window_losses"]), torch.tensor(training["gpt"]["test_window_losses"])
    rel = mean_ci((r - g) / g.mean(), key="rwkv/parity")
    lo, hi = rel["ci95"]
    return {"relative_difference": rel, "tolerance": PARITY_TOL, "within": bool(-PARITY_TOL <= lo and hi <= PARITY_TOL)}


# ----------------------------------------------------------------------------------------------
# The study


def run(out_dir: str, *, full: bool = False, tiny: bool = False, device: str = "cpu", seed: int = 0) -> dict:
    """Run the study; writes results.json, report.md and rwkv.png into ``out_dir``; returns the results."""
    r = StudyRun.start(STUDY, out_dir, MODES, full=full, tiny=tiny, device=device, seed=seed)
    torch.manual_seed(seed)
    tok, ds = prepare_data(r.out, r.size)
    decode_rows = measure_decoding(r, make_models(r.size, tok.vocab_size, device), ds)
    t_decode = r.budget.elapsed()
    with torch_threads(1, device):  # small models: on a shared machine 2 OpenMP threads per process made steps 10x slower
        training = train_both(tok.vocab_size, ds, r.size, r.out, device, seed, progress=not tiny)
    seconds = r.budget.elapsed()
    par = parity(training)
    claims, ratios = make_claims(decode_rows, training, par, r.size)
    metrics = {
        "mode": r.mode,
        "decode": decode_rows,
        "decode_time_ratio": ratios,
        "training": training,
        "parity": par,
        "sizes": asdict(r.size),
        "tokenizer_vocab": tok.vocab_size,
        "seconds": {"decode": t_decode, "total": seconds, "cpu": r.budget.cpu_elapsed()},
        "load_average": {"start": r.budget.load_start, "end": load_average()},
    }
    write_report(r.out / "report.md", r.mode, r.size, decode_rows, training, claims, seconds)
    plot(r.out / "rwkv.png", decode_rows, training)
    return r.finish(claims, metrics)


def measure_decoding(r: StudyRun[Size], models: dict, ds) -> list[dict]:
    """(a) decoding cost at each context, with real text as the context (wrapped around if the split is short)."""
    from tqdm.auto import tqdm

    size = r.size
    val = torch.from_numpy(ds.val[0].astype("int64"))
    need = max(size.contexts) + 1
    stream = val.repeat(-(-need // len(val)))[:need]
    bar = tqdm(total=size.decode_repeats * len(size.contexts) * len(models), desc="rwkv study: decode vs context", disable=r.mode == "tiny")
    rows = decoding_cost(models, stream[None].to(r.device), size, r.device, bar)
    bar.close()
    return rows


def make_claims(decode_rows: list[dict], training: dict, par: dict, size: Size) -> tuple[list[Claim], dict]:
    """The four claims, and the decode-time ratios (longest / shortest context) of both models."""
    lo, hi = decode_rows[0], decode_rows[-1]
    rwkv_ratio = hi["rwkv_ms_per_token"] / lo["rwkv_ms_per_token"]
    gpt_ratio = hi["gpt_ms_per_token"] / lo["gpt_ms_per_token"]
    rwkv_mem = {r["rwkv_state_bytes"] for r in decode_rows}
    gpt_mem_ratio = hi["gpt_state_bytes"] / lo["gpt_state_bytes"]
    ctx_ratio = hi["context"] / lo["context"]
    r_loss, g_loss = training["rwkv"]["test_loss"], training["gpt"]["test_loss"]
    rel = par["relative_difference"]
    lrs = ", ".join(f"{lr:g}" for lr in size.lrs)
    claims = [
        Claim(
            "rwkv_decode_time_flat",
            f"RWKV's per-token decoding time does not grow with the context ({lo['context']} -> {hi['context']} tokens)",
            "constant time per token (RNN inference)",
            f"{rwkv_ratio:.2f}x ({lo['rwkv_ms_per_token']:.3f} -> {hi['rwkv_ms_per_token']:.3f} ms/token)",
            bool(rwkv_ratio <= FLAT_RATIO),
        ),
        Claim(
            "gpt_decode_time_grows",
            f"A transformer with a KV cache pays more per token as the context grows ({lo['context']} -> {hi['context']} tokens)",
            "linear growth per token (quadratic overall)",
            f"{gpt_ratio:.2f}x ({lo['gpt_ms_per_token']:.3f} -> {hi['gpt_ms_per_token']:.3f} ms/token)",
            bool(gpt_ratio > FLAT_RATIO and gpt_ratio > rwkv_ratio),
        ),
        Claim(
            "rwkv_state_constant",
            "RWKV carries the same state whatever the context; the KV cache grows with it",
            "O(d) memory per sequence vs O(T d)",
            f"RWKV {lo['rwkv_state_bytes']:,} bytes at every context; GPT cache x{gpt_mem_ratio:.1f} for x{ctx_ratio:.0f} context",
            bool(len(rwkv_mem) == 1 and gpt_mem_ratio >= 0.9 * ctx_ratio),
        ),
        Claim(
            "rwkv_on_par_with_gpt",
            f"RWKV-4 performs on par with a transformer of the same size trained on the same tokens: the 95% interval of the relative "
            f"test-loss difference (RWKV - GPT) / GPT lies within +-{PARITY_TOL:.0%} (each model's learning rate chosen on validation from {{{lrs}}})",
            "on par with similarly sized transformers (Fig. 5)",
            f"test loss RWKV {r_loss:.4f} (lr {training['rwkv']['lr']:g}) vs GPT {g_loss:.4f} (lr {training['gpt']['lr']:g}); "
            f"relative difference {rel['mean']:+.1%} [{rel['ci95'][0]:+.1%}, {rel['ci95'][1]:+.1%}]",
            par["within"],
        ),
    ]
    return claims, {"rwkv": rwkv_ratio, "gpt": gpt_ratio}


def write_report(path: Path, mode: str, size: Size, rows: list[dict], training: dict, claims: list[Claim], seconds: float) -> None:
    decode = md_table(["context", "RWKV ms/token", "GPT ms/token", "RWKV state (KiB)", "GPT KV cache (KiB)"],
                      [[str(r["context"]), f"{r['rwkv_ms_per_token']:.3f}", f"{r['gpt_ms_per_token']:.3f}", f"{r['rwkv_state_bytes'] / 1024:.1f}",
                        f"{r['gpt_state_bytes'] / 1024:.1f}"] for r in rows], "rrrrr")
    train_rows = [[name, f"{t['params']:,}", f"{t['lr']:g}", ", ".join(f"{lr}: {x['val_loss']:.4f}" for lr, x in t["sweep"].items()),
                   f"{t['val_bpb']:.3f}" if t.get("val_bpb") else "-", f"{t['test_loss']:.4f}", f"{t['train_loss']:.4f}",
                   f"{sum(x['seconds'] for x in t['sweep'].values()):.0f}"] for name, t in training.items()]
    train = md_table(["model", "parameters", "selected lr", "validation loss per lr", "val bits/byte", "test loss", "train loss", "seconds (all lrs)"],
                     train_rows, "lrrlrrrr")
    protocol = (f"Learning-rate grid {', '.join(f'{lr:g}' for lr in size.lrs)} for both models (fixed in advance); the held-out text is cut in two halves: "
                "validation (curves, selection by the lowest final loss) and test (reported, scored once per selected model).")
    doc = Markdown("RWKV-4 study (Peng et al. 2023)")
    doc.section(None, f"Mode: {mode}; both models d_model={size.d_model}, {size.n_layer} layers; wall time {seconds:.0f} s.")
    doc.section("Decoding cost versus context (batch 1, greedy, median per-token step, one CPU thread)", decode)
    doc.section(f"Equal-size training on tiny-shakespeare ({size.steps} steps x {size.batch_size} x {size.seq_len} tokens, same batches)", protocol, train)
    doc.claims(claims).image("rwkv.png", "decoding cost and training curves").write(path)


def plot(path: Path, rows: list[dict], training: dict) -> None:
    with figure(path, 3, (15, 4)) as ax:
        ctx = [r["context"] for r in rows]
        for name, style in (("rwkv", "o-"), ("gpt", "s--")):
            ax[0].plot(ctx, [r[f"{name}_ms_per_token"] for r in rows], style, label=name.upper())
            ax[1].plot(ctx, [r[f"{name}_state_bytes"] / 1024 for r in rows], style, label=name.upper())
            for lr, run in training[name]["sweep"].items():
                chosen = float(lr) == training[name]["lr"]
                if run["curve"]:
                    ax[2].plot([st for st, _ in run["curve"]], [v for _, v in run["curve"]], style, lw=2 if chosen else 0.8, alpha=1 if chosen else 0.4,
                               color="C0" if name == "rwkv" else "C1", label=f"{name.upper()} lr {float(lr):g}" + (" (selected)" if chosen else ""))
        for a, title, ylabel in ((ax[0], "per-token decode time", "ms / token"), (ax[1], "state carried per sequence", "KiB")):
            a.set_xscale("log", base=2)
            a.set_xlabel("context length (tokens)")
            a.set_ylabel(ylabel)
            a.set_title(title)
            a.legend()
        ax[1].set_yscale("log")
        ax[2].set_xlabel("step")
        ax[2].set_ylabel("validation loss (nats/token)")
        ax[2].set_title("equal-size training, same tokens (validation split)")
        ax[2].legend(fontsize=7)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(run(sys.argv[1] if len(sys.argv) > 1 else "runs/rwkv", tiny="--tiny" in sys.argv, full="--full" in sys.argv)["claims"])
