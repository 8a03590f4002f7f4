"""xLSTM model: configs, the paper's init, block variants, backends end to end, bad input.

The CausalLM contract itself (prefill + step == forward, padding, generation) is checked for the
registered tiny config (one mLSTM and one sLSTM block) by tests/models/test_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from rizzearch.errors import CheckpointError, ConfigError, ShapeError
from rizzearch.models import XLSTM, XLSTMConfig, build_model
from rizzearch.models.base import tiny_overrides
from rizzearch.ops.backends import use_backend
from rizzearch.testing import assert_close

V = 61


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = {**tiny_overrides("xlstm"), "vocab_size": V, **kw}
    m = build_model("xlstm", **cfg).eval()
    with torch.no_grad():  # exercise the zero-initialised paths (gate weights, recurrent matrices)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_config_ratio_block_types_and_widths():
    cfg = XLSTMConfig(n_blocks=8, slstm_at=(3, 5), d_model=96)
    assert cfg.ratio == "xLSTM[6:2]"
    assert cfg.block_types == ["m", "m", "m", "s", "m", "s", "m", "m"]
    assert cfg.inner_dim == 192 and cfg.ffn_dim == 128  # 2 x 96; 4/3 x 96 = 128
    assert XLSTMConfig(n_blocks=2, slstm_at=()).ratio == "xLSTM[2:0]"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_blocks=2, slstm_at=(2,)), "slstm_at"),
        (dict(slstm_at=(1, 1)), "repeated"),
        (dict(d_model=60, slstm_heads=8), "slstm_heads"),
        (dict(mlstm_heads=3), "mlstm_heads"),
        (dict(qkv_blocksize=5), "qkv_blocksize"),
        (dict(conv_kernel=0), "conv_kernel"),
        (dict(unknown_field=1), "unknown key"),
    ],
)
def test_bad_config_is_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model("xlstm", **overrides)


def test_paper_initialisation():
    m = build_model("xlstm", n_blocks=3, slstm_at=(1,), d_model=64, mlstm_heads=4, slstm_heads=4)
    mb, sb = m.blocks[0], m.blocks[1]
    assert torch.equal(mb.fgate.bias.detach(), torch.linspace(3.0, 6.0, 4))
    assert torch.count_nonzero(mb.fgate.weight) == 0 and torch.count_nonzero(mb.igate.weight) == 0
    assert abs(mb.igate.bias.std().item() - 0.1) < 0.15
    assert torch.count_nonzero(sb.R) == 0
    fb = sb.b[1].detach()  # power-law forget bias, block-dependent: from +5 down to -7 over each head
    assert_close(fb[:, 0], torch.full((4,), 5.0), name="first forget bias")
    assert_close(fb[:, -1], torch.full((4,), -7.0), atol=1e-5, name="last forget bias")
    assert torch.count_nonzero(sb.b[[0, 2, 3]]) == 0
    std_small = math.sqrt(2 / (5 * 64))
    assert abs(m.embed.weight.std().item() - std_small) < 0.2 * std_small
    std_wang = 2 / 3 / math.sqrt(64)
    assert abs(mb.proj_down.weight.std().item() - std_wang) < 0.2 * std_wang


@pytest.mark.parametrize("slstm_at", [(), (0, 1)], ids=["mlstm_only", "slstm_only"])
def test_prefill_then_step_for_pure_stacks(slstm_at):
    m = make(slstm_at=slstm_at)
    x = torch.randint(0, V, (2, 29))
    full, _ = m(x)
    logits, s = m(x[:, :20])
    parts = [logits]
    for t in range(20, 29):
        with torch.no_grad():  # the inference step path (mlstm_step / slstm_step)
            lt, s = m.step(x[:, t], s)
        parts.append(lt[:, None])
    assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4, name="prefill + step")


def test_chunk_size_does_not_change_the_model():
    a = make(chunk_size=16)
    b = XLSTM(XLSTMConfig(**{**a.config.__dict__, "chunk_size": 5})).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, V, (2, 37))
    assert_close(b(x)[0], a(x)[0], atol=1e-5, rtol=1e-4, name="logits, chunk 5 vs 16")


def test_fused_and_reference_backends_agree_end_to_end():
    m = make().train()
    x = torch.randint(0, V, (2, 37))
    results = []
    for be in ("reference", "fast"):
        with use_backend("mlstm", be), use_backend("mlstm_step", be), use_backend("slstm", be):
            m.zero_grad()
            logits, _ = m(x)
            logits.log_softmax(-1).mean().backward()
            results.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert_close(lb, la, atol=1e-5, rtol=1e-4, name="logits")
    for n in ga:
        assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-3, name=f"grad {n}")


def test_padding_after_a_state_leaves_it_unchanged():
    """A hole of padding in the middle of a stream: conv buffers, mLSTM and sLSTM states all carry over."""
    m = make()
    a, b = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 8))
    _, s = m(a)
    ref, ref_s = m(b, s)
    pad = torch.randint(0, V, (2, 5))
    mixed = torch.cat([pad[:, :3], b[:, :4], pad[:, 3:], b[:, 4:]], 1)  # pads before and inside
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2, 2), torch.ones(2, 4)], 1).long()
    got, got_s = m(mixed, s, attention_mask=mask)
    assert_close(got[:, mask[0].bool()], ref, atol=1e-4, rtol=1e-4, name="logits at real positions")
    nxt = torch.randint(0, V, (2,))
    assert_close(m.step(nxt, got_s)[0], m.step(nxt, ref_s)[0], atol=1e-4, rtol=1e-4, name="next step")


def test_states_are_fp32_under_bfloat16_autocast():
    m = make()
    x = torch.randint(0, V, (2, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, s = m(x)
    assert torch.isfinite(logits).all()
    for blk in s["blocks"]:
        for key, t in blk.items():
            if key != "conv":
                assert t.dtype == torch.float32, key


def test_state_from_another_config_is_named():
    m = make()
    other = make(d_model=32, mlstm_heads=2, slstm_heads=2)
    _, s_other = other(torch.randint(0, V, (2, 5)))
    with pytest.raises(ShapeError, match=r"state\['blocks'\]\[0\]\['C'\]: expected shape \(2, 4, 32, 32\), got \(2, 2, 32, 32\)"):
        m(torch.randint(0, V, (2, 3)), s_other)
    with pytest.raises(ShapeError, match="expected 2 blocks"):
        m(torch.randint(0, V, (2, 3)), {"blocks": s_other["blocks"][:1]})
    _, s = m(torch.randint(0, V, (2, 5)))
    with pytest.raises(ShapeError, match="batch size"):
        m(torch.randint(0, V, (3, 3)), s)
    swapped = {"blocks": s["blocks"][::-1]}  # an sLSTM state where an mLSTM state belongs
    with pytest.raises(ShapeError, match=r"state\['blocks'\]\[0\]: expected keys"):
        m(torch.randint(0, V, (2, 3)), swapped)


def test_incompatible_state_dict_is_named():
    m = make()
    sd = make(d_model=32, mlstm_heads=2, slstm_heads=2).state_dict()
    with pytest.raises(ShapeError, match=r"state_dict\['norm'\]: expected shape \(64,\), got \(32,\)"):
        m.load_state_dict(sd)
    with pytest.raises(CheckpointError, match="missing"):
        m.load_state_dict({k: v for k, v in m.state_dict().items() if k != "norm"})


def test_tied_embeddings_and_flops():
    m = build_model("xlstm", **{**tiny_overrides("xlstm"), "tie_embeddings": True, "vocab_size": V})
    assert m.lm_head.weight is m.embed.weight
    n_matmul = sum(p.numel() for n, p in m.named_parameters() if p.dim() >= 2 and not n.startswith("embed"))
    assert m.flops_per_token(256) > 6 * n_matmul
    assert m.flops_per_token(256) > m.flops_per_token(4)  # the chunkwise term grows with T up to a chunk
