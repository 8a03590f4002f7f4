"""Products against MKL-packed weight copies (``ops/packed_gemm.py``): the same numbers as
``F.linear``, residual accumulation, and copies that follow every change of their weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rizzearch.errors import ConfigError
from rizzearch.ops import packed_gemm
from rizzearch.testing import assert_close

pytestmark = pytest.mark.skipif(not packed_gemm.available(), reason="no MKL packed GEMM in this torch")


@pytest.mark.parametrize("N,K", [(768, 256), (8, 256), (256, 704), (97, 33)])
def test_equals_f_linear(N, K):
    g = torch.Generator().manual_seed(N)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    x = torch.randn(packed_gemm.PACK_ROWS, K, generator=g)
    assert torch.equal(packed_gemm.linear(x, w), F.linear(x, w))  # a full prefill: the same kernels, the same bits
    assert_close(packed_gemm.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-6, name="with bias")
    for M in (1, 5, 100, 300):  # other row counts: other kernels may round differently
        xm = torch.randn(M, K, generator=g)
        assert_close(packed_gemm.linear(xm, w), F.linear(xm, w), atol=1e-4, rtol=1e-5, name=f"{M} rows")
    r = torch.randn(7, N, generator=g)
    want = r + F.linear(x[:7], w, b)
    out = packed_gemm.linear(x[:7], w, b, out=r)
    assert out is r
    assert_close(r, want, atol=1e-4, rtol=1e-5, name="residual accumulation")
    assert packed_gemm.linear(x[:0], w).shape == (0, N)


def test_the_copy_follows_its_weight():
    """In-place edits, load_state_dict and optimizer steps are seen; a ``.data`` edit needs forget()."""
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.no_grad():
        packed_gemm.linear(x, lin.weight)
        lin.weight.mul_(2.0)  # in place (the version counter moves)
        assert_close(packed_gemm.linear(x, lin.weight), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5, name="after mul_")
        lin.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.zeros(8)})
        assert_close(packed_gemm.linear(x, lin.weight), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5, name="after load_state_dict")
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).sum().backward()
    opt.step()
    with torch.no_grad():
        assert_close(packed_gemm.linear(x, lin.weight), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5, name="after a step")
        stale = packed_gemm.linear(x, lin.weight)
        lin.weight.data.zero_()  # not seen: a separate version counter
        assert torch.equal(packed_gemm.linear(x, lin.weight), stale)
        packed_gemm.forget(lin.weight)
        assert torch.equal(packed_gemm.linear(x, lin.weight), torch.zeros(5, 8))


def test_bad_weights_and_no_mkl_are_named(monkeypatch):
    with pytest.raises(ConfigError, match=r"expected a 2-D float32 CPU weight, got \(4, 4\) torch.bfloat16"):
        packed_gemm.packed(torch.zeros(4, 4, dtype=torch.bfloat16))
    monkeypatch.setattr(packed_gemm, "_fns", False)
    assert not packed_gemm.available()
    with pytest.raises(ConfigError, match="need MKL's packed GEMM"):
        packed_gemm.packed(torch.zeros(4, 4))
