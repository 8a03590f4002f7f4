"""Parity of rizzearch RWKV-4 with HF transformers' RwkvForCausalLM and the ``rwkv`` pip package."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import CheckpointError
from rizzearch.models.convert import from_hf_rwkv, to_hf_rwkv, to_official_rwkv
from rizzearch.testing import assert_close

pytestmark = pytest.mark.anchors

transformers = pytest.importorskip("transformers")

V, C, L = 97, 64, 2


def random_hf(seed=0, **over):
    """A random HF RWKV-4 with *every* parameter randomised (time_decay/first/mix included)."""
    torch.manual_seed(seed)
    cfg = transformers.RwkvConfig(
        **{"vocab_size": V, "hidden_size": C, "num_hidden_layers": L, "intermediate_size": 96, "context_length": 64, **over}
    )
    hf = transformers.RwkvForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "time_mix" in name:
                p.copy_(torch.rand_like(p))
            elif "time_decay" in name:
                p.copy_(torch.randn_like(p) * 2)
            elif name.endswith("ln1.weight") or name.endswith("ln2.weight") or "ln_out.weight" in name or "pre_ln.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return hf.eval()


@pytest.fixture(scope="module")
def pair():
    hf = random_hf()
    return hf, from_hf_rwkv(hf).eval()


def test_logits_equal_hf_full_forward(pair):
    hf, ours = pair
    x = torch.randint(0, V, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        got, _ = ours(x)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="logits vs HF")


def test_narrow_attention_width_matches_hf():
    """attention_hidden_size != hidden_size (HF only runs it with use_cache=False; see docs/rwkv.md)."""
    hf = random_hf(seed=6, attention_hidden_size=48)
    ours = from_hf_rwkv(hf).eval()
    assert ours.config.att_dim == 48
    x = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(x, use_cache=False).logits
        got, _ = ours(x)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="logits vs HF (d_att=48)")


def test_batched_stepping_equals_hf_full_forward(pair):
    """Ours: prefill then one token at a time for batch 3 == HF's full forward.

    (HF's own single-token stepping with batch > 1 broadcasts its (B, C) token-shift state against
    (B, 1, C) inputs and returns (B, B, V) logits; see docs/rwkv.md.)
    """
    hf, ours = pair
    x = torch.randint(0, V, (3, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(x).logits
        logits, state = ours(x[:, :9])
        parts = [logits]
        for t in range(9, 30):
            step, state = ours.step(x[:, t], state)
            parts.append(step[:, None])
    assert_close(torch.cat(parts, 1), want, atol=1e-5, rtol=1e-5, name="stepped logits vs HF full forward")


def test_exported_model_loads_in_hf_and_matches(pair, tmp_path):
    _, ours = pair
    hf = to_hf_rwkv(ours)
    hf.save_pretrained(tmp_path)
    loaded = transformers.RwkvForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, _ = ours(x)
        assert_close(loaded(x).logits, want, atol=1e-5, rtol=1e-5, name="exported HF logits")
    back = from_hf_rwkv(loaded)  # and the round trip is exact
    for (n, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n


def test_import_undoes_hf_eval_rescaling():
    """HF divides att.output/ffn.value weights in place in eval mode; the import must undo it."""
    hf = random_hf(seed=4, rescale_every=1)
    x = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hf.train()
        want = hf(x).logits  # training mode: no rescaling
        hf.eval()
        hf(x)  # rescales the weights in place
    assert hf.rwkv.layers_are_rescaled
    ours = from_hf_rwkv(hf).eval()
    with torch.no_grad():
        got, _ = ours(x)
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="logits after undoing HF rescale")


def test_other_rwkv_versions_are_named():
    hf = random_hf()
    sd = hf.state_dict()
    v5 = dict(sd)
    v5["rwkv.blocks.0.attention.ln_x.weight"] = torch.ones(64)
    with pytest.raises(CheckpointError, match=r"RWKV-5.*unexpected 1 key\(s\) \['rwkv.blocks.0.attention.ln_x.weight'\]"):
        from_hf_rwkv(v5)
    missing = {k: v for k, v in sd.items() if not k.endswith("time_first")}
    with pytest.raises(CheckpointError, match=r"missing 2 key\(s\) \['rwkv.blocks.0.attention.time_first'"):
        from_hf_rwkv(missing)
    per_head = dict(sd)
    per_head["rwkv.blocks.1.attention.time_decay"] = torch.zeros(4, 16)  # RWKV-5 style (heads, head_dim)
    with pytest.raises(CheckpointError, match=r"time_decay has shape \(4, 16\), expected \(64,\)"):
        from_hf_rwkv(per_head)
    official = to_official_rwkv(from_hf_rwkv(hf))
    with pytest.raises(CheckpointError, match="official RWKV-LM checkpoint"):
        from_hf_rwkv(official)


def test_rwkv_package_matches_with_the_same_weights(pair, tmp_path, monkeypatch):
    """The official-format export runs in the rwkv pip package (batch 1) with the same logits."""
    pytest.importorskip("rwkv")
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as PackageRWKV

    _, ours = pair
    path = tmp_path / "model.pth"
    torch.save(to_official_rwkv(ours), path)
    pkg = PackageRWKV(str(path), strategy="cpu fp32", verbose=False)
    tokens = [5, 17, 3, 88, 41, 2, 60]
    with torch.no_grad():
        want, _ = ours(torch.tensor([tokens]))
        out, state = pkg.forward(tokens[:4], None)  # sequence mode, then one token at a time
        got = [out]
        for t in tokens[4:]:
            out, state = pkg.forward([t], state)
            got.append(out)
    assert_close(torch.stack(got), want[0, 3:], atol=1e-5, rtol=1e-5, name="rwkv package logits")
