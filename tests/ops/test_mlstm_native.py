"""The xLSTM-7B layer's C kernels (``ops/mlstm/native.py``, ``csrc/mlstm_step.c``) against their
torch forms in float64: the whole mLSTM layer for any T (the chunkwise C form in chunks of 16, the
fp32 step at T = 1) with a state in and out, padding masks, biases and caps on and off, odd head
sizes; RMSNorm, SwiGLU and the logit cap with the C file's vectorised exp and tanh."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rizzearch.models.xlstm_large import head_layer_norm, soft_cap
from rizzearch.ops.mlstm import mlstm_chunkwise
from rizzearch.ops.mlstm import native as nat
from rizzearch.testing import assert_close

pytestmark = pytest.mark.skipif(nat.decode_lib() is None, reason="no C compiler")


def reference_layer(proj, gates, state, w, b, dims, cap, eps, T, mask):
    """The model's torch path in float64: capped gates, padding, ``mlstm_chunkwise`` (chunks of 7,
    not the kernel's 16), per-head LayerNorm, output gate."""
    NH, Dqk, Dv = dims
    B = proj.shape[0] // T
    q, k, v, o = proj.double().view(B, T, -1).split([NH * Dqk, NH * Dqk, NH * Dv, NH * Dv], -1)
    ig, fg = soft_cap(gates.double().view(B, T, -1), cap).split([NH, NH], -1)
    if mask is not None:
        ig = ig.masked_fill(~mask[..., None], nat.PAD_IGATE)
        fg = fg.masked_fill(~mask[..., None], nat.PAD_FGATE)
    heads = lambda t, D: t.reshape(B, T, NH, D).transpose(1, 2)  # noqa: E731
    init = tuple(state[key].double() for key in ("C", "n", "m"))
    h, (C, n, m) = mlstm_chunkwise(
        heads(q, Dqk), heads(k, Dqk), heads(v, Dv), ig.transpose(1, 2), fg.transpose(1, 2),
        initial_state=init, return_state=True, chunk_size=7,
    )
    h = head_layer_norm(h.transpose(1, 2), w.double(), None if b is None else b.double(), eps)
    return (torch.sigmoid(o) * h).reshape(B * T, NH * Dv), {"C": C, "n": n, "m": m}


def inputs(B, T, NH, Dqk, Dv, *, bias, empty, gate_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B * T, NH * (2 * Dqk + 2 * Dv), generator=g)
    gates = gate_scale * torch.randn(B * T, 2 * NH, generator=g)
    if empty:
        state = {"C": torch.zeros(B, NH, Dqk, Dv), "n": torch.zeros(B, NH, Dqk), "m": torch.full((B, NH), float("-inf"))}
    else:
        state = {"C": torch.randn(B, NH, Dqk, Dv, generator=g), "n": torch.randn(B, NH, Dqk, generator=g), "m": torch.randn(B, NH, generator=g)}
    w = 1.0 + 0.3 * torch.randn(NH * Dv, generator=g)
    b = 0.1 * torch.randn(NH * Dv, generator=g) if bias else None
    return proj, gates, state, w, b


CASES = [  # (B, T, NH, Dqk, Dv, bias, empty state, gate cap, padded)
    (2, 1, 3, 5, 7, False, False, 15.0, False),  # decoding: the fp32 step
    (2, 1, 2, 16, 32, True, True, None, True),
    (2, 37, 3, 5, 7, False, True, 15.0, False),  # heads not a multiple of 16 wide, 3 chunks
    (1, 16, 2, 16, 32, True, False, 15.0, False),  # exactly one chunk
    (2, 33, 2, 20, 24, True, False, None, True),  # padding in a chunk's middle and at the left
    (1, 50, 1, 32, 64, False, True, 15.0, False),  # the small benchmark's head shape
    (3, 2, 4, 8, 16, True, False, 15.0, True),
]


@pytest.mark.parametrize("B,T,NH,Dqk,Dv,bias,empty,cap,padded", CASES)
def test_mlstm_layer_equals_the_torch_layer(B, T, NH, Dqk, Dv, bias, empty, cap, padded):
    proj, gates, state, w, b = inputs(B, T, NH, Dqk, Dv, bias=bias, empty=empty)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, : T // 2] = False  # left padding
        mask[-1, T // 3 : T // 3 + 2] = False  # a gap
    before = {k: t.clone() for k, t in state.items()}
    out, st = nat.mlstm_layer(proj, gates, state, w, b, (NH, Dqk, Dv), cap, 1e-6, T, mask)
    want, ws = reference_layer(proj, gates, state, w, b, (NH, Dqk, Dv), cap, 1e-6, T, mask)
    assert out.shape == (B * T, NH * Dv) and out.dtype == torch.float32
    assert_close(out, want, atol=2e-5, rtol=2e-5, name="layer output")
    for key in ("C", "n", "m"):
        assert st[key].dtype == torch.float32 and st[key].shape == state[key].shape
        assert_close(st[key], ws[key], atol=2e-5, rtol=2e-5, name=f"state {key}")
    for key, t in before.items():
        assert torch.equal(state[key], t), f"the input state {key} was modified"


def test_mlstm_layer_gates_at_the_cap_and_long_decay():
    """Input gates at the soft cap (large stabiliser jumps) and strong forgetting over 70 tokens."""
    proj, gates, state, w, b = inputs(2, 70, 2, 12, 20, bias=False, empty=True, gate_scale=40.0, seed=3)
    out, st = nat.mlstm_layer(proj, gates, state, w, b, (2, 12, 20), 15.0, 1e-6, 70)
    want, ws = reference_layer(proj, gates, state, w, b, (2, 12, 20), 15.0, 1e-6, 70, None)
    assert_close(out, want, atol=2e-5, rtol=2e-5, name="layer output, capped gates")
    assert_close(st["m"], ws["m"], atol=1e-5, rtol=1e-5, name="state m")


def test_mlstm_layer_continues_its_own_state():
    """33 tokens in one call equal 20 then 13 with the state handed over (chunks at other places)."""
    proj, gates, state, w, b = inputs(2, 33, 2, 8, 16, bias=True, empty=True, seed=5)
    dims, rows = (2, 8, 16), lambda t, a, z: t.view(2, 33, -1)[:, a:z].reshape(-1, t.shape[-1])
    full, sf = nat.mlstm_layer(proj, gates, state, w, b, dims, 15.0, 1e-6, 33)
    first, s1 = nat.mlstm_layer(rows(proj, 0, 20), rows(gates, 0, 20), state, w, b, dims, 15.0, 1e-6, 20)
    second, s2 = nat.mlstm_layer(rows(proj, 20, 33), rows(gates, 20, 33), s1, w, b, dims, 15.0, 1e-6, 13)
    assert_close(torch.cat([first.view(2, 20, -1), second.view(2, 13, -1)], 1), full.view(2, 33, -1), atol=1e-5, rtol=1e-5, name="split")
    for key in ("C", "n", "m"):
        assert_close(s2[key], sf[key], atol=1e-5, rtol=1e-5, name=f"state {key} after the split")


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """Each (row, head) and each row is computed by one thread in a fixed order: the same bits."""
    proj, gates, state, w, b = inputs(3, 40, 4, 8, 16, bias=True, empty=False, seed=7)
    gu, logits = torch.randn(50, 2 * 96), torch.randn(50, 300)
    x = torch.randn(120, 48)

    def run():
        out, st = nat.mlstm_layer(proj, gates, state, w, b, (4, 8, 16), 15.0, 1e-6, 40)
        return [out, *st.values(), nat.swiglu(gu), nat.soft_cap_(logits.clone(), 30.0), nat.rms_norm(x, x[0].abs(), x[1], 1e-6)]

    one = run()
    monkeypatch.setattr(nat, "_threads", lambda n, min_elements=0: 3)
    for a, b_ in zip(one, run()):
        assert torch.equal(a, b_)


def test_rms_norm_swiglu_and_cap_against_torch():
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(37, 53, generator=g)
    wt, bs = torch.randn(53, generator=g), torch.randn(53, generator=g)
    for bias in (None, bs):
        want = F.rms_norm(x.double(), (53,), wt.double(), 1e-5) + (0.0 if bias is None else bias.double())
        assert_close(nat.rms_norm(x, wt, bias, 1e-5), want, atol=2e-6, rtol=2e-6, name="rms_norm")
    gate = torch.cat([torch.linspace(-100.0, 100.0, 4001), torch.tensor([0.0, 1e-30, -1e-30, 88.5, -88.5])])
    up = torch.randn(gate.numel(), generator=g)
    got = nat.swiglu(torch.cat([gate, up])[None])[0].double()
    want = F.silu(gate.double()) * up.double()
    assert ((got - want).abs() <= 4e-7 * want.abs() + 1e-30).all(), "silu(gate) * up beyond 4e-7 relative (1e-30 absolute: exp(-87) stands in for underflow)"
    z = torch.cat([torch.linspace(-400.0, 400.0, 8001), torch.tensor([0.0, 1e-6, -1e-6, 1e-30, 7.5, -7.5, float("inf"), float("-inf")])])
    capped = nat.soft_cap_(z.clone()[None], 30.0)[0].double()
    want = 30.0 * torch.tanh(z.double() / 30.0)
    assert ((capped - want).abs() <= 4e-7 * want.abs() + 1e-30).all(), "30 tanh(x / 30) beyond 4e-7 relative"
    assert capped[-2] == 30.0 and capped[-1] == -30.0


def test_the_portable_build_computes_the_same(monkeypatch):
    """The last-resort build (plain -O3: no -march=native, no OpenMP; the 16-wide vectors split by
    the compiler) gives the same layer, SwiGLU and cap as the native build, to rounding."""
    from rizzearch.ops import _common

    portable = nat.bind(_common.load_c_library("mlstm_step.c", [["-O3"]])[0], False)
    proj, gates, state, w, b = inputs(2, 37, 3, 5, 7, bias=True, empty=False, seed=11)
    gu, logits = torch.randn(9, 2 * 40), 50.0 * torch.randn(9, 70)

    def run():
        out, st = nat.mlstm_layer(proj, gates, state, w, b, (3, 5, 7), 15.0, 1e-6, 37)
        return [out, *st.values(), nat.swiglu(gu), nat.soft_cap_(logits.clone(), 30.0)]

    native = run()
    monkeypatch.setattr(nat, "_lib", portable)
    for i, (a, p) in enumerate(zip(native, run())):
        assert_close(p, a, atol=1e-5, rtol=1e-5, name=f"portable build, output {i}")


def test_views_are_read_as_their_values():
    """Non-contiguous inputs (a wrapped projection may return a view) give the contiguous results."""
    proj, gates, state, w, b = inputs(2, 9, 2, 4, 8, bias=False, empty=True, seed=13)
    wide = torch.cat([proj, torch.randn_like(proj)], 1)[:, : proj.shape[1]]
    assert not wide.is_contiguous()
    a, _ = nat.mlstm_layer(wide, gates, state, w, b, (2, 4, 8), 15.0, 1e-6, 9)
    c, _ = nat.mlstm_layer(proj, gates, state, w, b, (2, 4, 8), 15.0, 1e-6, 9)
    assert torch.equal(a, c)
    x = torch.randn(20, 12)
    assert torch.equal(nat.rms_norm(x.t(), x[:12, 0], None, 1e-6), nat.rms_norm(x.t().contiguous(), x[:12, 0], None, 1e-6))
    assert torch.equal(nat.swiglu(x.t()), nat.swiglu(x.t().contiguous()))
    assert_close(nat.soft_cap_(x.t() * 40, 30.0), nat.soft_cap_((x.t() * 40).contiguous(), 30.0), atol=1e-5, rtol=1e-5, name="cap of a view")


@pytest.mark.parametrize("N,D,G,bias", [(256, 256, 8, False), (7, 40, 6, True), (3, 17, 1, True), (33, 64, 13, False)])
def test_rms_norm_gates_is_the_norm_then_the_gates(N, D, G, bias, monkeypatch):
    """One pass over the rows: the normed rows are rms_norm's bits and the gates equal F.linear of them
    (groups of four outputs, then the rest; D not a multiple of 16 included), for any thread count
    and for a view of the input (the same bits)."""
    g = torch.Generator().manual_seed(N + D + G)
    x, w, gw, gb = torch.randn(N, D, generator=g), torch.randn(D, generator=g), torch.randn(G, D, generator=g), torch.randn(G, generator=g)
    b = torch.randn(D, generator=g) if bias else None
    xn, gates = nat.rms_norm_gates(x, w, b, 1e-6, gw, gb)
    assert torch.equal(xn, nat.rms_norm(x, w, b, 1e-6))
    for gate_bias in (None, gb):
        want = F.linear(xn.double(), gw.double(), None if gate_bias is None else gate_bias.double())
        assert_close(nat.rms_norm_gates(x, w, b, 1e-6, gw, gate_bias)[1], want, atol=1e-5, rtol=1e-5, name="gates")
    view = nat.rms_norm_gates(x.t().contiguous().t(), w, b, 1e-6, gw, gb)
    monkeypatch.setattr(nat, "_threads", lambda n, min_elements=0: 3)
    for got in (view, nat.rms_norm_gates(x, w, b, 1e-6, gw, gb)):
        assert torch.equal(got[0], xn) and torch.equal(got[1], gates)
