"""Cost of the goldfish mask relative to a training step of the debug GPT (configs/debug.yaml sizes).

Times, interleaved in one process after warm-up: one full training step with the standard loss
(forward, cross-entropy, backward, AdamW step) and the goldfish mask of the same (B, T) targets for
each strategy; also the full goldfish training step (mask + masked loss + metrics). Target
(issue 5): the hashed mask at B=8, T=512 costs at most 3% of a training step.

    python benchmarks/goldfish.py [--batch_size 8] [--seq_len 512] [--repeats 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, interleaved, print_header, print_table  # noqa: E402

from rizzearch.models import build_model  # noqa: E402
from rizzearch.objectives.goldfish import STRATEGIES, GoldfishConfig, goldfish_mask  # noqa: E402
from rizzearch.training.losses import GoldfishLoss, lm_loss  # noqa: E402
from rizzearch.training.loop import TrainConfig, make_optimizer  # noqa: E402

TARGET = 0.03


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--h", type=int, default=13)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = print_header(f"Goldfish mask overhead vs a debug-GPT training step (B={a.batch_size}, T={a.seq_len})", ())
    torch.manual_seed(0)
    dev = torch.device(a.device)
    # configs/debug.yaml: gpt, n_layer 2, n_head 4, d_model 64, byte tokenizer (vocab 258)
    model = build_model("gpt", n_layer=2, n_head=4, d_model=64, vocab_size=258).to(dev)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(2, 258, (a.batch_size, a.seq_len + 1), device=dev)
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    gf_loss = GoldfishLoss(GoldfishConfig(k=a.k, h=a.h, strategy="hash"), protected_ids=(0, 1))

    def train_step(loss_fn):
        def fn():
            loss, _ = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return fn

    fns = {"train_step": train_step(lm_loss), "goldfish_train_step": train_step(gf_loss)}
    for s in STRATEGIES:
        fns[f"mask_{s}"] = (lambda s=s: goldfish_mask(batch["targets"], s, a.k, a.h, protected_ids=(0, 1)))
    times = interleaved(fns, repeats=a.repeats, warmup=2, device=dev)
    step = statistics.median(times["train_step"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"timing": name, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                     "fraction_of_step": med / step})
    print_table(rows, ["timing", "median_ms", "min_ms", "max_ms", "fraction_of_step"])
    overhead = {s: statistics.median(times[f"mask_{s}"]) / step for s in STRATEGIES}
    objective_overhead = statistics.median(times["goldfish_train_step"]) / step - 1
    ok = overhead["hash"] <= TARGET
    print(f"hash mask: {overhead['hash']:.2%} of a training step (target <= {TARGET:.0%}): {'PASS' if ok else 'FAIL'}; "
          f"whole goldfish step vs standard step: {objective_overhead:+.2%}")
    out = {"benchmark": "goldfish", "batch_size": a.batch_size, "seq_len": a.seq_len, "k": a.k, "h": a.h,
           "step_ms": step * 1e3, "mask_overhead": overhead, "goldfish_step_overhead": objective_overhead,
           "target": TARGET, "pass": ok, "machine": info}
    emit_json(out)
    return out


if __name__ == "__main__":
    main()
