"""Our mLSTM ops against the official kernels' conventions (``mlstm_kernels``, through the
``mLSTMBackend`` that ``xlstm.xlstm_large`` calls; anchors).

What is checked, per form (our chunkwise fused / reference, our step), in float64:

- With the official ``eps`` set to 0 the two compute the same ``h`` for any T (the normaliser is
  ``max(|n.q|, exp(-m))`` in both; the gate pre-activations enter the same way: ``exp(i)`` and
  ``logsigmoid(f)``).
- States convert as ``C_official = sqrt(Dqk) C_ours`` (they keep ``k`` unscaled and scale ``q``)
  and likewise ``n``, at the same stabiliser ``m`` once a token has been seen with an empty
  start (theirs starts at ``m = 0``, ours at ``-inf``; the true states ``C exp(m)`` agree): our
  state handed to their kernel (and back) continues the sequence exactly.
- With their default ``eps = 1e-6``, ``h`` differs from ours by a per-(token, head) factor only.
"""

from __future__ import annotations

import math

import pytest
import torch

from rizzearch.ops.mlstm import mlstm_chunkwise, mlstm_step
from rizzearch.testing import assert_close

pytest.importorskip("mlstm_kernels")
pytestmark = [pytest.mark.anchors, pytest.mark.filterwarnings("ignore")]

DT = torch.float64


def official_backend(eps: float, chunk_size: int = 16):
    from mlstm_kernels.torch.backend_module import mLSTMBackend, mLSTMBackendConfig

    cfg = mLSTMBackendConfig(
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native",
        mode="inference", chunk_size=chunk_size, eps=eps, autocast_kernel_dtype="float32", inference_state_dtype="float64",
    )
    return mLSTMBackend(cfg)


def inputs(B=2, NH=3, T=37, Dqk=8, Dv=5, gate_scale=3.0):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    return r(B, NH, T, Dqk), r(B, NH, T, Dqk), r(B, NH, T, Dv), gate_scale * r(B, NH, T), gate_scale * r(B, NH, T) + 2.0


def to_official(state, Dqk):
    C, n, m = state
    return C * math.sqrt(Dqk), n * math.sqrt(Dqk), m[..., None]


def to_ours(state, Dqk):
    C, n, m = state
    return C / math.sqrt(Dqk), n / math.sqrt(Dqk), m[..., 0]


@pytest.mark.parametrize("T", [1, 16, 37])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_chunkwise_equals_official_with_eps_zero(T, backend):
    q, k, v, i, f = inputs(T=T)
    Dqk = q.shape[-1]
    with torch.no_grad():
        h_off, st_off = official_backend(0.0)(q=q, k=k, v=v, i=i, f=f)
        h, st = mlstm_chunkwise(q, k, v, i, f, return_state=True, chunk_size=16, backend=backend)
    assert_close(h, h_off, atol=1e-10, rtol=1e-10, name=f"h vs official (eps=0), T={T}")
    C_off, n_off, m_off = to_ours(st_off, Dqk)
    scale = torch.exp(st[2] - m_off)  # same true state at different stabilisers
    assert_close(st[0] * scale[..., None, None], C_off, atol=1e-10, rtol=1e-10, name="true C")
    assert_close(st[1] * scale[..., None], n_off, atol=1e-10, rtol=1e-10, name="true n")


def test_states_interchange_with_the_official_kernels():
    """Prefill with ours, continue with theirs (and the other way round): same h as one pass."""
    q, k, v, i, f = inputs(T=40)
    Dqk = q.shape[-1]
    off = official_backend(0.0)
    a, b = slice(0, 23), slice(23, 40)
    part = lambda t, s: t[:, :, s]  # noqa: E731
    with torch.no_grad():
        h_all = mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
        _, ours_st = mlstm_chunkwise(*(part(t, a) for t in (q, k, v, i, f)), return_state=True, chunk_size=16)
        C, n, m = to_official(ours_st, Dqk)
        h_theirs, _ = off(*(part(t, b) for t in (q, k, v, i, f)), c_initial=C, n_initial=n, m_initial=m)
        _, off_st = off(*(part(t, a) for t in (q, k, v, i, f)))
        h_ours = mlstm_chunkwise(*(part(t, b) for t in (q, k, v, i, f)), initial_state=to_ours(off_st, Dqk), chunk_size=16)
        h_step, _ = mlstm_step(q[:, :, 23], k[:, :, 23], v[:, :, 23], i[:, :, 23], f[:, :, 23], to_ours(off_st, Dqk))
    assert_close(h_theirs, h_all[:, :, b], atol=1e-8, rtol=1e-7, name="official continuing our state")
    assert_close(h_ours, h_all[:, :, b], atol=1e-8, rtol=1e-7, name="ours continuing the official state")
    assert_close(h_step, h_all[:, :, 23], atol=1e-8, rtol=1e-7, name="our step continuing the official state")


def test_official_eps_is_a_per_token_head_scale():
    """With eps = 1e-6 their h = ours x s[b, head, t] with ``s = D / (D + eps)``, ``D = max(|n.q|,
    exp(-m))`` the stabilised normaliser: one positive factor per row, which a per-head LayerNorm
    removes. It departs from 1 only where ``D`` is small (``|n.q|`` near 0 and ``m`` large)."""
    q, k, v, i, f = inputs(T=37, gate_scale=1.0)
    i = i + 12.0  # m near 12: eps exp(m) ~ 0.16
    with torch.no_grad():
        h_off, _ = official_backend(1e-6)(q=q, k=k, v=v, i=i, f=f)
        h = mlstm_chunkwise(q, k, v, i, f, chunk_size=16)
    s = (h_off * h).sum(-1) / (h * h).sum(-1)  # (B, NH, T) least-squares factor per row
    assert_close(h_off, h * s[..., None], atol=1e-10, rtol=1e-9, name="official h = s x ours")
    assert (s > 0).all() and (s <= 1).all() and s.min() < 1 - 1e-9
