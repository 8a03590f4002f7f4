"""ORPO benchmarks: memory of the chunked sequence log-prob, and ORPO step time against TRL.

1. Peak memory of masked sequence log-probs at B=4, T=512, V=32000 (fp32), every position counted
   (the worst case for the chunked form, which skips positions that do not count). Variants: the
   full log-softmax reference, our chunked ``token_logprobs``, and chunked with the in-place
   backward; forward only and forward + backward. Each variant runs in a fresh subprocess and we
   report its peak RSS *above* the RSS with the inputs (logits, targets) already allocated; glibc is
   told to mmap every block over 64 KiB so freed memory really leaves the process. On a GPU the same
   numbers come from ``torch.cuda.max_memory_allocated``. The logits come out of an LM head
   (h[B, T, 256] @ W[V, 256]^T) so the backward pass ends in small tensors, as in a model; the
   gradients of h and W (common to every variant, 34 MiB) are included. Target (issue 6): chunked
   <= 0.3x full.
2. ORPO step time (forward, loss, backward) on a tiny random Llama with V=32000, one batch of B
   pairs: ours (``orpo_batch_loss``, prompt+response NLL, TRL's semantics) vs TRL's
   ``ORPOTrainer.get_batch_loss_metrics``; same model, same batch, interleaved, median ratio.
   ``ours+mask`` also passes the padding mask to the model as TRL does (ours needs none: right
   padding never reaches a scored position of a causal model), to isolate the loss code.

    python benchmarks/orpo.py [--repeats 7] [--pairs 4] [--seq_len 128]
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

MEM_TARGET = 0.3
B, T, V = 4, 512, 32000
D_HEAD = 256  # width of the hidden state feeding the LM head in the memory benchmark


# ----------------------------------------------------------------------------------------------
# 1. memory


def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc (Linux)."""
    cur = peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cur, peak


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS


def _mem_child(variant: str, backward: bool, device: str) -> dict:
    from rizzearch.objectives.lm import token_logprobs, token_logprobs_reference

    torch.manual_seed(0)
    dev = torch.device(device)
    # the logits come out of an LM head, as in a model: logits = h @ W^T, backward flows into h and W
    h = torch.randn(B, T, D_HEAD, device=dev, requires_grad=backward)
    w = (torch.randn(V, D_HEAD, device=dev) / D_HEAD**0.5).requires_grad_(backward)
    targets = torch.randint(0, V, (B, T), device=dev)
    fns = {
        "full": lambda z: token_logprobs_reference(z, targets),
        "chunked": lambda z: token_logprobs(z, targets),
        "chunked_inplace": lambda z: token_logprobs(z, targets, inplace_backward=True),
    }
    with torch.set_grad_enabled(backward):
        logits = h @ w.T  # (B, T, V), the input of the measured op
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        start = _rss_mib()[0]
    if backward:
        fns[variant](logits).sum().backward()
    else:
        fns[variant](logits).sum()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        extra = _rss_mib()[1] - start
    return {"variant": variant, "backward": backward, "extra_mib": extra, "logits_mib": logits.numel() * 4 / 2**20}


def memory(device: str) -> list[dict]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for backward in (False, True):
        for variant in ("full", "chunked", "chunked_inplace"):
            if variant == "chunked_inplace" and not backward:
                continue
            out = subprocess.run([sys.executable, __file__, "--_mem", variant, str(int(backward)), device], capture_output=True, text=True, env=env)
            if out.returncode:
                raise RuntimeError(out.stderr)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        full = next(x for x in rows if x["variant"] == "full" and x["backward"] == r["backward"])
        r["ratio_vs_full"] = r["extra_mib"] / full["extra_mib"]
    return rows


# ----------------------------------------------------------------------------------------------
# 2. step time vs TRL


class _HFAsCausalLM(torch.nn.Module):
    def __init__(self, hf, pad_id: int | None = None):
        super().__init__()
        self.hf, self.pad_id = hf, pad_id

    def forward(self, tokens, state=None, attention_mask=None):
        mask = (tokens != self.pad_id).long() if self.pad_id is not None else None
        return self.hf(tokens, attention_mask=mask).logits, None


def step_time(pairs: int, seq_len: int, repeats: int) -> tuple[dict, list[dict]]:
    import datasets
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from rizzearch.data.tokenizer import byte_tokenizer
    from rizzearch.training.preference import orpo_batch_loss

    torch.manual_seed(0)
    pad = V - 1  # never drawn as a real token below
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=2 * seq_len, pad_token_id=pad, bos_token_id=None, eos_token_id=0)
    model = LlamaForCausalLM(cfg).float().eval()
    tok = byte_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.to_json()), eos_token="<|endoftext|>", pad_token="<|pad|>")
    import tempfile

    tmp = tempfile.mkdtemp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=model, args=ORPOConfig(output_dir=tmp, beta=0.1, bf16=False, report_to=[], use_cpu=True,
                                                           remove_unused_columns=False, gradient_checkpointing=False, padding_value=pad),
                              train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]), processing_class=hf_tok)

    # one batch, both formats: prompts of varied length, responses of varied length, right padding
    g = torch.Generator().manual_seed(1)
    ours = {k: torch.zeros(pairs, seq_len, dtype=torch.bool) for k in
            ("chosen_attention_mask", "chosen_response_mask", "rejected_attention_mask", "rejected_response_mask")}
    trl = {}
    prompt_lens = torch.randint(seq_len // 4, seq_len // 2, (pairs,), generator=g).tolist()
    prompts = torch.randint(2, V - 1, (pairs, seq_len // 2), generator=g)  # one prompt per pair, shared by both sides
    for side in ("chosen", "rejected"):
        ids = torch.full((pairs, seq_len), pad, dtype=torch.long)
        labels = torch.full((pairs, seq_len), -100, dtype=torch.long)
        for i, p_len in enumerate(prompt_lens):
            total = int(torch.randint(p_len + 8, seq_len + 1, (1,), generator=g))
            ids[i, :p_len] = prompts[i, :p_len]
            ids[i, p_len:total] = torch.randint(2, V - 1, (total - p_len,), generator=g)
            ours[f"{side}_attention_mask"][i, :total] = True
            ours[f"{side}_response_mask"][i, p_len:total] = True
            labels[i, p_len:total] = ids[i, p_len:total]
        ours[f"{side}_input_ids"] = ids
        trl.update({f"{side}_input_ids": ids, f"{side}_attention_mask": ours[f"{side}_attention_mask"].long(), f"{side}_labels": labels})

    def trl_step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss, _ = trainer.get_batch_loss_metrics(model, trl)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    wrapped, wrapped_mask = _HFAsCausalLM(model), _HFAsCausalLM(model, pad_id=pad)

    def ours_step(m):
        def fn():
            loss, _ = orpo_batch_loss(m, ours, lam=0.1, nll_mode="prompt+response")
            loss.backward()
            model.zero_grad(set_to_none=True)
            return float(loss.detach())

        return fn

    check = (trl_step(), ours_step(wrapped_mask)(), ours_step(wrapped)())
    times = interleaved({"trl": trl_step, "ours": ours_step(wrapped), "ours+mask": ours_step(wrapped_mask)}, repeats=repeats, warmup=1)
    rows = [{"impl": k, **summary(v), "speedup_vs_trl": ratio(times["trl"], v)} for k, v in times.items()]
    return {"losses_trl_ours+mask_ours": check, "params": sum(p.numel() for p in model.parameters())}, rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--skip_step", action="store_true")
    p.add_argument("--_mem", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._mem:
        print(json.dumps(_mem_child(a._mem[0], bool(int(a._mem[1])), a._mem[2])))
        return {}
    info = print_header("ORPO: chunked sequence log-prob memory; ORPO step time vs TRL", ("transformers", "trl"))
    payload: dict = {"benchmark": "orpo", "machine": info}
    if not a.skip_memory:
        mem = memory(a.device)
        print(f"\n## peak extra memory of masked sequence log-probs, B={B} T={T} V={V} fp32 (logits {mem[0]['logits_mib']:.0f} MiB), {a.device}")
        print_table(mem, ["variant", "backward", "extra_mib", "ratio_vs_full"])
        fwd = next(r for r in mem if r["variant"] == "chunked" and not r["backward"])["ratio_vs_full"]
        bwd = next(r for r in mem if r["variant"] == "chunked" and r["backward"])["ratio_vs_full"]
        bwd_inplace = next(r for r in mem if r["variant"] == "chunked_inplace")["ratio_vs_full"]
        payload.update(memory=mem, memory_ratio_forward=fwd, memory_ratio_fwd_bwd=bwd, memory_ratio_fwd_bwd_inplace=bwd_inplace,
                       memory_target=MEM_TARGET, memory_target_met_forward=fwd <= MEM_TARGET,
                       memory_target_met_fwd_bwd=bwd <= MEM_TARGET, memory_target_met_fwd_bwd_inplace=bwd_inplace <= MEM_TARGET)
        print(f"chunked / full: forward {fwd:.3f}, forward+backward {bwd:.3f}, forward+backward with in-place grad {bwd_inplace:.3f} "
              f"(target <= {MEM_TARGET})")
    if not a.skip_step:
        meta, rows = step_time(a.pairs, a.seq_len, a.repeats)
        print(f"\n## ORPO step (forward + loss + backward), tiny Llama V={V}, {a.pairs} pairs x T={a.seq_len}, {meta['params']:,} parameters")
        print_table(rows, ["impl", "median_s", "min_s", "max_s", "spread", "speedup_vs_trl"])
        print(f"losses (trl, ours+mask, ours): {meta['losses_trl_ours+mask_ours']}")
        payload.update(step=rows, step_speedup_vs_trl=next(r for r in rows if r["impl"] == "ours")["speedup_vs_trl"],
                       step_speedup_vs_trl_same_mask=next(r for r in rows if r["impl"] == "ours+mask")["speedup_vs_trl"], **meta)
    emit_json(payload)
    return payload


if __name__ == "__main__":
    main()
