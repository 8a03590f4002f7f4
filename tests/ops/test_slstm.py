"""sLSTM: the fast form equals the reference loop (values, final state, every gradient), for a
sequence and for one step; the backend switch and its environment variable."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import ShapeError
from rizzearch.ops import backends
from rizzearch.ops.slstm import slstm_forward, slstm_step
from rizzearch.testing import assert_close

NAMES = ("wx", "R", "b", "h0", "c0", "n0", "m0")


def make_inputs(B, T, NH, DH, *, state=True, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    wx = scale * r(B, T, 4, NH, DH)
    R = 0.5 * r(NH, DH, 4, DH)
    b = r(4, NH, DH)
    s = None
    if state:
        s = (r(B, NH, DH), r(B, NH, DH), r(B, NH, DH).abs() + 0.5, r(B, NH, DH))
    return [t.requires_grad_() for t in (wx, R, b)], (tuple(t.requires_grad_() for t in s) if s else None)


def outputs_and_grads(backend, x, state, seed=3):
    y, fin = slstm_forward(*x, initial_state=state, return_state=True, backend=backend)
    outs = (y, *fin)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)  # final m included
    inputs = list(x) + (list(state) if state else [])
    return outs, torch.autograd.grad(loss, inputs)


SHAPES = [  # (B, T, NH, DH, initial state)
    (2, 7, 3, 5, True),  # odd head dims
    (1, 1, 1, 3, True),  # T = 1, batch 1
    (3, 9, 2, 4, False),  # empty state
    (1, 37, 2, 1, True),  # head dim 1, the house T
]


@pytest.mark.parametrize("B,T,NH,DH,state", SHAPES)
def test_fused_equals_reference_values_states_and_every_gradient(B, T, NH, DH, state):
    x, s0 = make_inputs(B, T, NH, DH, state=state)
    a, ga = outputs_and_grads("fast", x, s0)
    b, gb = outputs_and_grads("reference", x, s0)
    for name, u, w in zip(("y", "h", "c", "n", "m"), a, b):
        assert_close(u, w, atol=1e-10, rtol=1e-8, name=name)
    for name, u, w in zip(NAMES, ga, gb):
        assert_close(u, w, atol=1e-9, rtol=1e-7, name=f"d{name}")


def test_fused_equals_reference_in_fp32():
    x, s0 = make_inputs(2, 20, 2, 8, dtype=torch.float32)
    a, ga = outputs_and_grads("fast", x, s0)
    b, gb = outputs_and_grads("reference", x, s0)
    for name, u, w in zip(("y", "h", "c", "n", "m"), a, b):
        assert_close(u, w, atol=1e-5, rtol=1e-4, name=name)
    for name, u, w in zip(NAMES, ga, gb):
        assert_close(u, w, atol=1e-4, rtol=1e-3, name=f"d{name}")


def test_step_equals_forward_and_state_carries():
    x, s0 = make_inputs(2, 12, 2, 3, dtype=torch.float32)
    wx, R, b = (t.detach() for t in x)
    s0 = tuple(t.detach() for t in s0)
    y, fin = slstm_forward(wx, R, b, initial_state=s0, return_state=True)
    s, ys = s0, []
    for t in range(12):
        h, s = slstm_step(wx[:, t], R, b, s)
        ys.append(h)
    assert_close(torch.stack(ys, 1), y, name="step outputs")
    y1, s1 = slstm_forward(wx[:, :5], R, b, initial_state=s0, return_state=True)
    y2, s2 = slstm_forward(wx[:, 5:], R, b, initial_state=s1, return_state=True)
    assert_close(torch.cat([y1, y2], 1), y, name="outputs over two calls")
    for name, u, w in zip("hcnm", s2, fin):
        assert_close(u, w, name=f"final {name}")


def test_mask_leaves_state_unchanged():
    x, _ = make_inputs(2, 9, 2, 3, state=False, dtype=torch.float32)
    wx, R, b = (t.detach() for t in x)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False  # left padding in row 0
    mask[1, 3:5] = False  # a hole in row 1
    y, s = slstm_forward(wx, R, b, mask=mask, return_state=True)
    for row, keep in enumerate(mask):
        yr, sr = slstm_forward(wx[row : row + 1, keep], R, b, return_state=True)
        assert_close(y[row, keep], yr[0], name=f"row {row} outputs")
        for name, u, w in zip("hcnm", s, sr):
            assert_close(u[row], w[0], name=f"row {row} final {name}")


def test_first_step_normaliser_is_one_and_extreme_gates_are_finite():
    x, _ = make_inputs(1, 30, 2, 4, state=False, dtype=torch.float32, scale=60.0)
    wx, R, b = (t.detach() for t in x)
    for be in backends.NAMES:
        y, (h, c, n, m) = slstm_forward(wx[:, :1], R, b, return_state=True, backend=be)
        assert torch.equal(n, torch.ones_like(n)) and torch.equal(m, (wx[:, 0, 0] + b[0]).float())
        y = slstm_forward(wx, R, b, backend=be)
        assert torch.isfinite(y).all()


def test_half_precision_inputs_keep_fp32_states():
    x, _ = make_inputs(1, 6, 2, 4, state=False, dtype=torch.float32)
    wx, R, b = (t.detach() for t in x)
    y, s = slstm_forward(wx.bfloat16(), R, b, return_state=True)
    assert y.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in s)


def test_bad_input_names_the_tensor():
    x, s0 = make_inputs(2, 5, 2, 3, dtype=torch.float32)
    wx, R, b = (t.detach() for t in x)
    with pytest.raises(ShapeError, match=r"wx: expected shape \(B, T, 4, 2, 3\)"):
        slstm_forward(wx[..., :2], R, b)
    with pytest.raises(ShapeError, match="R: expected shape"):
        slstm_forward(wx, R[:, :, :3], b)
    with pytest.raises(ShapeError, match=r"b: expected shape \(4, 2, 3\)"):
        slstm_forward(wx, R, b[:, :1])
    with pytest.raises(ShapeError, match=r"state c: expected shape \(2, 2, 3\), got \(1, 2, 3\)"):
        slstm_forward(wx, R, b, initial_state=(s0[0], s0[1][:1], s0[2], s0[3]))
    with pytest.raises(ShapeError, match="mask: expected shape"):
        slstm_forward(wx, R, b, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="floating-point"):
        slstm_step(wx[:, 0].long(), R, b)
    with pytest.raises(ValueError, match="unknown sLSTM backend"):
        slstm_forward(wx, R, b, backend="nope")


def test_backend_switch_is_per_op_and_restored():
    old_s, old_m = backends.get_backend("slstm"), backends.get_backend("mlstm")
    with backends.use_backend("slstm", "reference"):
        assert backends.get_backend("slstm") == "reference" and backends.get_backend("mlstm") == old_m
        with pytest.raises(ValueError, match="unknown sLSTM backend 'x'"):
            backends.set_backend("slstm", "x")
        assert backends.get_backend("slstm") == "reference"  # a bad name changes nothing
    assert backends.get_backend("slstm") == old_s
    backends.set_backend("slstm", "reference")
    try:
        assert backends.get_backend("slstm") == "reference"
    finally:
        backends.set_backend("slstm", old_s)


@pytest.mark.parametrize("var,op", [("RIZZ_SLSTM_BACKEND", "slstm"), ("RIZZ_MLSTM_BACKEND", "mlstm")])
def test_backend_from_the_environment(var, op):
    import os
    import subprocess
    import sys

    code = f"from rizzearch.ops import backends; print(backends.get_backend({op!r}))"
    env = {**os.environ, var: "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env[var] = "warp-speed"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown" in bad.stderr and "'warp-speed'" in bad.stderr


@pytest.mark.parametrize("with_state", [True, False])
def test_step_forms_agree_values_states_and_every_gradient(with_state):
    """``slstm_step(backend=...)`` runs the form it names; both equal one step of ``slstm_forward``."""
    x, s0 = make_inputs(3, 1, 2, 5, state=with_state)
    wx, R, b = x
    results = {}
    for be in backends.NAMES:
        h, st = slstm_step(wx[:, 0], R, b, s0, backend=be)
        g = torch.Generator().manual_seed(5)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (h, *st[:3]))
        results[be] = ((h, *st), torch.autograd.grad(loss, [*x, *(s0 or ())]))
    (ref, gref), (fast, gfast) = results["reference"], results["fast"]
    want_y, want_state = slstm_forward(wx, R, b, initial_state=s0, return_state=True, backend="reference")
    assert_close(ref[0], want_y[:, 0], atol=1e-12, rtol=1e-12, name="reference step h vs forward")
    for name, a, w in zip("hcnm", fast[1:], want_state):
        assert_close(a, w, atol=1e-12, rtol=1e-12, name=f"fast step {name} vs forward")
    for name, a, w in zip(("wx", "R", "b", "h0", "c0", "n0", "m0"), gfast, gref):
        assert_close(a, w, atol=1e-12, rtol=1e-10, name=f"fast step grad {name}")


def test_step_honours_its_backend_argument(monkeypatch):
    """The named form runs: each backend calls its own step function and only that one."""
    import rizzearch.ops.slstm as S

    calls = []
    for name in ("_step_reference", "_step_fast"):
        real = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x, s0 = make_inputs(2, 1, 2, 3)
    wx, R, b = (t.detach() for t in x)
    for be, want in (("reference", "_step_reference"), ("fast", "_step_fast")):
        calls.clear()
        slstm_step(wx[:, 0], R, b, backend=be)
        assert calls == [want]
        with backends.use_backend("slstm", be):
            calls.clear()
            slstm_step(wx[:, 0], R, b)
            assert calls == [want]
    with pytest.raises(ValueError, match="unknown sLSTM backend 'nope'"):
        slstm_step(wx[:, 0], R, b, backend="nope")
