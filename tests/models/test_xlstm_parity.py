"""Parity with the official NX-AI ``xlstm`` package (anchors: CI runs these).

Every official parameter is randomised (the zero-initialised gate weights and recurrent matrices
included) before converting, so every weight's mapping is exercised.
"""

from __future__ import annotations

import pytest
import torch

from rizzearch.testing import assert_close

xlstm = pytest.importorskip("xlstm")
pytestmark = pytest.mark.anchors

V, B = 97, 2


def official(kind: str, context_length: int = 64):
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMLMModel,
        xLSTMLMModelConfig,
    )

    kw = dict(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4)),
        context_length=context_length,
        num_blocks=2,
        embedding_dim=64,
        vocab_size=V,
    )
    if kind == "mixed":  # xLSTM[1:1]
        kw.update(
            slstm_block=sLSTMBlockConfig(
                slstm=sLSTMLayerConfig(backend="vanilla", num_heads=4, conv1d_kernel_size=4),
                feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu"),
            ),
            slstm_at=[1],
        )
    torch.manual_seed(0)
    model = xLSTMLMModel(xLSTMLMModelConfig(**kw))
    model.reset_parameters()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind,T", [("mlstm", 37), ("mixed", 37), ("mixed", 90)], ids=["mLSTM-only", "xLSTM[1:1]", "xLSTM[1:1]-long"])
def test_logits_and_step_decoding_match_official_forward(kind, T):
    from rizzearch.models.convert import from_official_xlstm

    theirs = official(kind, context_length=max(64, T))
    ours = from_official_xlstm(theirs)
    assert ours.config.ratio == ("xLSTM[2:0]" if kind == "mlstm" else "xLSTM[1:1]")
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    x = torch.randint(0, V, (B, T))
    with torch.no_grad():
        want = theirs(x)
        got, _ = ours(x)
        assert_close(got, want, atol=1e-4, rtol=1e-4, name="forward logits vs official")
        if T <= 40:  # our step-by-step decoding vs their full forward
            state, steps = None, []
            for t in range(T):
                logits, state = ours.step(x[:, t], state)
                steps.append(logits)
            assert_close(torch.stack(steps, 1), want, atol=1e-4, rtol=1e-4, name="step decoding vs official forward")
        else:  # chunked prefill across several mLSTM chunks, then steps
            ours_small_chunks = type(ours)(type(ours.config)(**{**ours.config.__dict__, "chunk_size": 16})).eval()
            ours_small_chunks.load_state_dict(ours.state_dict())
            a, state = ours_small_chunks(x[:, :81])
            parts = [a]
            for t in range(81, T):
                logits, state = ours_small_chunks.step(x[:, t], state)
                parts.append(logits[:, None])
            assert_close(torch.cat(parts, 1), want, atol=1e-4, rtol=1e-4, name="chunked prefill + steps vs official")


def test_slstm_op_matches_official_vanilla_cell():
    """Our sLSTM op against the official vanilla cell on the same pre-activations."""
    from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig

    from rizzearch.ops.slstm import slstm_forward

    NH, DH, T = 2, 8, 23
    cell = sLSTMCell(sLSTMCellConfig(hidden_size=NH * DH, num_heads=NH, backend="vanilla"))
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.3 * torch.randn_like(p))
    wx = torch.randn(B, T, 4, NH, DH)
    y_off, _ = cell(wx.reshape(B, T, 4 * NH * DH))  # (B, NH, T, DH)
    R = cell._recurrent_kernel_int2ext(cell._recurrent_kernel).detach()
    b = cell._bias_int2ext(cell._bias).permute(1, 0, 2).detach()
    y = slstm_forward(wx, R, b)  # (B, T, NH, DH)
    assert_close(y.transpose(1, 2), y_off.detach(), atol=1e-5, rtol=1e-4, name="sLSTM outputs vs official vanilla")


def test_from_official_rejects_other_objects():
    from rizzearch.errors import ConfigError
    from rizzearch.models.convert import from_official_xlstm

    with pytest.raises(ConfigError, match="expected an official"):
        from_official_xlstm(torch.nn.Linear(2, 2))
