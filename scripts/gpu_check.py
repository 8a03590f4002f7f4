"""``make gpu-check``: everything that needs a CUDA device, in one run of under 8 minutes, with one report.

Sections (each with its own time limit; a failing or timed-out section is reported, the rest still run):

1. the ``gpu``-marked tests (``pytest -m gpu``);
2. the CUDA sections of the benchmarks: ops against their references on CUDA and their speed
   (``benchmarks/xlstm.py``, ``benchmarks/rwkv.py``, ``benchmarks/goldfish.py``), training throughput
   (``benchmarks/train_throughput.py``), LoRA + checkpointing peak memory (``benchmarks/finetune.py``);
3. a bf16 training step of every registered model (loss finite, step time, tokens/s, peak memory);
4. SmolLM2-135M greedy decoding tokens/s (``load_pretrained("smollm2")``).

Writes ``OUT/report.md`` (default ``runs/gpu-check``) and ``OUT/results.json``; exits 1 when a section
failed. ``--dry-run`` runs on the CPU at toy sizes (each benchmark is compiled and its options
checked, the gpu tests of one file only collected) to check the script itself works; the default
test suite runs it.

    python scripts/gpu_check.py [--out runs/gpu-check] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 8 * 60

# (name, argv after the script, time limit in seconds on the GPU)
BENCHMARKS = [
    ("xlstm ops on CUDA", ["benchmarks/xlstm.py", "--repeats", "3", "--T", "512", "--step_calls", "50"], 75),
    ("rwkv ops on CUDA", ["benchmarks/rwkv.py", "--repeats", "1", "--decode_repeats", "3", "--skip_big"], 75),
    ("goldfish on CUDA", ["benchmarks/goldfish.py", "--repeats", "5", "--device", "cuda"], 30),
    ("train throughput on CUDA", ["benchmarks/train_throughput.py", "--repeats", "3", "--device", "cuda"], 45),
    ("LoRA + checkpointing memory", ["benchmarks/finetune.py", "--skip_step", "--device", "cuda"], 75),
]


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_subprocess(name: str, argv: list[str], limit: float) -> dict:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"section": name, "status": "timeout", "seconds": round(time.perf_counter() - t0, 1), "detail": f"over {limit:.0f} s"}
    out = {"section": name, "status": "ok" if proc.returncode == 0 else "failed", "seconds": round(time.perf_counter() - t0, 1)}
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    out["detail"] = _last_json(proc.stdout) or (tail[-1] if tail else "")
    if proc.returncode:
        out["detail"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return out


def run_inline(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        detail, status = fn(*args), "ok"
    except Exception as e:  # a broken section is reported, the others still run
        detail, status = f"{type(e).__name__}: {e}", "failed"
    return {"section": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "detail": detail}


def bf16_train_steps(device: str, dry: bool) -> dict:
    """Three AdamW steps of every registered model under bf16 autocast: finite loss, ms/step, tokens/s, peak MiB."""
    from rizzearch.models import build_model
    from rizzearch.models.base import model_names, tiny_overrides
    from rizzearch.training.memory import autocast, peak_memory_mb, reset_peak_memory

    B, T = (2, 32) if dry else (8, 512)
    out = {}
    for name in model_names():
        over = tiny_overrides(name) if dry else {"d_model": 512}
        torch.manual_seed(0)
        model = build_model(name, **over).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)
        reset_peak_memory(device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with autocast("bf16", device):
                logits = model(x[:, :-1])[0]
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: non-finite bf16 loss {float(loss.detach())}")
        step = sorted(times)[1]
        out[name] = {"loss": round(float(loss.detach()), 4), "ms_per_step": round(1000 * step, 1), "tokens_per_s": round(B * T / step),
                     "peak_mib": round(peak_memory_mb(device))}
    return out


def smollm2_decode(device: str, dry: bool) -> dict:
    """Greedy decoding tokens/s of the bundled SmolLM2-135M-Instruct (dequantized, fp32 on CPU, bf16 on CUDA)."""
    from rizzearch.models import load_pretrained
    from rizzearch.models.base import generate

    pre = load_pretrained("smollm2")
    model = pre.model.to(device)
    if device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    n = 4 if dry else 128
    prompt = torch.tensor([pre.tokenizer.encode("The capital of France is")], device=device)
    generate(model, prompt, 2)  # warm-up
    t0 = time.perf_counter()
    out = generate(model, prompt, n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"new_tokens": int(out.shape[1]), "tokens_per_s": round(out.shape[1] / dt, 1), "dtype": str(next(model.parameters()).dtype)}


def check_benchmark_args(argv: list[str]) -> str:
    """Dry run: the script compiles and defines every option passed to it."""
    path = ROOT / argv[0]
    source = path.read_text()
    compile(source, str(path), "exec")
    unknown = [o for o in argv[1:] if o.startswith("--") and f'"{o}"' not in source]
    if unknown:
        raise ValueError(f"{argv[0]} has no option(s) {unknown}")
    return f"{argv[0]}: compiles, options {[o for o in argv[1:] if o.startswith('--')]} exist"


SECTIONS = ("tests", "benchmarks", "train", "decode")


def sections(dry: bool, device: str, only: tuple[str, ...] = SECTIONS) -> list[dict]:
    rows = []
    if "tests" in only:
        target = ["tests/ops/test_wkv.py", "--collect-only"] if dry else []  # dry: one file's gpu tests, collected only
        rows.append(run_subprocess("gpu-marked tests", ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *target], 120))
    for name, argv, limit in BENCHMARKS if "benchmarks" in only else []:
        rows.append(run_inline(name, check_benchmark_args, argv) if dry else run_subprocess(name, argv, limit))
    if "train" in only:
        rows.append(run_inline("bf16 training step, every model", bf16_train_steps, device, dry))
    if "decode" in only:
        rows.append(run_inline("SmolLM2-135M decode", smollm2_decode, device, dry))
    return rows


def write_report(out: Path, rows: list[dict], device_name: str, dry: bool, total_s: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# GPU check" + (" (dry run on CPU)" if dry else ""),
        "",
        f"- device: {device_name}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}",
        f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; load average {os.getloadavg()[0]:.2f}",
        f"- total: {total_s:.0f} s (budget {BUDGET_S} s)",
        "",
        "| section | status | seconds | result |",
        "|---|---|---|---|",
    ]
    for r in rows:
        detail = r["detail"] if isinstance(r["detail"], str) else json.dumps(r["detail"], sort_keys=True)
        lines.append(f"| {r['section']} | {r['status']} | {r['seconds']} | {detail.replace('|', '/')[:2000]} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"device": device_name, "dry_run": dry, "total_s": total_s, "sections": rows}, indent=2, default=str))
    return out / "report.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"))
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks that this script runs")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these sections")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); use --dry-run on a CPU", file=sys.stderr)
        return 2
    device = "cpu" if a.dry_run else "cuda"
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    t0 = time.perf_counter()
    rows = sections(a.dry_run, device, tuple(a.sections))
    report = write_report(Path(a.out), rows, name, a.dry_run, time.perf_counter() - t0)
    print(report.read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
