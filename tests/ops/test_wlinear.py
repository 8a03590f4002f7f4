"""The weight-only linear op (``rizzearch.ops.wlinear``): the C kernel against its reference form
for fp32, bf16 and int8 weights over awkward shapes, the quantisation error bounds, the packed-copy
cache following in-place edits, and the fallback to the reference without a compiler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rizzearch.errors import ConfigError
from rizzearch.ops import backends
from rizzearch.ops import wlinear as W
from rizzearch.testing import assert_close

SHAPES = [(1, 768, 64), (1, 17, 5), (3, 100, 37), (8, 64, 1030), (16, 48, 16)]  # (rows, in, out)


def needs_kernel():
    if W.library() is None:
        pytest.skip("no C compiler: the weight-only linear kernel is unavailable")


def data(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.1, torch.randn(N, generator=g)


@pytest.mark.parametrize("fmt", W.FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(fmt, shape):
    needs_kernel()
    x, w, b = data(*shape)
    p = W.pack(w, fmt)
    with torch.no_grad():
        got = W.linear(x, p, b, backend="fast")
        got_nb = W.linear(x, p, None, backend="fast")
    want = W.linear_ref(x, p, b)
    scale = want.abs().max().item()
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[2])
    assert_close(got, want, atol=2e-6 * scale * shape[1] ** 0.5, rtol=1e-5, name=f"{fmt} kernel vs reference")
    assert_close(got_nb, W.linear_ref(x, p), atol=2e-6 * scale * shape[1] ** 0.5, rtol=1e-5, name=f"{fmt} no bias")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_same_on_any_thread_count(threads):
    needs_kernel()
    x, w, b = data(2, 300, 2000)
    p = W.pack(w, "int8")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():
            got = W.linear(x, p, b, backend="fast")
    finally:
        torch.set_num_threads(old)
    assert_close(got, W.linear_ref(x, p, b), atol=1e-4, rtol=1e-5, name=f"{threads} threads")


def test_fp32_kernel_is_the_plain_linear():
    needs_kernel()
    x, w, b = data(4, 257, 129)
    with torch.no_grad():
        got = W.linear(x[:, None], W.pack(w, "fp32"), b, backend="fast")  # (4, 1, K): leading dims kept
    assert got.shape == (4, 1, 129)
    assert_close(got[:, 0], F.linear(x, w, b), atol=1e-5, rtol=1e-5, name="fp32 kernel vs F.linear")


@pytest.mark.parametrize("fmt,bound", [("bf16", 8e-3), ("int8", 2.5e-2)])
def test_quantisation_error_is_bounded(fmt, bound):
    """bf16 keeps 8 bits of mantissa (relative error 2^-9 per weight), int8 7 bits of the row's max."""
    x, w, b = data(4, 512, 256)
    want = F.linear(x, w, b)
    got = W.linear_ref(x, W.pack(w, fmt), b)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < err < bound, err


def test_int8_quantisation_round_trip():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -3.0]])
    q, s = W.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3,)
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 64, -127]
    assert_close(W.dequantize(W.Packed("int8", q, s)), w, atol=3.0 / 254, rtol=0, name="dequantized")


def test_reference_backend_and_autograd_and_many_rows_use_reference():
    x, w, b = data(20, 32, 8)  # 20 rows: more than MAX_ROWS
    p = W.pack(w, "bf16")
    want = W.linear_ref(x, p, b)
    with torch.no_grad():
        assert torch.equal(W.linear(x, p, b), want)
        assert torch.equal(W.linear(x[:3], p, b, backend="reference"), want[:3])
    assert torch.equal(W.linear(x[:3], p, b), want[:3])  # grad mode on: the reference


def test_fallback_without_compiler(monkeypatch):
    """No C compiler: ``available`` is False and ``fast`` computes the reference (never a crash)."""
    monkeypatch.setattr(W, "_LIB", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert not backends.available("wlinear")
    x, w, b = data(1, 64, 32)
    p = W.pack(w, "int8")
    with torch.no_grad():
        assert torch.equal(W.linear(x, p, b, backend="fast"), W.linear_ref(x, p, b))
    monkeypatch.setattr(W, "_LIB", None)  # the next test builds again


def test_bad_format_and_shapes_fail_clearly():
    with pytest.raises(ConfigError, match="unknown weight format 'int4'"):
        W.pack(torch.zeros(2, 2), "int4")
    with pytest.raises(ConfigError, match="2-D weight"):
        W.pack(torch.zeros(2), "bf16")
    with pytest.raises(ConfigError, match="3 features, the weight expects 2"):
        W.linear(torch.zeros(1, 3), W.pack(torch.zeros(4, 2), "fp32"))
    with pytest.raises(ConfigError, match="unknown weight-only linear backend"):
        W.linear(torch.zeros(1, 2), W.pack(torch.zeros(4, 2), "fp32"), backend="turbo")


def test_packed_for_follows_optimizer_steps_forget_and_new_storage():
    lin = torch.nn.Linear(32, 16)
    w = lin.weight
    p1 = W.packed_for(w, "int8")
    assert W.packed_for(w, "int8") is p1  # cached
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    lin(torch.randn(4, 32)).square().sum().backward()
    opt.step()
    p2 = W.packed_for(w, "int8")
    assert p2 is not p1
    with torch.no_grad():
        w.mul_(2.0)  # a snapshot: not seen until forget
    assert W.packed_for(w, "int8") is p2
    W.forget(w)
    p2 = W.packed_for(w, "int8")
    assert_close(W.dequantize(p2), w.detach(), atol=w.abs().max().item() / 127, rtol=0, name="re-packed")
    lin.weight = torch.nn.Parameter(torch.randn(16, 32))  # new storage
    assert_close(W.dequantize(W.packed_for(lin.weight, "int8")), lin.weight.detach(), atol=0.05, rtol=0, name="new")
    same = W.packed_for(lin.weight)  # its own dtype: read in place, no copy
    assert same.fmt == "fp32" and same.data.data_ptr() == lin.weight.data_ptr()
    bf = torch.nn.Linear(8, 4).to(torch.bfloat16).weight
    assert W.packed_for(bf, "bf16").data.data_ptr() == bf.data_ptr()


def test_threads_drop_to_one_on_an_oversubscribed_machine(monkeypatch):
    needs_kernel()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(W.os, "cpu_count", lambda: 2)
    for load, want in ((0.5, 2), (2.9, 2), (3.0, 1), (18.0, 1)):
        monkeypatch.setattr(W, "_load", [-1e9, 0.0])
        monkeypatch.setattr(W.os, "getloadavg", lambda load=load: (load, load, load))
        assert W.threads_for(10**6) == (want if W.library().openmp else 1), load
    assert W.threads_for(10) == 1  # small weights: one thread
