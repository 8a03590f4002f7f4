"""The xLSTM-7B architecture (``xlstm_large``) beyond the shared contract tests (which run it too)."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.models import XLSTMLarge, XLSTMLargeConfig, build_model
from rizzearch.models.base import tiny_overrides
from rizzearch.ops.backends import use_backend
from rizzearch.testing import assert_close

V = 97


def make(**kw) -> XLSTMLarge:
    torch.manual_seed(0)
    m = build_model("xlstm_large", **{**tiny_overrides("xlstm_large"), "vocab_size": V, **kw}).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_widths_follow_the_official_rounding():
    seven_b = XLSTMLargeConfig()
    assert (seven_b.qk_dim, seven_b.v_dim, seven_b.ffn_dim) == (2048, 4096, 10944)
    # the official ((x + m - 1) // m) * m on a float x with a fraction rounds 64.5 *down* to 64
    odd = XLSTMLargeConfig(d_model=43, n_heads=1, qk_dim_factor=1.0, ffn_proj_factor=1.5)
    assert odd.ffn_dim == 64
    assert XLSTMLargeConfig(d_model=64, ffn_proj_factor=2.0).ffn_dim == 128


def test_seven_b_parameter_count():
    """Counted on the meta device: embedding + head 2 x 50304 x 4096, and per block the q/k/v/o,
    gate, output and SwiGLU matrices plus three norm vectors, plus the final norm."""
    with torch.device("meta"):
        model = XLSTMLarge(XLSTMLargeConfig())
    d, qk, v, ffn, nh = 4096, 2048, 4096, 10944, 8
    block = d * (2 * qk + 2 * v) + (d + 1) * 2 * nh + v * d + d * 2 * ffn + ffn * d + 2 * d + v
    assert model.num_params() == 2 * 50304 * d + 32 * block + d == 6_865_424_896


def test_logits_are_soft_capped():
    m = make()
    with torch.no_grad():
        m.lm_head.weight.mul_(1e4)
        logits, _ = m(torch.randint(0, V, (2, 9)))
    assert logits.abs().max() <= 30.0
    assert logits.abs().max() > 29.0  # the cap is reached, not a clamp elsewhere
    uncapped = make(logit_soft_cap=None)
    with torch.no_grad():
        uncapped.lm_head.weight.mul_(1e4)
        assert uncapped(torch.randint(0, V, (2, 9)))[0].abs().max() > 100


@pytest.mark.parametrize("T", [1, 15, 37, 64])
def test_chunkwise_equals_the_parallel_form_for_any_length(T):
    """Chunks of 16 (T not a multiple included), fused and reference, against one chunk >= T (the
    parallel form), on the same weights."""
    m = make()
    x = torch.randint(0, V, (3, T))
    one_chunk = XLSTMLarge(XLSTMLargeConfig(**{**m.config.__dict__, "chunk_size": 128})).eval()
    one_chunk.load_state_dict(m.state_dict())
    with torch.no_grad(), use_backend("xlstm_fused", "reference"):  # the modules: op mlstm's forms
        want, ws = one_chunk(x)
        for backend in ("fast", "reference"):
            with use_backend("mlstm", backend):
                got, gs = m(x)
            assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"logits, chunks of 16, {backend}, T={T}")
            assert_close(gs["blocks"][1]["C"], ws["blocks"][1]["C"], atol=1e-5, rtol=1e-5, name="final C")


@pytest.mark.parametrize("kw", [{}, dict(use_bias=True, qk_dim_factor=0.5, gate_soft_cap=None, logit_soft_cap=None, add_out_norm=False)])
def test_fused_forward_equals_the_modules(kw):
    """Without gradient the model runs the C kernels between its matmuls (op ``xlstm_fused``, the
    chunkwise mLSTM in C) for any T: logits and every state equal the modules' (``reference``) with a
    state handed in, a padding mask (left padding and a gap) and T not a multiple of 16; the
    caller's state is never modified."""
    from rizzearch.ops.mlstm import native

    if native.decode_lib() is None:
        pytest.skip("no C compiler")
    m = make(**kw)
    x = torch.randint(0, V, (3, 41))
    mask = torch.ones(3, 41, dtype=torch.bool)
    mask[0, :9] = False
    mask[2, 20:23] = False
    with torch.no_grad():
        assert m._fused_ok(41)
        _, start = m(x[:, :5])
        before = {k: t.clone() for k, t in start["blocks"][1].items()}
        got, gs = m(x[:, 5:], start, attention_mask=mask[:, 5:])
        with use_backend("xlstm_fused", "reference"):
            assert not m._fused_ok(41)
            want, ws = m(x[:, 5:], start, attention_mask=mask[:, 5:])
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="fused logits")
    for i, (a, b) in enumerate(zip(gs["blocks"], ws["blocks"])):
        for k in ("C", "n", "m"):
            assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, name=f"fused state block {i} {k}")
    for k, t in before.items():
        assert torch.equal(start["blocks"][1][k], t), f"the fused forward modified the input state {k}"
    assert not m._fused_ok(41)  # gradients on: the modules (training)
    with torch.no_grad():
        assert not make(**kw).to(torch.bfloat16)._fused_ok(41)  # only fp32 weights


def test_fused_forward_runs_lora_wrapped_projections():
    """Adapters wrap the projections (every matrix of a block): the fused path calls the modules, so
    the adapters count, and its in-place residual adds give the modules' logits."""
    from rizzearch.training.lora import adapters_disabled, apply_lora

    m = apply_lora(make(use_bias=True), r=2, alpha=4, targets=["qkvo", "if_gate", "out_proj", "ffn_up", "ffn_down"])
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
        x = torch.randint(0, V, (2, 19))
        assert m._fused_ok(19)
        got, _ = m(x)
        with use_backend("xlstm_fused", "reference"):
            want, _ = m(x)
        with adapters_disabled(m):
            base, _ = m(x)
        last, _ = m.prefill(x)  # the last block's wrapped out_proj / feed-forward on one row
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="fused logits with LoRA")
    assert_close(last, want[:, -1], atol=1e-5, rtol=1e-5, name="fused prefill with LoRA")
    assert (got - base).abs().max() > 1e-3  # the adapters are in the fused path


def test_prefill_runs_the_last_block_past_its_cell_on_one_position():
    """In ``prefill`` the last block's output projection and feed-forward see one row per sequence (only
    the last position's output is read), its projections to q, k, v, o every position (the state needs every k, v), the
    other blocks every position; the fused path and the module path alike, the same logits and state
    as ``forward`` (the contract test covers masks and states)."""
    m = make(n_blocks=3)
    rows = []
    watched = (m.blocks[0].ffn_up, m.blocks[-1].qkvo, m.blocks[-1].ffn_up)
    hooks = [mod.register_forward_hook(lambda mod, i, o, k=k: rows.append((k, o.numel() // o.shape[-1]))) for k, mod in enumerate(watched)]
    x = torch.randint(0, V, (2, 21))
    try:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                rows.clear()
                last, st = m.prefill(x)
                assert sorted(rows) == [(0, 42), (1, 42), (2, 2)], f"rows per product (grad={grad}): {rows}"
                if grad:  # the module path calls out_proj as a module (the fused one folds it into addmm)
                    seen = []
                    hook = m.blocks[-1].out_proj.register_forward_hook(lambda mod, i, o: seen.append(o.numel() // o.shape[-1]))
                    m.prefill(x)
                    hook.remove()
                    assert seen == [2], f"the last block's output projection rows: {seen}"
                full, want = m(x)
                assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5, name=f"prefill logits, grad={grad}")
                assert_close(st["blocks"][-1]["C"], want["blocks"][-1]["C"], atol=1e-6, rtol=1e-6, name="last block's state")
    finally:
        for h in hooks:
            h.remove()


def test_packed_matmul_weights_give_the_same_logits():
    """``set_matmul_weights("packed")``: the same logits and states as the parameters through
    ``F.linear`` (prefill and decoding), adapters still applied, copies current after a training
    step; bad formats are named."""
    from rizzearch.ops import packed_gemm
    from rizzearch.training.lora import apply_lora

    if not packed_gemm.available():
        with pytest.raises(ConfigError, match="MKL's packed GEMM"):
            make().set_matmul_weights("packed")
        pytest.skip("no MKL packed GEMM in this torch")
    m = make(use_bias=True)
    x = torch.randint(0, V, (2, 37))

    def run(fmt, model=m):
        model.set_matmul_weights(fmt)
        with torch.no_grad():
            logits, st = model(x[:, :30])
            step, _ = model(x[:, 30:], st)  # 14 rows: below PACKED_MIN_ROWS
            full, _ = model(x)  # 74 rows: the packed head in two blocks of rows
            last, _ = model.prefill(x)  # the head on 2 rows (F.linear), the blocks on 74 packed ones
        assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5, name=f"prefill, matmul weights {fmt}")
        return logits, step, st["blocks"][1]["C"], full, last

    for a, b in zip(run("packed"), run(None)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name="packed vs F.linear")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x)[0].square().mean().backward()  # a training step: the packed copies must follow
    opt.step()
    for a, b in zip(run("packed"), run("fp32")):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name="packed vs F.linear after a step")
    lora = apply_lora(make(use_bias=True), r=2, alpha=4, targets=["qkvo", "ffn_down"])
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    for a, b in zip(run("packed", lora), run(None, lora)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name="packed with LoRA adapters")
    with pytest.raises(ConfigError, match="unknown format 'int4'"):
        m.set_matmul_weights("int4")


def test_trains_gradients_reach_every_parameter():
    m = make().train()
    x = torch.randint(0, V, (2, 21))
    logits, _ = m(x)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_step_with_gradient_matches_the_no_grad_step():
    m = make()
    x = torch.randint(0, V, (2, 5))
    _, state = m(x)
    nxt = torch.randint(0, V, (2,))
    with torch.no_grad():
        a, sa = m.step(nxt, state)
    b, sb = m.step(nxt, state)  # grad enabled: the chunkwise path with T = 1
    assert_close(b, a, atol=1e-5, rtol=1e-5, name="step logits")
    assert_close(sb["blocks"][0]["m"], sa["blocks"][0]["m"], atol=1e-6, rtol=1e-6, name="state m")


@pytest.mark.parametrize("kw", [{}, dict(use_bias=True, qk_dim_factor=0.5, gate_soft_cap=None, logit_soft_cap=None, add_out_norm=False)])
def test_native_decode_equals_the_torch_step(kw):
    """The C decode path (``XLSTMLarge._fused`` at T = 1) against the torch step (op ``xlstm_fused`` on
    ``reference``) for several tokens with the state carried, biases and caps on and off; the
    caller's state is never modified."""
    from rizzearch.ops.mlstm import native

    if native.decode_lib() is None:
        pytest.skip("no C compiler")
    m = make(**kw)
    x = torch.randint(0, V, (3, 10))
    with torch.no_grad():
        _, start = m(x[:, :4])
        before = {k: t.clone() for k, t in start["blocks"][0].items()}
        assert m._fused_ok(1)
        sa = sb = start
        for t in range(4, 10):
            a, sa = m.step(x[:, t], sa)
            with use_backend("xlstm_fused", "reference"):
                assert not m._fused_ok(1)
                b, sb = m.step(x[:, t], sb)
            assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"native decode logits, token {t}")
        for i, (ba, bb) in enumerate(zip(sa["blocks"], sb["blocks"])):
            for k in ("C", "n", "m"):
                assert_close(ba[k], bb[k], atol=1e-5, rtol=1e-5, name=f"native decode state block {i} {k}")
        full, _ = m(x)
    assert_close(a, full[:, -1], atol=1e-5, rtol=1e-5, name="native decode vs full forward")
    for k, t in before.items():
        assert torch.equal(start["blocks"][0][k], t), f"decode modified the input state {k}"


def test_bfloat16_weights_keep_fp32_states():
    m = make().to(torch.bfloat16)
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        logits, state = m(x)
        step_logits, state = m.step(x[:, -1], state)
        ref, _ = make()(x)
    assert logits.dtype == torch.bfloat16 and state["blocks"][0]["C"].dtype == torch.float32
    assert (logits.float() - ref).abs().max() < 0.25


def test_bad_config_and_state_are_named():
    with pytest.raises(ConfigError, match="qk_dim = 30.*multiple of n_heads = 4"):
        build_model("xlstm_large", d_model=60, n_heads=4, vocab_size=V)
    with pytest.raises(ConfigError, match="gate_soft_cap must be > 0"):
        build_model("xlstm_large", **tiny_overrides("xlstm_large"), gate_soft_cap=0.0)
    m = make()
    _, state = m(torch.randint(0, V, (2, 4)))
    state["blocks"][1]["n"] = state["blocks"][1]["n"][:, :2]
    with pytest.raises(ShapeError, match=r"state\['blocks'\]\[1\]\['n'\]: expected shape \(2, 4, 8\), got \(2, 2, 8\)"):
        m(torch.randint(0, V, (2, 4)), state)


def test_fused_forward_with_a_bfloat16_projection_takes_the_module():
    """A projection left in bf16 (a partial cast) runs as its module in the fused path, never read as fp32 bits."""
    m = make(use_bias=True)
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        m.blocks[0].if_gate.to(torch.bfloat16)  # read as fp32 bits by the C dot products, it would give garbage
        with pytest.raises(RuntimeError):  # the module itself refuses fp32 inputs with bf16 weights
            m(x)
