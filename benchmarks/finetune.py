"""Fine-tuning benchmarks: LoRA + activation checkpointing memory, ORPO+LoRA step time against TRL + peft.

Model: SmolLM2-135M's shape (``--model smollm2`` loads the bundled weights through
``load_pretrained("smollm2")``; ``--model random``, the default, builds the same shape with random
weights). ``--layers N`` keeps only N blocks and ``--vocab V`` shrinks the vocabulary so the
benchmark fits a loaded CPU; the JSON line records the shape used. One ORPO step = forward of
chosen + rejected, ORPO loss (lambda 0.1, prompt+response NLL, TRL's semantics), backward and an
AdamW step. LoRA: r=16, alpha=32 on every linear layer of every block.

1. Peak memory of one ORPO step, each variant in a fresh subprocess (peak RSS above the RSS after
   the model and batch are built, glibc told to give freed blocks back; on a GPU
   ``torch.cuda.max_memory_allocated``): full fine-tune without checkpointing (the baseline, with
   the default log-probs from the hidden states; ``full (logits)`` scores the full logits instead),
   LoRA + checkpointing in fp32, and the same under ``bf16`` autocast. Target: LoRA + checkpointing
   <= 0.4x the full fine-tune.
2. Step time: ours (``apply_lora`` on our Llama, ``orpo_batch_loss``) vs TRL's ``ORPOTrainer`` with
   a peft ``LoraConfig`` (same r, alpha, targets) on the transformers copy of the same weights
   (``to_hf_llama``), same batch, interleaved, median ratio; no checkpointing on either side.
   Target >= 1.5x faster; first-step losses equal within 1e-4.

    python benchmarks/finetune.py [--layers 30 (4 on a CPU)] [--vocab 49152] [--seq_len 512] [--pairs 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_json, interleaved, print_header, print_table, ratio, summary  # noqa: E402

MEM_TARGET, SPEED_TARGET = 0.4, 1.5
LORA_R, LORA_ALPHA = 16, 32
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUR_TARGETS = ["attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down"]  # the same projections (qkv and gate/up fused)
SMOLLM2 = dict(vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536, tie_embeddings=True, rope_theta=100000.0)


def build(a) -> torch.nn.Module:
    """Our Llama: SmolLM2-135M weights or its shape with random weights, cut to ``--layers`` blocks."""
    from rizzearch.models import build_model

    if a.model == "smollm2":
        from rizzearch.models import load_pretrained

        model = load_pretrained("smollm2").model.float()
        if a.layers < len(model.blocks):
            model.blocks = model.blocks[: a.layers]
        return model
    torch.manual_seed(0)
    return build_model("llama", **{**SMOLLM2, "n_layer": a.layers, "vocab_size": a.vocab, "max_seq_len": 4 * a.seq_len})


def make_batch(pairs: int, seq_len: int, vocab: int, pad: int) -> tuple[dict, dict]:
    """One preference batch in our format and TRL's: shared prompts, varied lengths, right padding."""
    g = torch.Generator().manual_seed(1)
    ours, trl = {}, {}
    prompt_lens = torch.randint(seq_len // 4, seq_len // 2, (pairs,), generator=g).tolist()
    prompts = torch.randint(2, vocab - 1, (pairs, seq_len // 2), generator=g)
    for side in ("chosen", "rejected"):
        ids = torch.full((pairs, seq_len), pad, dtype=torch.long)
        att = torch.zeros(pairs, seq_len, dtype=torch.bool)
        resp = torch.zeros(pairs, seq_len, dtype=torch.bool)
        labels = torch.full((pairs, seq_len), -100, dtype=torch.long)
        for i, p_len in enumerate(prompt_lens):
            total = int(torch.randint(p_len + 8, seq_len + 1, (1,), generator=g))
            ids[i, :p_len] = prompts[i, :p_len]
            ids[i, p_len:total] = torch.randint(2, vocab - 1, (total - p_len,), generator=g)
            att[i, :total], resp[i, p_len:total] = True, True
            labels[i, p_len:total] = ids[i, p_len:total]
        ours.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_response_mask": resp})
        trl.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att.long(), f"{side}_labels": labels})
    return ours, trl


# ----------------------------------------------------------------------------------------------
# 1. memory


def _rss_mib() -> tuple[float, float]:
    cur = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak


MEM_VARIANTS = ("full (logits)", "full", "lora+ckpt", "lora+ckpt+bf16")


def _mem_child(a, variant: str) -> dict:
    """One ORPO step (forward, backward, AdamW) of ``variant``; peak memory above the built model and batch.

    ``full (logits)`` scores the (2B, L, V) logits (the path before the log-probs came from the hidden
    states, and what TRL does); every other variant uses the default, ``preference_forward(from_hidden=True)``.
    """
    from rizzearch.objectives.orpo import orpo_loss
    from rizzearch.training.lora import apply_lora, lora_parameters
    from rizzearch.training.memory import autocast, checkpoint_blocks
    from rizzearch.training.preference import preference_forward

    dev = torch.device(a.device)
    model = build(a).to(dev).train()
    batch = {k: v.to(dev) for k, v in make_batch(a.pairs, a.seq_len, model.config.vocab_size, 1)[0].items()}
    if variant.startswith("full"):
        params, precision = list(model.parameters()), "fp32"
    else:
        apply_lora(model, LORA_R, LORA_ALPHA, targets=OUR_TARGETS)
        checkpoint_blocks(model)
        params, precision = lora_parameters(model), ("bf16" if variant.endswith("bf16") else "fp32")
    opt = torch.optim.AdamW(params, lr=1e-5)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        start = _rss_mib()[0]
    with autocast(precision, dev):
        fw = preference_forward(model, batch, nll_mode="prompt+response", from_hidden=variant != "full (logits)")
        loss, _ = orpo_loss(fw.chosen.mean, fw.rejected.mean, fw.chosen_nll, 0.1)
    loss.backward()
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        extra = _rss_mib()[1] - start
    return {"variant": variant, "peak_extra_mib": extra, "loss": float(loss.detach())}


def memory(a) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    rows = []
    for variant in MEM_VARIANTS:
        argv = [sys.executable, __file__, "--_mem", variant, *_shape_args(a)]
        out = subprocess.run(argv, capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r["variant"]: r["peak_extra_mib"] for r in rows}
    for r in rows:
        r["ratio_vs_full"] = r["peak_extra_mib"] / base["full"]
        r["ratio_vs_full_logits"] = r["peak_extra_mib"] / base["full (logits)"]
    return rows


def _shape_args(a) -> list[str]:
    return ["--model", a.model, "--layers", str(a.layers), "--vocab", str(a.vocab), "--seq_len", str(a.seq_len),
            "--pairs", str(a.pairs), "--device", a.device]


# ----------------------------------------------------------------------------------------------
# 2. step time vs TRL + peft


def _trl_trainer(hf, pad: int, vocab: int):
    import tempfile

    import datasets
    import peft
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from rizzearch.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.to_json()), eos_token="<|endoftext|>", pad_token="<|pad|>")
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS, task_type="CAUSAL_LM")
    data = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ORPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, bf16=False, report_to=[], use_cpu=not torch.cuda.is_available(),
                          remove_unused_columns=False, padding_value=pad)
        return ORPOTrainer(model=hf, args=args, train_dataset=data, processing_class=hf_tok, peft_config=lora)


def step_time(a) -> tuple[dict, list[dict]]:
    from rizzearch.models.convert import to_hf_llama
    from rizzearch.training.lora import apply_lora
    from rizzearch.training.preference import orpo_batch_loss

    dev = torch.device(a.device)
    ours_model = build(a)
    hf = to_hf_llama(ours_model).float()
    V = ours_model.config.vocab_size
    pad = V - 1
    ours_model = apply_lora(ours_model, LORA_R, LORA_ALPHA, targets=OUR_TARGETS).to(dev).train()
    trainer = _trl_trainer(hf, pad, V)
    trl_model = trainer.model.to(dev).train()
    ours_b, trl_b = make_batch(a.pairs, a.seq_len, V, pad)
    ours_b, trl_b = ({k: v.to(dev) for k, v in b.items()} for b in (ours_b, trl_b))

    def trl_step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss, _ = trainer.get_batch_loss_metrics(trl_model, trl_b)
        loss.backward()
        trl_model.zero_grad(set_to_none=True)
        return float(loss.detach())

    def ours_step():
        loss, _ = orpo_batch_loss(ours_model, ours_b, lam=0.1, nll_mode="prompt+response")
        loss.backward()
        ours_model.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = {"trl": trl_step(), "ours": ours_step()}
    times = interleaved({"trl": trl_step, "ours": ours_step}, repeats=a.repeats, warmup=a.warmup, device=dev)
    rows = [{"impl": k, **summary(v), "speedup_vs_trl": ratio(times["trl"], v)} for k, v in times.items()]
    return {"first_step_loss": first, "first_step_loss_diff": abs(first["trl"] - first["ours"])}, rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["random", "smollm2"], default="random")
    p.add_argument("--layers", type=int, default=None, help="blocks kept (default: all 30 on a GPU, 4 on a CPU)")
    p.add_argument("--vocab", type=int, default=SMOLLM2["vocab_size"], help="vocabulary of the random model")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each side after the first-step loss check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--skip_step", action="store_true")
    p.add_argument("--_mem", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.layers is None:
        a.layers = SMOLLM2["n_layer"] if a.device.startswith("cuda") else 4
    if a._mem:
        print(json.dumps(_mem_child(a, a._mem)))
        return {}
    info = print_header("Fine-tuning: LoRA + checkpointing memory, ORPO+LoRA step vs TRL + peft", ("transformers", "trl", "peft"))
    shape = {"model": a.model, "layers": a.layers, "vocab": a.vocab if a.model == "random" else 49152, "seq_len": a.seq_len,
             "pairs": a.pairs, "device": a.device, "load_average": os.getloadavg()}
    payload: dict = {"benchmark": "finetune", "machine": info, "shape": shape}
    print(f"shape: {shape}")
    if not a.skip_memory:
        mem = memory(a)
        print("\n## peak memory of one ORPO step (forward, backward, AdamW)")
        print_table(mem, ["variant", "peak_extra_mib", "ratio_vs_full", "ratio_vs_full_logits", "loss"])
        lora_row = next(r for r in mem if r["variant"] == "lora+ckpt")
        lora_ratio = lora_row["ratio_vs_full"]
        bf16 = next(r for r in mem if r["variant"] == "lora+ckpt+bf16")["peak_extra_mib"]
        fp32 = next(r for r in mem if r["variant"] == "lora+ckpt")["peak_extra_mib"]
        payload.update(memory=mem, memory_ratio_lora_ckpt_vs_full=lora_ratio, memory_target=MEM_TARGET,
                       memory_target_met=lora_ratio <= MEM_TARGET, memory_ratio_bf16_vs_fp32=bf16 / fp32,
                       memory_ratio_lora_ckpt_vs_full_logits=lora_row["ratio_vs_full_logits"])
    if not a.skip_step:
        meta, rows = step_time(a)
        print("\n## ORPO + LoRA step (forward, loss, backward)")
        print_table(rows, ["impl", "median_s", "min_s", "max_s", "spread", "speedup_vs_trl"])
        speed = next(r for r in rows if r["impl"] == "ours")["speedup_vs_trl"]
        print(f"first-step losses: {meta['first_step_loss']} (|diff| {meta['first_step_loss_diff']:.2e}, target 1e-4)")
        payload.update(step=rows, step_speedup_vs_trl=speed, speed_target=SPEED_TARGET, speed_target_met=speed >= SPEED_TARGET,
                       loss_target_met=meta["first_step_loss_diff"] <= 1e-4, **meta)
    payload["load_average_end"] = os.getloadavg()
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
