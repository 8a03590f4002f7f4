"""RWKV-4 decoding, both forms beside each other: the eager recurrent step (the reference) and the
fused C kernel (``rizzearch.models.rwkv_decode``); weight changes reach both; the kernel's build
falls back to the eager step without a compiler or without OpenMP."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from rizzearch.models import RWKV, RWKVConfig
from rizzearch.models import rwkv_decode as D
from rizzearch.ops.backends import use_backend
from rizzearch.testing import assert_close

V = 97
BACKENDS = ("fast", "reference")


def tiny(**over) -> RWKV:
    torch.manual_seed(0)
    m = RWKV(RWKVConfig(**{"vocab_size": V, "n_layer": 2, "d_model": 64, **over}))
    with torch.no_grad():  # wake the zero-initialised projections
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def needs_kernel():
    if D.decode_library() is None:
        pytest.skip("no C compiler: the fused decoding kernel is unavailable (eager decoding is used)")


def two_steps(m, tok, state):
    """time_decay only acts on the state update, so it shows in the second step's logits."""
    with torch.no_grad():
        _, st = m.step(tok, state)
        return m.step(tok, st)[0]


def autograd_two_steps(m, tok, state):
    """The same two steps through the training path (the model's forward with autograd on)."""
    with torch.enable_grad():
        _, st = m.step(tok, state)
        return m.step(tok, st)[0].detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_path_matches_autograd_path_and_tracks_updates(backend):
    m = tiny()
    x = torch.randint(0, V, (3, 9))
    _, state = m(x)
    nxt = torch.randint(0, V, (3,))
    with torch.no_grad(), use_backend("rwkv_decode", backend):
        fast, fast_state = m.step(nxt, state)
    with torch.enable_grad():
        slow, slow_state = m.step(nxt, state)
    assert_close(fast, slow, atol=1e-5, rtol=1e-5, name="decode logits")
    for key in state:
        for a, b in zip(fast_state[key], slow_state[key]):
            assert_close(a, b.detach(), atol=1e-5, rtol=1e-5, name=f"decode state {key}")
    with torch.no_grad(), use_backend("rwkv_decode", backend):  # an in-place update must reach decoding
        m.blocks[0].att.value.weight.mul_(1.5)
        m.blocks[1].ffn.time_mix_k.add_(0.1)
        fast2, _ = m.step(nxt, state)
    with torch.enable_grad():
        slow2, _ = m.step(nxt, state)
    assert_close(fast2, slow2.detach(), atol=1e-5, rtol=1e-5, name="decode after update")
    assert not torch.allclose(fast2, fast)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_decode_kernel_matches_eager_decoding(batch, threads):
    """The fused C kernel (default on CPU), on 1, 2 and 3 threads, and the eager recurrent step agree.

    Widths that are not multiples of the kernel's 16-float vectors or of its 4-row blocks, and that
    split unevenly across threads (a thread can get no columns at all: d_model 72 on 3 threads).
    """
    needs_kernel()
    m = tiny(d_model=72, d_att=40, d_ffn=100)
    x = torch.randint(0, V, (batch, 12))
    with torch.no_grad():
        _, state = m(x)
        runs = {}
        for backend in BACKENDS:
            with use_backend("rwkv_decode", backend), D.use_threads(threads if backend == "fast" else None):
                st, outs, tok = state, [], x[:, -1]
                for _ in range(6):
                    logits, st = m.step(tok, st)
                    outs.append(logits)
                    tok = logits.argmax(-1)
            runs[backend] = (torch.stack(outs, 1), st)
    assert D.cached(m) is not None
    assert_close(runs["fast"][0], runs["reference"][0], atol=1e-5, rtol=1e-5, name="fused vs eager logits")
    for key in runs["reference"][1]:
        for a, b in zip(runs["fast"][1][key], runs["reference"][1][key]):
            assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"fused vs eager state {key}")


def test_fused_decode_follows_parameter_changes_and_rejects_bad_tokens():
    """The kernel reads the parameters in place: in-place updates and tied embeddings are seen; a token
    outside the vocabulary raises like nn.Embedding does on the eager path."""
    needs_kernel()
    m = tiny(tie_embeddings=True)
    tok = torch.tensor([3, 5])
    with torch.no_grad():
        state = m.init_state(2)
        with use_backend("rwkv_decode", "fast"), D.use_threads(2):
            before, _ = m.step(tok, state)
            m.blocks[1].att.time_decay.add_(0.5)  # the kernel computes exp(time_decay) itself
            m.emb.weight.mul_(1.1)  # also the tied head
            after, _ = m.step(tok, state)
            with pytest.raises(IndexError, match="outside the vocabulary"):
                m.step(torch.tensor([1, V]), state)
        with use_backend("rwkv_decode", "reference"):
            want, _ = m.step(tok, state)
    assert not torch.allclose(before, after)
    assert_close(after, want, atol=1e-5, rtol=1e-5, name="fused logits after in-place updates")


@pytest.mark.parametrize("backend", BACKENDS)
def test_edits_through_data_are_seen_without_clearing(backend):
    """Neither form keeps a copy of a weight, so ``param.data`` edits (invisible to autograd's version
    counters) reach the next token; ``clear_decode_cache`` stays harmless."""
    m = tiny()
    tok = torch.tensor([3, 5])
    with use_backend("rwkv_decode", backend):
        with torch.no_grad():
            _, state = m(torch.randint(0, V, (2, 6)))
        before = two_steps(m, tok, state)  # builds the kernel's address table
        m.blocks[0].att.time_decay.data.add_(1.0)  # the kernel derives exp(time_decay) from it
        m.blocks[1].att.value.weight.data.mul_(2.0)
        seen = two_steps(m, tok, state)
        m.clear_decode_cache()
        assert D.cached(m) is None
        again = two_steps(m, tok, state)
    want = autograd_two_steps(m, tok, state)
    assert_close(seen, want, atol=1e-5, rtol=1e-5, name="decode after .data edits")
    assert_close(again, want, atol=1e-5, rtol=1e-5, name="decode after clear_decode_cache")
    assert not torch.allclose(seen, before)


def _optimizer_step(m):
    """One documented weight update: grads of a loss, then ``optimizer.step()`` (no_grad inside)."""
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    logits, _ = m(torch.randint(0, V, (2, 5)))
    logits.square().mean().backward()
    opt.step()
    opt.zero_grad()


def _load_other(m, assign):
    other = tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.3)
    m.load_state_dict(other.state_dict(), assign=assign)


def _reassign_head(m):
    m.head.weight = nn.Parameter(m.head.weight.detach() * 0.5)


def _set_storage(m):
    with torch.no_grad():  # ``set_`` moves the parameter to other memory: a new address
        m.blocks[0].att.value.weight.set_(m.blocks[0].att.value.weight.detach().clone() * 1.5)


def _round_trip_dtype(m):
    m.to(torch.float64)
    m.to(torch.float32)  # new storage at every step of the trip: the old addresses are stale
    with torch.no_grad():  # new values at the new addresses (the freed old memory keeps the old ones)
        for p in m.parameters():
            p.mul_(1.2)


@pytest.mark.parametrize("edit", [_optimizer_step, lambda m: _load_other(m, False), lambda m: _load_other(m, True), _reassign_head, _set_storage, _round_trip_dtype],
                         ids=["optimizer_step", "load_state_dict", "load_state_dict_assign", "reassigned_parameter", "set_storage", "to_dtype"])  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_edits_through_the_public_api_reach_decoding(edit, backend):
    m = tiny()
    tok = torch.tensor([3, 5])
    state = m.init_state(2)
    with use_backend("rwkv_decode", backend):
        before = two_steps(m, tok, state)  # the kernel's address table now exists (fast)
        edit(m.train())
        m.eval()
        got = two_steps(m, tok, state)
    want = autograd_two_steps(m, tok, state)
    assert not torch.allclose(before, want, atol=1e-4), "the edit should change the logits"
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="decode after the edit")


def test_float64_model_decodes_eagerly_and_matches():
    """The kernel reads float32 only: a float64 model takes the eager step (same numbers as autograd)."""
    m = tiny().to(torch.float64)
    tok = torch.tensor([3, 5])
    state = m.init_state(2)
    got = two_steps(m, tok, state)
    assert got.dtype == torch.float64 and D.cached(m) is None
    assert_close(got, autograd_two_steps(m, tok, state), atol=1e-10, rtol=1e-10, name="float64 decode")


def test_no_private_torch_attributes_in_decoding():
    """Cache invalidation uses public torch API only (issue 13, item 8)."""
    import inspect

    from rizzearch.models import rwkv

    for mod in (rwkv, D):
        src = inspect.getsource(mod)
        for private in ("._version", "._parameters", "._modules", "._apply"):
            assert private not in src, f"{mod.__name__} uses {private}"


# ----------------------------------------------------------------------------------------------
# The kernel's build: fallbacks


def _decode_with_compiler(monkeypatch, tmp_path, cc: str):
    """Build the kernel afresh with compiler ``cc`` (empty cache), then decode a tiny model both ways."""
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("RIZZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "_LIB", None)
    lib = D.decode_library()
    torch.manual_seed(0)
    m = RWKV(RWKVConfig(vocab_size=50, n_layer=2, d_model=64)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        state, tok = m.init_state(2), torch.tensor([4, 9])
        got, _ = m.step(tok, state)
        with use_backend("rwkv_decode", "reference"):
            want, _ = m.step(tok, state)
    return lib, m, got, want


def test_decoding_falls_back_to_eager_without_a_compiler(monkeypatch, tmp_path):
    lib, m, got, want = _decode_with_compiler(monkeypatch, tmp_path, str(tmp_path / "no-such-cc"))
    assert lib is None and D.cached(m) is None
    assert torch.equal(got, want)


def test_kernel_builds_single_threaded_without_openmp(monkeypatch, tmp_path):
    """A compiler that rejects -fopenmp (e.g. Apple clang) still gives a working one-thread kernel."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *-fopenmp*) echo "unsupported option" >&2; exit 1;; esac\nexec {cc} "$@"\n')
    wrapper.chmod(0o755)
    lib, m, got, want = _decode_with_compiler(monkeypatch, tmp_path, str(wrapper))
    assert lib is not None and not lib.openmp and D.cached(m) is not None
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="single-threaded kernel vs eager")


# ----------------------------------------------------------------------------------------------
# Weight-only bf16 / int8 decoding (``set_decode_weights``)


def _dequantized_copy(m, fmt):
    """The model with every matrix replaced by what the kernel reads in ``fmt``: the reference of the
    low-precision kernel (the eager step on it must give the same numbers)."""
    from rizzearch.ops import wlinear as W

    q = copy.deepcopy(m)
    D.set_decode_weights(q, None)
    with torch.no_grad():
        for mod in q.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(W.dequantize(W.pack(mod.weight, fmt)))
    return q


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_low_precision_kernel_matches_eager_on_rounded_weights(fmt, batch, threads):
    needs_kernel()
    m = tiny(d_model=72, d_att=40, d_ffn=100)
    ref = _dequantized_copy(m, fmt)
    D.set_decode_weights(m, fmt)
    x = torch.randint(0, V, (batch, 10))
    with torch.no_grad():
        _, state = m(x)
        tok = x[:, -1]
        with use_backend("rwkv_decode", "fast"), D.use_threads(threads):
            got, got_st = m.step(tok, state)
        want, want_st = D.eager_step(ref, tok, state, None)
    assert D.cached(m).fmt == fmt
    assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{fmt} kernel vs eager on rounded weights")
    for a, b in zip(got_st["num"], want_st["num"]):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"{fmt} state num")


@pytest.mark.parametrize("fmt,bound", [("bf16", 1e-2), ("int8", 3e-2)])
def test_low_precision_logits_error_against_fp32_is_bounded(fmt, bound):
    """12 greedy tokens: the max logit error relative to the largest fp32 logit (the 169M shape's
    numbers are in docs/rwkv.md)."""
    needs_kernel()
    m = tiny()
    with torch.no_grad():
        st32 = stq = m.init_state(2)
        tok = torch.tensor([3, 7])
        worst = 0.0
        for _ in range(12):
            D.set_decode_weights(m, None)
            l32, st32 = m.step(tok, st32)
            D.set_decode_weights(m, fmt)
            lq, stq = m.step(tok, stq)
            worst = max(worst, ((lq - l32).abs().max() / l32.abs().max()).item())
            tok = l32.argmax(-1)
    assert 0 < worst < bound, worst


def test_low_precision_copies_follow_optimizer_steps_and_clear():
    needs_kernel()
    m = tiny()
    D.set_decode_weights(m, "int8")
    tok = torch.tensor([3])
    with torch.no_grad():
        before, _ = m.step(tok, m.init_state(1))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(torch.randint(0, V, (1, 5)))[0].square().mean().backward()
    opt.step()
    with torch.no_grad():
        after, _ = m.step(tok, m.init_state(1))
        want, _ = D.eager_step(_dequantized_copy(m, "int8"), tok, m.init_state(1), None)
        assert not torch.allclose(before, after)
        assert_close(after, want, atol=1e-5, rtol=1e-5, name="int8 after an optimizer step")
        m.head.weight.mul_(2.0)  # a snapshot: seen after clear_decode_cache
        m.clear_decode_cache()
        got, _ = m.step(tok, m.init_state(1))
        want, _ = D.eager_step(_dequantized_copy(m, "int8"), tok, m.init_state(1), None)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="int8 after clear_decode_cache")


def test_bad_decode_weights_fail_clearly():
    from rizzearch.errors import ConfigError

    m = tiny()
    with pytest.raises(ConfigError, match="decode_weights: unknown weight format 'int4'"):
        D.set_decode_weights(m, "int4")
    m.decode_weights = "fp8"
    with pytest.raises(ConfigError, match="unknown weight format 'fp8'"):
        with torch.no_grad():
            m.step(torch.tensor([1]), m.init_state(1))
