"""xLSTM-7B architecture (``xlstm_large``) speed against the official ``xLSTMLarge`` and transformers'
``xLSTMForCausalLM`` on the CPU, in one process, on the same weights (fp32, no_grad).

Two shapes: a small model (d_model 256, 4 heads, 4 blocks, vocab 4096) and one block of the 7B
shape (d_model 4096, 8 heads, qk_dim_factor 0.5, ffn 10944, vocab 256 so the block dominates).
Two workloads: decoding (one token per call with the state in and out, batch 1; the references in
``mode="inference"`` with their ``native`` step kernel, transformers through its ``xLSTMCache``)
and prefill (one forward over ``--T`` tokens from the empty state; the references' native
chunkwise kernel), timed cold (each call after the other sides', so its weights come from memory)
and warm (each call right after an untimed call of itself, as in a loop over prompts). ``ours`` is
the default model; in prefill, ``ours_packed`` is the same model with ``set_matmul_weights("packed")``
(its products on MKL-packed copies of the matrices: as much memory again, opt-in; decoding does not
use them). Target (issue 18): at least 2x faster, or at the memory-bandwidth bound.

The bound for decoding: every weight matrix is read once per token (bytes/token printed), plus
the recurrent state (read and written). The ``bound`` row times one fp32 matrix-vector product
(``F.linear``) over a matrix of exactly that many bytes, interleaved with the decoders in the same
loop (so under the same machine load); its bytes / time is the measured read bandwidth. The bound
for prefill is compute: the ``floor`` row runs only the model's projections (every ``nn.Linear``
of ours on ``T`` rows), the GEMMs all three implementations share; a prefill cannot be 2x faster
than a reference that spends less than half its time outside them. ``floor_packed`` is the same
products through the packed copies ``ours_packed`` uses (its own floor); the summary says how much
time 2x the official speed leaves beside it for the mLSTM cells, norms, SwiGLU and cap.

A third workload, ``gen_prefill`` (cold and warm; the small shape), is the prefill of a generation:
a prompt of ``--T`` tokens to the state and the next token's logits, what ``generate`` needs before
its first step. ``ours`` is ``prefill()``, which runs the last block past its mLSTM cell, the final
norm and the LM head on the last position only (the one-block 7B shape is all "last block", so it
would overstate what a 32-block model saves: not timed there).
The official model and transformers' have no way to skip the other positions (their ``forward``s,
and the official ``generate``, compute the logits of every position and keep the last), so
``official`` and ``transformers`` are their forwards; ``official_last`` is the official model's own
modules (embedding, backbone, head, soft cap) called here with the head on the last position, what
a user of the official code could write without rewriting its blocks. Every comparison
first checks that the sides compute the same logits.

    python benchmarks/xlstm_large.py [--repeats 5] [--T 256] [--threads 1,2] [--skip_7b]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from common import emit_json, interleaved, load_average, print_header, print_table, summary  # noqa: E402

# benchmarks/xlstm.py would shadow the ``xlstm`` package: keep this folder off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from rizzearch.models.convert import from_official_xlstm_large  # noqa: E402
from rizzearch.models.xlstm_large import PACKED_MIN_OUT  # noqa: E402
from rizzearch.ops import backends, packed_gemm  # noqa: E402
from rizzearch.testing import assert_close  # noqa: E402

warnings.filterwarnings("ignore")
TARGET_SPEEDUP = 2.0
WORKS = ("decode", "prefill", "prefill_warm", "gen_prefill", "gen_prefill_warm")
KERNELS = dict(
    chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native",
    mode="inference", autocast_kernel_dtype="float32", inference_state_dtype="float32",
)
SHAPES = {
    "small": dict(embedding_dim=256, num_heads=4, num_blocks=4, vocab_size=4096),
    "7b_layer": dict(embedding_dim=4096, num_heads=8, num_blocks=1, vocab_size=256),
}


def build(shape: str):
    """The official model (random weights, gates included), ours and transformers' on the same weights."""
    from transformers import xLSTMConfig, xLSTMForCausalLM
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    torch.manual_seed(0)
    kw = SHAPES[shape]
    off = xLSTMLarge(xLSTMLargeConfig(**kw, chunk_size=64, return_last_states=True, **KERNELS)).eval()
    with torch.no_grad():
        for name, p in off.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.02 if "norm" not in name else 0.1)
    hf_cfg = xLSTMConfig(
        vocab_size=kw["vocab_size"], hidden_size=kw["embedding_dim"], num_hidden_layers=kw["num_blocks"], num_heads=kw["num_heads"],
        chunk_size=64, ffn_proj_factor=2.6667, **KERNELS,
    )
    hf = xLSTMForCausalLM(hf_cfg).eval()
    sd = {("backbone.embeddings.weight" if k == "embedding.weight" else k): v for k, v in off.state_dict().items()}
    hf.load_state_dict(sd)
    return off, from_official_xlstm_large(off), hf


def decode_fns(off, ours, hf, prompt: torch.Tensor, calls: int) -> dict:
    """Each function decodes ``calls`` tokens after a prefill done once (state copies per call)."""
    with torch.no_grad():
        _, off_state = off(prompt)
        _, our_state = ours(prompt)
        hf_out = hf(prompt, use_cache=True)
    tok = prompt[:, -1:]

    @torch.no_grad()
    def official():
        st = {i: tuple(t.clone() for t in s) for i, s in off_state.items()}
        for _ in range(calls):
            off(tok, st)

    @torch.no_grad()
    def transformers():
        cache = hf_out.cache
        for _ in range(calls):
            hf(tok, cache=cache, use_cache=True)

    @torch.no_grad()
    def ours_fn():
        st = our_state
        for _ in range(calls):
            _, st = ours.step(tok[:, 0], st)

    return {"official": official, "transformers": transformers, "ours": ours_fn}


def check_same(off, ours, hf, x) -> float:
    with torch.no_grad():
        a, _ = off(x)
        b, _ = ours(x)
        c = hf(x).logits
    assert_close(b, a, atol=1e-3, rtol=1e-3, name="ours vs official logits")
    assert_close(c, a, atol=1e-3, rtol=1e-3, name="transformers vs official logits")
    return float((b - a).abs().max())


def decode_bytes(ours) -> int:
    """Bytes read per decoded token: every weight except the embedding table (one row of it), plus
    the recurrent state read and written."""
    weights = sum(p.numel() for n, p in ours.named_parameters() if n != "embed.weight") + ours.config.d_model
    state = sum(t.numel() for blk in ours.init_state(1)["blocks"] for t in blk.values())
    return 4 * (weights + 2 * state)


def prefill_floor(ours, T: int, packed: bool = False):
    """The matmul floor of a prefill: every projection of the model (our weights, fp32) applied to
    ``T`` rows, and nothing else; the three models run exactly these GEMMs plus their mLSTM cells
    and elementwise ops. ``packed``: the products ``ours_packed`` runs on packed copies (the
    projections with at least ``PACKED_MIN_OUT`` outputs) through them, its own floor."""
    lins = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    xs = {n: torch.randn(T, n) for n in {lin.in_features for lin in lins}}
    on_packed = [packed and lin.out_features >= PACKED_MIN_OUT for lin in lins]

    @torch.no_grad()
    def floor():
        for lin, p in zip(lins, on_packed):
            f = packed_gemm.linear if p else torch.nn.functional.linear
            f(xs[lin.in_features], lin.weight, lin.bias)

    return floor


def gen_prefill_fns(off, ours, hf, packed, x: torch.Tensor) -> dict:
    """Generation prefill: the prompt ``x`` (1, T) to the state and the last position's logits."""
    from xlstm.xlstm_large.model import soft_cap

    def official_last():  # the official modules, the head on the last position only (written here)
        h, _state = off.backbone(off.embedding(x), None)
        return soft_cap(off.lm_head(h[:, -1:]), off.config.output_logit_soft_cap)[:, -1]

    fns = {"official": lambda: off(x)[0][:, -1], "official_last": official_last, "transformers": lambda: hf(x).logits[:, -1],
           "ours": lambda: ours.prefill(x)[0]}
    if packed is not None:
        fns["ours_packed"] = lambda: packed.prefill(x)[0]
    with torch.no_grad():
        want = fns["official"]()
        for name, f in fns.items():
            assert_close(f(), want, atol=1e-3, rtol=1e-3, name=f"next-token logits, {name} vs official")
    return fns


def bench_shape(shape: str, a) -> dict:
    off, ours, hf = build(shape)
    packed = None
    if packed_gemm.available():  # our model again, its products on MKL-packed matrix copies (opt-in)
        packed = copy.deepcopy(ours)
        packed.set_matmul_weights("packed")
    V = SHAPES[shape]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    err = check_same(off, ours, hf, torch.randint(0, V, (1, 128), generator=g))
    if packed is not None:
        with torch.no_grad():
            probe = torch.randint(0, V, (1, 128), generator=g)
            assert_close(packed(probe)[0], ours(probe)[0], atol=1e-4, rtol=1e-4, name="packed vs our logits")
    prompt = torch.randint(0, V, (1, 16), generator=g)
    calls = a.calls if shape == "small" else max(1, a.calls // 10)
    fns = decode_fns(off, ours, hf, prompt, calls)
    probe_w = torch.randn(decode_bytes(ours) // 4 // 1024, 1024)  # as many bytes as a decode step reads
    probe_x = torch.randn(1, 1024)

    def bound():
        for _ in range(calls):
            torch.nn.functional.linear(probe_x, probe_w)

    fns["bound"] = bound
    dec = interleaved(fns, repeats=a.repeats, warmup=1)
    dec = {k: [t / calls for t in v] for k, v in dec.items()}
    x = torch.randint(0, V, (1, a.T), generator=g)

    def ours_modules():  # our model through its modules (torch chunkwise mLSTM), the path before the C kernels
        with backends.use_backend("xlstm_fused", "reference"):
            ours(x)

    fns = {"official": lambda: off(x), "transformers": lambda: hf(x), "ours": lambda: ours(x), "ours_modules": ours_modules,
           "floor": prefill_floor(ours, a.T)}
    if packed is not None:
        fns["ours_packed"] = lambda: packed(x)
        fns["floor_packed"] = prefill_floor(packed, a.T, packed=True)
    repeats = a.repeats if shape == "small" else max(2, a.repeats // 2)
    with torch.no_grad():  # cold: each call after the others (their weights in cache); warm: after itself
        pre = interleaved(fns, repeats=repeats, warmup=1)
        pre_warm = interleaved(fns, repeats=repeats, warmup=0, warm=True)
        out = {"max_abs_logit_err": err, "decode": dec, "prefill": pre, "prefill_warm": pre_warm, "decode_bytes_per_token": decode_bytes(ours)}
        if shape == "small":  # (one 7B block is all "last block": not what a 32-block model saves)
            fns = gen_prefill_fns(off, ours, hf, packed, x)
            out["gen_prefill"] = interleaved(fns, repeats=repeats, warmup=1)
            out["gen_prefill_warm"] = interleaved(fns, repeats=repeats, warmup=0, warm=True)
    del off, ours, hf, packed
    return out


def summarise(shape: str, r: dict, threads: int) -> tuple[dict, list[dict]]:
    """One shape's ratios (against the references, the decode bound and the prefill floor) and its table rows."""
    ours_dec, bound = statistics.median(r["decode"]["ours"]), statistics.median(r["decode"]["bound"])
    res = {
        "decode_bytes_per_token": r["decode_bytes_per_token"], "decode_bound_ms": bound * 1e3,
        "read_bandwidth_GBps": r["decode_bytes_per_token"] / bound / 1e9, "decode_time_over_bound": ours_dec / bound,
        "max_abs_logit_err": r["max_abs_logit_err"],
    }
    for work in ("prefill", "prefill_warm"):
        res[f"{work}_floor_ms"] = statistics.median(r[work]["floor"]) * 1e3
        res[f"{work}_time_over_floor"] = statistics.median(r[work]["ours"]) / statistics.median(r[work]["floor"])
        if "floor_packed" in r[work]:  # the packed path against its own floor; what 2x official leaves beside it
            fp = statistics.median(r[work]["floor_packed"])
            res[f"{work}_packed_floor_ms"] = fp * 1e3
            res[f"{work}_packed_time_over_floor"] = statistics.median(r[work]["ours_packed"]) / fp
            res[f"{work}_half_official_minus_packed_floor_ms"] = (statistics.median(r[work]["official"]) / 2 - fp) * 1e3
    rows = []
    for work in (w for w in WORKS if w in r):
        ts = r[work]
        ours_med = statistics.median(ts["ours"])
        for impl, v in ts.items():
            s = summary(v)
            rows.append({"shape": shape, "threads": threads, "work": work, "impl": impl, "median_ms": s["median_s"] * 1e3,
                         "min_ms": s["min_s"] * 1e3, "spread": s["spread"], "ours_speedup": statistics.median(v) / ours_med})
        res[f"{work}_speedup_vs_official"] = statistics.median(ts["official"]) / ours_med
        res[f"{work}_speedup_vs_transformers"] = statistics.median(ts["transformers"]) / ours_med
        if "official_last" in ts:
            res[f"{work}_speedup_vs_official_last"] = statistics.median(ts["official_last"]) / ours_med
        if "ours_packed" in ts:
            res[f"{work}_packed_speedup_vs_official"] = statistics.median(ts["official"]) / statistics.median(ts["ours_packed"])
            res[f"{work}_packed_speedup_vs_transformers"] = statistics.median(ts["transformers"]) / statistics.median(ts["ours_packed"])
            if "official_last" in ts:
                res[f"{work}_packed_speedup_vs_official_last"] = statistics.median(ts["official_last"]) / statistics.median(ts["ours_packed"])
    return res, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--T", type=int, default=256, help="prefill length")
    p.add_argument("--calls", type=int, default=50, help="decode steps per timing sample (small; /10 at the 7B shape)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each run for every side (0: torch's default)")
    p.add_argument("--skip_7b", action="store_true", help="only the small shape")
    a = p.parse_args()
    thread_counts = [int(t) or torch.get_num_threads() for t in a.threads.split(",")]
    info = print_header("xlstm_large vs official xLSTMLarge and transformers xLSTMForCausalLM (CPU, fp32)", ("xlstm", "mlstm_kernels", "transformers"))
    load = load_average()
    print(f"  load average (1 min) at start: {load}; threads {thread_counts}")
    shapes = ["small"] if a.skip_7b else ["small", "7b_layer"]
    rows, results = [], {}
    for n in thread_counts:
        torch.set_num_threads(n)
        for shape in shapes:
            results[f"{shape}, {n} threads"], shape_rows = summarise(shape, bench_shape(shape, a), n)
            rows += shape_rows
    print_table(rows, ["shape", "threads", "work", "impl", "median_ms", "min_ms", "spread", "ours_speedup"])
    for key, res in results.items():
        print(f"  {key}: decode reads {res['decode_bytes_per_token'] / 1e6:.1f} MB/token; read bandwidth {res['read_bandwidth_GBps']:.2f} GB/s, "
              f"bound {res['decode_bound_ms']:.3f} ms/token; ours at {res['decode_time_over_bound']:.2f}x the bound")
        for work in ("prefill", "prefill_warm"):
            print(f"  {key}: {work} matmul floor {res[f'{work}_floor_ms']:.1f} ms; ours at {res[f'{work}_time_over_floor']:.2f}x the floor; "
                  f"{res[f'{work}_speedup_vs_official']:.2f}x official, {res[f'{work}_speedup_vs_transformers']:.2f}x transformers")
            if f"{work}_packed_speedup_vs_official" in res:
                print(f"  {key}: {work} with packed matrices: {res[f'{work}_packed_speedup_vs_official']:.2f}x official, "
                      f"{res[f'{work}_packed_speedup_vs_transformers']:.2f}x transformers; floor with packed matrices "
                      f"{res[f'{work}_packed_floor_ms']:.1f} ms, ours_packed at {res[f'{work}_packed_time_over_floor']:.2f}x it; "
                      f"2x official leaves {res[f'{work}_half_official_minus_packed_floor_ms']:.2f} ms beside it for everything else")
        for work in ("gen_prefill", "gen_prefill_warm"):
            for label, side in (("ours", ""), ("ours_packed", "packed_")):
                if f"{work}_{side}speedup_vs_official" in res:
                    line = ", ".join(f"{res[f'{work}_{side}speedup_vs_{ref}']:.2f}x {ref}" for ref in ("official", "official_last", "transformers"))
                    print(f"  {key}: {work} (state + next-token logits): {label} {line}")
    load_end = load_average()
    print(f"  load average (1 min) at end: {load_end}")
    emit_json({
        "benchmark": "xlstm_large", "target_speedup": TARGET_SPEEDUP,
        "results": {s: {k: float(f"{v:.4g}") for k, v in r.items()} for s, r in results.items()}, "T": a.T,
        "load_avg": [load, load_end], "threads": thread_counts,
        "machine": {k: info[k] for k in ("processor", "cpu_count", "torch", "xlstm", "mlstm_kernels", "transformers") if k in info},
    })


if __name__ == "__main__":
    main()
