"""WKV (RWKV-4 eq. 14): reference loop vs the fast chunked form, and both vs the equation itself."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.ops.backends import use_backend
from rizzearch.ops.wkv import init_wkv_state, linear_scan, wkv, wkv_chunked, wkv_ref
from rizzearch.testing import assert_close


def make_inputs(B, T, C, k_scale=1.0, with_state=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    td = (torch.randn(C, generator=g) * 1.5).requires_grad_()
    tf = torch.randn(C, generator=g).requires_grad_()
    k = (torch.randn(B, T, C, generator=g) * k_scale).to(dtype).requires_grad_()
    v = torch.randn(B, T, C, generator=g).to(dtype).requires_grad_()
    state = None
    if with_state:
        state = (
            torch.randn(B, C, generator=g).requires_grad_(),
            (torch.rand(B, C, generator=g) + 0.1).requires_grad_(),
            (torch.randn(B, C, generator=g) * k_scale).requires_grad_(),
        )
    return td, tf, k, v, state


def run_with_grads(fn, td, tf, k, v, state, mask=None):
    """Outputs, final state and the gradients of a loss touching all of them, for every input."""
    out, (a, b, p) = fn(td, tf, k, v, state, mask)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g)
    w_a, w_b, w_p = (torch.randn(a.shape, generator=g) for _ in range(3))
    loss = (out.float() * w_out).sum() + (a * w_a).sum() + (b * w_b).sum() + (p * w_p).sum()
    inputs = [td, tf, k, v] + (list(state) if state is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return out, (a, b, p), grads


GRID = [
    # B, T, C, k_scale, with_state, masked
    (1, 1, 3, 1.0, True, False),  # T = 1, batch 1, odd C
    (2, 2, 5, 1.0, True, False),
    (3, 37, 7, 1.0, False, False),  # T not a multiple of the chunk
    (1, 64, 1, 1.0, True, False),  # one channel, T a perfect square
    (2, 37, 5, 1.0, True, True),  # random padding with an incoming state
    (2, 23, 4, 1.0, False, True),  # padding from the empty state (leading pads)
    (2, 300, 9, 40.0, True, False),  # long T, large |k|: exercises the max-exponent stabilizer
    (2, 300, 9, 40.0, False, True),
]

# With |k| ~ 40 the max exponent p reaches ~100, where one float32 ulp is ~8e-6; the loop's own
# state then drifts ~1e-3 (relative) from a float64 run over 300 steps (measured: 9.2e-4 for both
# forms), so states are compared at that precision there. Outputs stay within 6e-5 of float64.
def state_rtol(k_scale):
    return 3e-3 if k_scale > 1 else 1e-4



@pytest.mark.parametrize("B,T,C,k_scale,with_state,masked", GRID)
def test_fast_form_matches_reference(B, T, C, k_scale, with_state, masked):
    td, tf, k, v, state = make_inputs(B, T, C, k_scale, with_state)
    mask = None
    if masked:
        mask = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[:, :3] = False  # always some leading padding
    ref_out, ref_state, ref_grads = run_with_grads(wkv_ref, td, tf, k, v, state, mask)
    out, st, grads = run_with_grads(wkv_chunked, td, tf, k, v, state, mask)
    assert torch.isfinite(out).all()
    assert_close(out, ref_out, atol=2e-5, rtol=1e-4, name="out")
    for name, x, y in zip(("numerator", "denominator", "max exponent"), st, ref_state):
        assert x.dtype == torch.float32
        assert_close(x, y, atol=1e-4, rtol=state_rtol(k_scale), name=f"final {name}")
    names = ["time_decay", "time_first", "k", "v", "state numerator", "state denominator", "state max"]
    for name, x, y in zip(names, grads, ref_grads):
        assert torch.isfinite(x).all(), f"grad {name} not finite"
        scale = max(1.0, y.abs().max().item())
        assert_close(x, y, atol=1e-4 * scale, rtol=max(1e-3, state_rtol(k_scale)), name=f"grad {name}")


def test_reference_matches_equation_14():
    """The stabilised loop equals the paper's closed form, evaluated directly in float64."""
    B, T, C = 2, 9, 3
    td, tf, k, v, _ = make_inputs(B, T, C, with_state=False)
    out, _ = wkv_ref(td, tf, k, v)
    w, u = td.double().exp(), tf.double()
    kd, vd = k.double(), v.double()
    want = torch.empty(B, T, C, dtype=torch.float64)
    for t in range(T):
        num = torch.exp(u + kd[:, t]) * vd[:, t]
        den = torch.exp(u + kd[:, t])
        for i in range(t):
            e = torch.exp(-(t - 1 - i) * w + kd[:, i])
            num, den = num + e * vd[:, i], den + e
        want[:, t] = num / den
    assert_close(out.double(), want, atol=1e-5, rtol=1e-5, name="wkv vs eq. 14")


@pytest.mark.parametrize("form", ["reference", "fast"])
def test_split_sequence_equals_whole(form):
    """Running two halves with the state in between equals one call (the RNN form)."""
    td, tf, k, v, _ = make_inputs(2, 29, 6, with_state=False)
    with torch.no_grad():
        whole, st_whole = wkv(td, tf, k, v, backend=form)
        first, st = wkv(td, tf, k[:, :11], v[:, :11], backend=form)
        second, st = wkv(td, tf, k[:, 11:], v[:, 11:], st, backend=form)
    assert_close(torch.cat([first, second], 1), whole, name="split outputs")
    for x, y in zip(st, st_whole):
        assert_close(x, y, atol=1e-5, rtol=1e-5, name="split final state")


def test_padding_leaves_state_unchanged():
    td, tf, k, v, state = make_inputs(2, 12, 4)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 4:7] = False
    mask[1, -3:] = False
    with torch.no_grad():
        _, st = wkv(td, tf, k, v, state, mask)
        keep = mask[0]
        _, st0 = wkv(td, tf, k[:1, keep], v[:1, keep], tuple(s[:1] for s in state))
        _, st1 = wkv(td, tf, k[1:, :-3], v[1:, :-3], tuple(s[1:] for s in state))
    for x, y0, y1 in zip(st, st0, st1):
        assert_close(x, torch.cat([y0, y1]), atol=1e-5, rtol=1e-5, name="state after padding")


def test_low_precision_inputs_keep_fp32_state():
    td, tf, k, v, _ = make_inputs(2, 17, 8, dtype=torch.bfloat16, with_state=False)
    with torch.no_grad():
        out, st = wkv(td, tf, k, v)
        ref, _ = wkv_ref(td, tf, k.float(), v.float())
    assert out.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in st)
    assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, name="bf16 wkv")


def test_empty_sequence_returns_the_state():
    td, tf, k, v, state = make_inputs(2, 0, 3)
    for form in ("reference", "fast"):
        out, st = wkv(td, tf, k, v, state, backend=form)
        assert out.shape == (2, 0, 3)
        for x, y in zip(st, state):
            assert torch.equal(x, y)


def test_init_state_is_the_empty_prefix():
    td, tf, k, v, _ = make_inputs(3, 5, 4, with_state=False)
    with torch.no_grad():
        a, _ = wkv(td, tf, k, v)
        b, _ = wkv(td, tf, k, v, init_wkv_state(3, 4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("T,chunk", [(1, None), (7, 3), (16, 4), (50, 7), (50, 64)])
def test_linear_scan_matches_loop(T, chunk):
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2, T, 3, generator=g)
    x = torch.randn(2, T, 3, generator=g)
    h0 = torch.randn(2, 3, generator=g)
    h, want = h0, []
    for t in range(T):
        h = f[:, t] * h + x[:, t]
        want.append(h)
    assert_close(linear_scan(f, x, h0, chunk), torch.stack(want, 1), name="linear scan")


def test_form_override_and_bad_form():
    td, tf, k, v, _ = make_inputs(1, 6, 2, with_state=False)
    with torch.no_grad(), use_backend("wkv", "reference"):
        a, _ = wkv(td, tf, k, v)
    with torch.no_grad(), use_backend("wkv", "fast"):
        b, _ = wkv(td, tf, k, v)
    assert_close(a, b, name="forms")
    with pytest.raises(ConfigError, match="expected one of"):
        wkv(td, tf, k, v, backend="cuda-kernel")


def test_bad_input_names_expected_and_found():
    td, tf, k, v, state = make_inputs(2, 5, 4)
    with pytest.raises(ShapeError, match=r"k must have shape \(B, T, C\)"):
        wkv(td, tf, k[0], v)
    with pytest.raises(ShapeError, match=r"v must have the shape of k \(2, 5, 4\), got \(2, 5, 3\)"):
        wkv(td, tf, k, v[..., :3])
    with pytest.raises(ShapeError, match=r"time_decay must have shape \(4,\).*got \(5,\)"):
        wkv(torch.zeros(5), tf, k, v)
    with pytest.raises(ShapeError, match=r"state numerator must have shape \(2, 4\), got \(3, 4\)"):
        wkv(td, tf, k, v, (torch.zeros(3, 4),) * 3)
    with pytest.raises(ShapeError, match="tuple"):
        wkv(td, tf, k, v, state[:2])
    with pytest.raises(ShapeError, match=r"mask must have shape \(2, 5\)"):
        wkv(td, tf, k, v, mask=torch.ones(2, 4, dtype=torch.bool))


def test_forms_agree_in_float64_with_large_k():
    """In float64 the float32 drift disappears: the two forms agree to ~1e-9 even for |k| ~ 40."""
    td, tf, k, v, state = make_inputs(2, 120, 5, k_scale=40.0, dtype=torch.float64)
    td, tf = td.detach().double().requires_grad_(), tf.detach().double().requires_grad_()
    state = tuple(s.detach().double().requires_grad_() for s in state)
    ref_out, ref_state, ref_grads = run_with_grads(wkv_ref, td, tf, k, v, state)
    out, st, grads = run_with_grads(wkv_chunked, td, tf, k, v, state)
    assert out.dtype == torch.float64
    assert_close(out, ref_out, atol=1e-9, rtol=1e-9, name="out (fp64)")
    for x, y in zip(st, ref_state):
        assert_close(x, y, atol=1e-9, rtol=1e-9, name="state (fp64)")
    for x, y in zip(grads, ref_grads):
        assert_close(x, y, atol=1e-8 * max(1.0, y.abs().max().item()), rtol=1e-8, name="grad (fp64)")


@pytest.mark.parametrize("chunk", [None, 2, 5])
def test_linear_scan_gradients(chunk):
    """The hand-written backward (a reversed scan) against autograd's numerical gradient."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2, 7, 1, 3, generator=g, dtype=torch.float64).requires_grad_()  # broadcast over dim 2
    x = torch.randn(2, 7, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, x, h0: linear_scan(f, x, h0, chunk), (f, x, h0))


@pytest.mark.gpu
def test_cuda_matches_cpu_reference():
    td, tf, k, v, state = make_inputs(2, 77, 9, k_scale=5.0)
    ref_out, ref_state, ref_grads = run_with_grads(wkv_ref, td, tf, k, v, state)
    on_gpu = [t.detach().cuda().requires_grad_() for t in (td, tf, k, v, *state)]
    out, st, grads = run_with_grads(wkv, *on_gpu[:4], tuple(on_gpu[4:]))
    assert_close(out.cpu(), ref_out, atol=2e-5, rtol=1e-4, name="cuda out")
    for x, y in zip(st, ref_state):
        assert_close(x.cpu(), y, atol=1e-4, rtol=1e-4, name="cuda state")
    for x, y in zip(grads, ref_grads):
        assert_close(x.cpu(), y, atol=1e-4 * max(1.0, y.abs().max().item()), rtol=1e-3, name="cuda grad")
