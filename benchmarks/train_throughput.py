"""Training throughput of the GPT baseline and its model-FLOPs utilisation (MFU) on this machine.

MFU = (training FLOPs per token x tokens/s) / (fp32 matmul peak measured in this process).
The peak is the median rate of a large square fp32 matmul, timed interleaved with the training
steps so both see the same machine load. Target (issue 2): MFU >= 30% at d_model 512, T 256 on CPU.

    python benchmarks/train_throughput.py [--d_model 512] [--seq_len 256] [--repeats 5]
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
from rizzearch.training.losses import lm_loss  # noqa: E402
from rizzearch.training.loop import TrainConfig, make_optimizer  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--matmul_n", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    info = print_header("GPT training throughput and MFU", ())
    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = build_model("gpt", d_model=a.d_model, n_layer=a.n_layer, n_head=a.n_head, vocab_size=a.vocab_size).to(dev)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len + 1), device=dev)
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:]}
    n = a.matmul_n
    A, B = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)

    def step():
        loss, _ = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def matmul():
        for _ in range(4):
            A @ B

    times = interleaved({"train_step": step, "matmul": matmul}, repeats=a.repeats, warmup=2, device=dev)
    peak = 4 * 2 * n**3 / statistics.median(times["matmul"])
    tokens = a.batch_size * a.seq_len
    tps = tokens / statistics.median(times["train_step"])
    flops_tok = model.flops_per_token(a.seq_len)
    mfu = flops_tok * tps / peak
    rows = [
        {"metric": "parameters", "value": model.num_params()},
        {"metric": "train FLOPs / token", "value": flops_tok},
        {"metric": "tokens / s", "value": tps},
        {"metric": "achieved GFLOP/s", "value": flops_tok * tps / 1e9},
        {"metric": "fp32 matmul peak GFLOP/s", "value": peak / 1e9},
        {"metric": "MFU (fraction of measured peak)", "value": mfu},
        {"metric": "step time spread", "value": (max(times["train_step"]) - min(times["train_step"])) / statistics.median(times["train_step"])},
    ]
    print_table(rows, ["metric", "value"])
    target = 0.30
    print(f"MFU {mfu:.1%} (target >= {target:.0%}): {'PASS' if mfu >= target else 'FAIL'}")
    out = {"benchmark": "train_throughput", "d_model": a.d_model, "seq_len": a.seq_len, "tokens_per_s": tps,
           "peak_gflops": peak / 1e9, "mfu": mfu, "target_mfu": target, "pass": mfu >= target, "machine": info}
    emit_json(out)
    return out


if __name__ == "__main__":
    main()
