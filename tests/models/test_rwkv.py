"""RWKV-4 model: official init, state and padding semantics, decode path, bad input.

The generic CausalLM contract (prefill + step == forward, left padding, generation, beams) runs in
tests/models/test_contract.py; parity with HF transformers and the rwkv package in
test_rwkv_parity.py (anchors).
"""

from __future__ import annotations

import math

import pytest
import torch

from rizzearch.errors import ShapeError
from rizzearch.models import RWKV, RWKVConfig, build_model
from rizzearch.ops.backends import use_backend
from rizzearch.testing import assert_close

V = 97


def tiny(**over) -> RWKV:
    torch.manual_seed(0)
    m = RWKV(RWKVConfig(**{"vocab_size": V, "n_layer": 2, "d_model": 64, **over}))
    with torch.no_grad():  # wake the zero-initialised projections
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_official_v4_init():
    cfg = RWKVConfig(vocab_size=300, n_layer=3, d_model=32)
    m = RWKV(cfg)
    A = cfg.att_dim
    att0, att2 = m.blocks[0].att, m.blocks[2].att
    # time_decay = -5 + 8 (h / (A-1)) ** (0.7 + 1.3 * l/(L-1)): from -5 to 3 in every layer, steeper with depth
    assert att0.time_decay[0].item() == pytest.approx(-5.0)
    assert att0.time_decay[-1].item() == pytest.approx(3.0)
    h = 10
    assert att2.time_decay[h].item() == pytest.approx(-5 + 8 * (h / (A - 1)) ** 2.0, rel=1e-6)
    # time_first = log(0.3) + 0.5 * zigzag (0, 0.5, -0.5, ...)
    assert att0.time_first[:3].tolist() == pytest.approx([math.log(0.3), math.log(0.3) + 0.5, math.log(0.3) - 0.5])
    # time_mix: (i / C) ** (1 - l/L) for k; layer 0 is the plain ramp; v gets + 0.3 * l/(L-1)
    ramp = torch.arange(32) / 32
    assert_close(att0.time_mix_k.detach(), ramp, name="time_mix_k layer 0")
    assert_close(att2.time_mix_v.detach(), ramp ** (1 - 2 / 3) + 0.3, name="time_mix_v layer 2")
    assert_close(m.blocks[1].ffn.time_mix_r.detach(), ramp ** (1 - 1 / 3), name="ffn time_mix_r layer 1")
    # zero-initialised projections (RWKV-LM v4neo generate_init_weight)
    for blk in m.blocks:
        for lin in (blk.att.key, blk.att.receptance, blk.att.output, blk.ffn.value, blk.ffn.receptance):
            assert torch.count_nonzero(lin.weight) == 0
        w = blk.att.value.weight  # orthogonal, gain 1
        assert_close(w @ w.T, torch.eye(A), atol=1e-5, name="orthogonal att.value")
        fk = blk.ffn.key.weight  # (4C, C) orthogonal columns with gain sqrt(4C / C) = 2
        assert_close(fk.T @ fk, 4 * torch.eye(32), atol=1e-4, name="orthogonal ffn.key gain 2")
    head = m.head.weight  # (V, C), V > C: gain 0.5 * sqrt(V / C)
    assert_close(head.T @ head, 0.25 * 300 / 32 * torch.eye(32), atol=1e-4, name="head gain")
    assert m.emb.weight.abs().max() <= 1e-4
    assert torch.count_nonzero(m.emb.weight) > 0


def test_fresh_model_runs_and_learns():
    """From the official init (zeros included) gradients flow and a tiny batch is fitted."""
    torch.manual_seed(0)
    m = build_model("rwkv", n_layer=2, d_model=32, vocab_size=31)
    x = torch.randint(0, 31, (2, 17))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits, _ = m(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 31), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0]
    assert all(p.grad is not None for p in m.parameters())


def test_forms_give_the_same_model_outputs_and_grads():
    m = tiny().train()
    x = torch.randint(0, V, (2, 37))
    grads = {}
    outs = {}
    for form in ("reference", "fast"):
        m.zero_grad()
        with use_backend("wkv", form):
            logits, _ = m(x)
        logits.square().mean().backward()
        outs[form] = logits.detach()
        grads[form] = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert_close(outs["fast"], outs["reference"], atol=1e-5, rtol=1e-4, name="logits")
    for n in grads["reference"]:
        ref = grads["reference"][n]
        assert_close(grads["fast"][n], ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-3, name=f"grad {n}")


def test_padding_anywhere_leaves_state_unchanged():
    """A row with pads in the middle and at the end equals the row without them."""
    m = tiny()
    x = torch.randint(0, V, (2, 15))
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, 5:9] = 0
    mask[1, -4:] = 0
    logits, state = m(x, attention_mask=mask)
    for b in range(2):
        keep = mask[b].bool()
        ref, ref_state = m(x[b : b + 1, keep])
        assert_close(logits[b : b + 1, keep], ref, atol=1e-4, rtol=1e-4, name=f"row {b} logits")
        nxt = torch.tensor([5])
        row_state = {k: [s[b : b + 1] for s in v] for k, v in state.items()}
        a, _ = m.step(nxt, row_state)
        c, _ = m.step(nxt, ref_state)
        assert_close(a, c, atol=1e-4, rtol=1e-4, name=f"row {b} next step")


def test_padded_step_keeps_state():
    m = tiny()
    _, state = m(torch.randint(0, V, (2, 6)))
    _, after = m.step(torch.tensor([3, 4]), state, attention_mask=torch.tensor([1, 0]))
    for key in state:
        for old, new in zip(state[key], after[key]):
            assert torch.equal(new[1], old[1]), f"{key}: padded row changed"
            assert not torch.equal(new[0], old[0]), f"{key}: real row did not change"


def test_state_layout_and_dtypes():
    m = tiny(d_att=48, d_ffn=100).to(torch.bfloat16)
    logits, state = m(torch.randint(0, V, (2, 7)))
    assert logits.dtype == torch.bfloat16
    assert set(state) == {"att_x", "num", "den", "max", "ffn_x"}
    assert all(len(v) == 2 for v in state.values())
    assert state["num"][0].shape == (2, 48) and state["num"][0].dtype == torch.float32
    assert state["max"][1].dtype == torch.float32
    assert state["att_x"][0].shape == (2, 64)
    assert torch.isfinite(logits.float()).all()


def test_flops_have_no_context_term():
    m = tiny()
    assert m.flops_per_token(64) == m.flops_per_token(4096) > 6 * m.num_params(non_embedding=True) * 0.9


def test_state_from_another_config_is_named():
    m = tiny()
    other = tiny(n_layer=3)
    with pytest.raises(ShapeError, match=r"state\['att_x'\]: expected 2 layers, found 3"):
        m(torch.randint(0, V, (2, 4)), other.init_state(2))
    wide = tiny(d_model=32)
    with pytest.raises(ShapeError, match=r"expected shape \(2, 64\), found \(2, 32\)"):
        m(torch.randint(0, V, (2, 4)), wide.init_state(2))
    with pytest.raises(ShapeError, match=r"expected shape \(3, 64\), found \(2, 64\)"):
        m(torch.randint(0, V, (3, 4)), m.init_state(2))
    gpt_state = build_model("gpt", n_layer=2, d_model=64, vocab_size=V).init_state(2)
    with pytest.raises(ShapeError, match="expected an RWKV state dict"):
        m(torch.randint(0, V, (2, 4)), gpt_state)


def test_bad_config_is_named():
    from rizzearch.errors import ConfigError

    with pytest.raises(ConfigError, match="d_model"):
        build_model("rwkv", d_model=0)
    with pytest.raises(ConfigError, match="unknown key"):
        build_model("rwkv", hidden_size=64)


@pytest.mark.gpu
def test_cuda_model_matches_cpu():
    m = tiny()
    x = torch.randint(0, V, (3, 29))
    with torch.no_grad():
        ref, _ = m(x)
        mc = m.cuda()
        full, _ = mc(x.cuda())
        logits, state = mc(x[:, :8].cuda())
        parts = [logits]
        for t in range(8, 29):
            step, state = mc.step(x[:, t].cuda(), state)
            parts.append(step[:, None])
    assert_close(full.cpu(), ref, atol=1e-4, rtol=1e-4, name="cuda logits")
    assert_close(torch.cat(parts, 1).cpu(), ref, atol=1e-4, rtol=1e-4, name="cuda prefill+step logits")
