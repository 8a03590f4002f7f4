"""mLSTM: the parallel, chunkwise (reference and fast) and step forms agree, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rizzearch.errors import ShapeError
from rizzearch.ops import backends
from rizzearch.ops import mlstm as M
from rizzearch.ops.mlstm import mlstm_chunkwise, mlstm_parallel, mlstm_step
from rizzearch.testing import assert_close

NAMES = ("q", "k", "v", "i", "f", "C0", "n0", "m0")


def make_inputs(B, NH, T, Dqk, Dv, *, state=True, dtype=torch.float64, gate_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = [r(B, NH, T, Dqk), r(B, NH, T, Dqk), r(B, NH, T, Dv), gate_scale * r(B, NH, T), gate_scale * r(B, NH, T) + 1.0]
    s = (r(B, NH, Dqk, Dv), r(B, NH, Dqk), r(B, NH)) if state else None
    return [t.requires_grad_() for t in x], (tuple(t.requires_grad_() for t in s) if s else None)


def run_form(form, x, state, chunk):
    """Returns h and the final (C, n, m) of one form."""
    if form == "parallel":
        return mlstm_parallel(*x, initial_state=state, return_state=True)
    if form in ("chunk_ref", "chunk_fused"):
        be = "reference" if form == "chunk_ref" else "fast"
        return mlstm_chunkwise(*x, initial_state=state, return_state=True, chunk_size=chunk, backend=be)
    be = "reference" if form == "step_ref" else "fast"
    s, hs = state, []
    for t in range(x[0].shape[2]):
        h, s = mlstm_step(*(a[:, :, t] for a in x), s, backend=be)
        hs.append(h)
    return torch.stack(hs, 2), s


def outputs_and_grads(form, x, state, chunk, seed=7):
    h, fin = run_form(form, x, state, chunk)
    outs = (h, *fin)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)  # final m included
    inputs = list(x) + (list(state) if state else [])
    return outs, torch.autograd.grad(loss, inputs)


FORMS = ("chunk_ref", "chunk_fused", "step_ref", "step_fused")
SHAPES = [  # (B, NH, T, Dqk, Dv, chunk, with initial state)
    (2, 3, 13, 5, 7, 4, True),  # T not a multiple of the chunk, odd head dims, Dqk != Dv
    (1, 1, 1, 3, 2, 4, True),  # T = 1, batch 1
    (2, 2, 16, 4, 4, 4, False),  # T a multiple of the chunk, empty state
    (1, 2, 37, 6, 3, 8, True),  # the house T
    (3, 1, 9, 1, 1, 64, False),  # chunk longer than T, head dim 1
]


@pytest.mark.parametrize("B,NH,T,Dqk,Dv,chunk,state", SHAPES)
def test_all_forms_agree_values_states_and_every_gradient(B, NH, T, Dqk, Dv, chunk, state):
    x, s0 = make_inputs(B, NH, T, Dqk, Dv, state=state)
    ref_out, ref_grad = outputs_and_grads("parallel", x, s0, chunk)
    for form in FORMS:
        out, grad = outputs_and_grads(form, x, s0, chunk)
        for name, a, b in zip(("h", "C", "n", "m"), out, ref_out):
            assert_close(a, b, atol=1e-10, rtol=1e-8, name=f"{form} {name}")
        for name, a, b in zip(NAMES, grad, ref_grad):
            assert_close(a, b, atol=1e-9, rtol=1e-7, name=f"{form} d{name}")


@pytest.mark.parametrize("used", ["h", "C", "n", "m", "hm", "hCn"])
@pytest.mark.parametrize("state,T,chunk", [(True, 13, 4), (False, 13, 4), (False, 3, 4), (True, 3, 8)])
def test_fused_gradients_when_only_some_outputs_are_used(used, state, T, chunk):
    """The fused backward skips the terms of outputs that carry no gradient: check every subset path."""
    x, s0 = make_inputs(2, 2, T, 3, 4, state=state, seed=3)
    inputs = list(x) + (list(s0) if s0 else [])
    grads = []
    for be in ("reference", "fast"):
        h, (C, n, m) = mlstm_chunkwise(*x, initial_state=s0, return_state=True, chunk_size=chunk, backend=be)
        outs = {"h": h, "C": C, "n": n, "m": m}
        g = torch.Generator().manual_seed(11)
        loss = sum((outs[o] * torch.randn(outs[o].shape, generator=g, dtype=outs[o].dtype)).sum() for o in used)
        grads.append(torch.autograd.grad(loss, inputs, allow_unused=True))
    for name, a, b in zip(NAMES, *grads):
        if b is None or a is None:  # unused by both forms (e.g. q when only C is in the loss)
            assert a is None or not a.any(), f"d{name}: fused has a gradient where the reference has none"
            assert b is None or not b.any(), f"d{name}: reference has a gradient where fused has none"
            continue
        assert_close(a, b, atol=1e-9, rtol=1e-7, name=f"d{name} (loss on {used})")


def test_fused_without_state_matches_with_state():
    """return_state=False takes a shorter path (no final state): same h and gradients."""
    x, _ = make_inputs(2, 2, 21, 4, 4, state=False, seed=5)
    gh = torch.randn(2, 2, 21, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h1 = mlstm_chunkwise(*x, chunk_size=8, backend="fast")
    g1 = torch.autograd.grad(h1, x, gh)
    h2, _ = mlstm_chunkwise(*x, chunk_size=8, backend="fast", return_state=True)
    g2 = torch.autograd.grad(h2, x, gh)
    assert_close(h1, h2, atol=0, rtol=0, name="h")
    for name, a, b in zip(NAMES, g1, g2):
        assert_close(a, b, atol=1e-12, rtol=1e-10, name=f"d{name}")


def test_fused_chunkwise_matches_reference_in_fp32():
    x, s0 = make_inputs(2, 2, 45, 8, 8, dtype=torch.float32)
    a, ga = outputs_and_grads("chunk_fused", x, s0, 16)
    b, gb = outputs_and_grads("chunk_ref", x, s0, 16)
    for name, u, w in zip(("h", "C", "n", "m"), a, b):
        assert u.dtype == torch.float32
        assert_close(u, w, atol=1e-4, rtol=1e-4, name=name)
    for name, u, w in zip(NAMES, ga, gb):
        assert_close(u, w, atol=1e-3, rtol=1e-3, name=f"d{name}")


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 40), chunk=st.integers(1, 17), D=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_chunkwise_equals_parallel_for_any_length_and_chunk(T, chunk, D, seed):
    x, s0 = make_inputs(1, 2, T, D, D + 1, seed=seed)
    with torch.no_grad():
        h, (C, n, m) = mlstm_chunkwise(*x, initial_state=s0, return_state=True, chunk_size=chunk, backend="fast")
        hp, (Cp, n_p, mp) = mlstm_parallel(*x, initial_state=s0, return_state=True)
    assert_close(h, hp, atol=1e-9, rtol=1e-7, name="h")
    assert_close(C, Cp, atol=1e-9, rtol=1e-7, name="C")
    assert_close(m, mp, atol=1e-9, rtol=1e-7, name="m")


@pytest.mark.parametrize("backend", backends.NAMES)
def test_state_carries_across_calls(backend):
    x, _ = make_inputs(2, 2, 30, 4, 4, state=False, dtype=torch.float32)
    with torch.no_grad():
        full, sf = mlstm_chunkwise(*x, return_state=True, chunk_size=8, backend=backend)
        a, s = mlstm_chunkwise(*(t[:, :, :11] for t in x), return_state=True, chunk_size=8, backend=backend)
        b, s = mlstm_chunkwise(*(t[:, :, 11:] for t in x), initial_state=s, return_state=True, chunk_size=8, backend=backend)
    assert_close(torch.cat([a, b], 2), full, name="h split in two calls")
    for name, u, w in zip("Cnm", s, sf):
        assert_close(u, w, name=f"final {name}")


def test_empty_state_equals_none():
    x, _ = make_inputs(2, 2, 7, 3, 3, state=False)
    empty = M.empty_state(2, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        for be in backends.NAMES:
            a = mlstm_chunkwise(*x, chunk_size=4, backend=be)
            b = mlstm_chunkwise(*x, initial_state=empty, chunk_size=4, backend=be)
            assert torch.equal(a, b)


def test_half_precision_inputs_keep_fp32_states():
    x, _ = make_inputs(1, 2, 20, 8, 8, state=False, dtype=torch.float32)
    xb = [t.detach().bfloat16() for t in x]
    for be in backends.NAMES:
        h, (C, n, m) = mlstm_chunkwise(*xb, return_state=True, chunk_size=8, backend=be)
        assert h.dtype == torch.bfloat16 and C.dtype == n.dtype == m.dtype == torch.float32
        ref = mlstm_parallel(*(t.float() for t in xb))
        assert_close(h.float(), ref, atol=2e-2, rtol=2e-2, name=f"{be} bf16 h")
    h1, s1 = mlstm_step(*(t[:, :, 0] for t in xb))
    assert h1.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in s1)


def test_stabilisation_survives_extreme_gates():
    """Gate pre-activations of +-80 overflow exp() in fp32 without the stabiliser."""
    x, _ = make_inputs(1, 2, 40, 4, 4, state=False, dtype=torch.float64, gate_scale=80.0)
    ref = mlstm_parallel(*x)
    x32 = [t.detach().float() for t in x]
    for be in backends.NAMES:
        h = mlstm_chunkwise(*x32, chunk_size=16, backend=be)
        assert torch.isfinite(h).all()
        assert_close(h, ref, atol=1e-4, rtol=1e-3, name=f"{be} h with extreme gates")


def test_closed_input_gate_leaves_state_unchanged():
    """What the model does for padding: i = -1e4, f = +1e4 carries the state exactly."""
    x, s0 = make_inputs(1, 2, 5, 3, 3, dtype=torch.float32)
    i = torch.full((1, 2, 5), -1e4)
    f = torch.full((1, 2, 5), 1e4)
    with torch.no_grad():
        for be in backends.NAMES:
            _, (C, n, m) = mlstm_chunkwise(x[0], x[1], x[2], i, f, initial_state=s0, return_state=True, backend=be)
            assert torch.equal(C, s0[0]) and torch.equal(n, s0[1]) and torch.equal(m, s0[2])


def test_matches_a_plain_unstabilised_recurrence():
    """Independent check of the maths: C_t = f C + i k v^T, h = C^T q / max(|n.q|, 1) in float64."""
    B, NH, T, D = 1, 1, 6, 3
    x, _ = make_inputs(B, NH, T, D, D, state=False, gate_scale=1.0)
    q, k, v, i, f = (t.detach()[0, 0] for t in x)
    C, n, hs = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), []
    for t in range(T):
        kt = k[t] / math.sqrt(D)
        C = torch.sigmoid(f[t]) * C + torch.exp(i[t]) * torch.outer(kt, v[t])
        n = torch.sigmoid(f[t]) * n + torch.exp(i[t]) * kt
        hs.append(C.T @ q[t] / torch.clamp((n @ q[t]).abs(), min=1.0))
    assert_close(mlstm_parallel(*x)[0, 0], torch.stack(hs), atol=1e-12, rtol=1e-10, name="h vs plain recurrence")


def test_bad_input_names_the_tensor():
    x, s0 = make_inputs(2, 2, 5, 4, 3, state=True, dtype=torch.float32)
    q, k, v, i, f = (t.detach() for t in x)
    with pytest.raises(ShapeError, match="k: expected shape"):
        mlstm_chunkwise(q, k[..., :3], v, i, f)  # mismatched head sizes
    with pytest.raises(ShapeError, match=r"v: expected shape \(2, 2, 5, Dv\)"):
        mlstm_parallel(q, k, v[:, :, :4], i, f)
    with pytest.raises(ShapeError, match="i .*expected shape"):
        mlstm_chunkwise(q, k, v, i[..., :4], f)
    with pytest.raises(ShapeError, match="q: expected shape"):
        mlstm_chunkwise(q[0], k[0], v[0], i[0], f[0])
    with pytest.raises(ShapeError, match="floating-point"):
        mlstm_parallel(q.long(), k, v, i, f)
    bad_state = (s0[0].detach()[:, :, :, :2], s0[1].detach(), s0[2].detach())  # state of another config
    with pytest.raises(ShapeError, match=r"state C: expected shape \(2, 2, 4, 3\), got \(2, 2, 4, 2\)"):
        mlstm_chunkwise(q, k, v, i, f, initial_state=bad_state)
    with pytest.raises(ShapeError, match="state n"):
        mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], (s0[0].detach(), s0[1].detach()[:1], s0[2].detach()))
    with pytest.raises(ShapeError, match="chunk_size"):
        mlstm_chunkwise(q, k, v, i, f, chunk_size=0)


def test_backend_override():
    x, _ = make_inputs(1, 1, 4, 2, 2, state=False)
    old = backends.get_backend("mlstm")
    with backends.use_backend("mlstm", "reference"):
        assert backends.get_backend("mlstm") == "reference"
        mlstm_chunkwise(*x)
    assert backends.get_backend("mlstm") == old
    with pytest.raises(ValueError, match="unknown mLSTM backend"):
        mlstm_chunkwise(*x, backend="cuda-magic")
    assert backends.get_backend("mlstm") in backends.NAMES


def test_native_decode_step_matches_reference():
    """The C step kernel (used when nothing needs a gradient, float32 on CPU) equals the spec."""
    if M._native_step_lib() is None:
        pytest.skip("no C compiler: the torch step is used instead")
    x, s0 = make_inputs(3, 2, 6, 5, 7, dtype=torch.float32)
    x = [t.detach() for t in x]
    for state in (None, tuple(t.detach() for t in s0)):
        s_ref = s_nat = state
        for t in range(6):
            step = [a[:, :, t] for a in x]
            h_ref, s_ref = mlstm_step(*step, s_ref, backend="reference")
            with torch.no_grad():
                h_nat, s_nat = M._mlstm_step_native(*step, s_nat if s_nat is not None else M.empty_state(3, 2, 5, 7))
            assert_close(h_nat, h_ref, name=f"native h at t={t}")
            for name, u, w in zip("Cnm", s_nat, s_ref):
                assert_close(u, w, name=f"native {name} at t={t}")
    with torch.no_grad():  # the public entry point takes the native path here
        h, _ = mlstm_step(*(a[:, :, 0] for a in x), backend="fast")
    assert_close(h, mlstm_step(*(a[:, :, 0] for a in x), backend="reference")[0], name="mlstm_step h")
