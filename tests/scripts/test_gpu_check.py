"""``make gpu-check``'s script runs end to end in its CPU dry mode and writes its report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_writes_a_report(tmp_path):
    gpu_check = load_script()
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "tests", "benchmarks", "train"])
    report = (tmp_path / "report.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert code == 0, report
    assert results["dry_run"] and {r["section"] for r in results["sections"]} >= {"gpu-marked tests", "LoRA + checkpointing memory"}
    assert "# GPU check (dry run on CPU)" in report and "| bf16 training step, every model | ok |" in report
    train = next(r for r in results["sections"] if r["section"].startswith("bf16"))["detail"]
    assert {"gpt", "xlstm", "rwkv"} <= set(train) and all(v["tokens_per_s"] > 0 for v in train.values())


def test_a_renamed_benchmark_option_is_caught():
    gpu_check = load_script()
    with pytest.raises(ValueError, match=r"benchmarks/finetune.py has no option\(s\) \['--nope'\]"):
        gpu_check.check_benchmark_args(["benchmarks/finetune.py", "--nope"])


def test_without_a_gpu_the_real_run_refuses(capsys):
    gpu_check = load_script()
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err


@pytest.mark.slow
def test_full_dry_run_including_decode(tmp_path):
    assert load_script().main(["--dry-run", "--out", str(tmp_path)]) == 0
