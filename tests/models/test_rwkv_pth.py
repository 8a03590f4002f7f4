"""RWKV-4 checkpoints through load_pretrained: BlinkDL .pth files (parity with the ``rwkv`` package),
HF RWKV folders from disk, the tokenizer next to the weights, and bad input."""

from __future__ import annotations

import pytest
import torch

from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import CheckpointError, DataError
from rizzearch.models import build_model, load_pretrained
from rizzearch.models.convert import to_hf_rwkv, to_official_rwkv
from rizzearch.models.rwkv_pth import rwkv_pth_version
from rizzearch.testing import assert_close

V, C, L = 300, 32, 2  # V > 258: the byte tokenizer (258 ids) fits


def random_rwkv(seed=0, vocab_size=V, **over):
    """A tiny RWKV-4 with every parameter randomised (the init zeroes several matrices)."""
    torch.manual_seed(seed)
    model = build_model("rwkv", vocab_size=vocab_size, n_layer=L, d_model=C, d_ffn=48, **over)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_mix" in name:
                p.copy_(torch.rand_like(p))
            elif "time_decay" in name:
                p.copy_(torch.randn_like(p) * 2)
            elif name.endswith("ln1.weight") or name.endswith("ln2.weight") or "ln_out.weight" in name or "ln0.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


TOKENS = [5, 17, 3, 88, 41, 2, 60, 250]


@pytest.mark.anchors
def test_pth_runs_in_the_rwkv_package_and_loads_back(tmp_path, monkeypatch):
    """to_official_rwkv(model, path) writes a .pth the rwkv package runs with our logits; load_pretrained reads it back exactly."""
    pytest.importorskip("rwkv")
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as PackageRWKV

    ours = random_rwkv()
    path = tmp_path / "RWKV-4-tiny.pth"
    to_official_rwkv(ours, path)
    pkg = PackageRWKV(str(path), strategy="cpu fp32", verbose=False)
    with torch.no_grad():
        want, _ = ours(torch.tensor([TOKENS]))
        out, state = pkg.forward(TOKENS[:5], None)
        got = [out]
        for t in TOKENS[5:]:
            out, state = pkg.forward([t], state)
            got.append(out)
    assert_close(torch.stack(got), want[0, 4:], atol=1e-4, rtol=1e-4, name="rwkv package logits")

    back = load_pretrained(path)
    assert back.format == "rwkv-pth" and back.tokenizer is None
    assert back.model.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert_close(back.model(torch.tensor([TOKENS]))[0], want, atol=0, rtol=0, name="reloaded logits")
    assert load_pretrained(path, dtype="bfloat16").model.emb.weight.dtype == torch.bfloat16


def test_pth_tokenizer_next_to_the_weights(tmp_path):
    ours = random_rwkv()
    to_official_rwkv(ours, tmp_path / "m.pth")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    p = load_pretrained(tmp_path / "m.pth")
    assert p.tokenizer is not None and p.tokenizer.encode("hi") == byte_tokenizer().encode("hi")


def test_hf_rwkv_folder_from_disk(tmp_path):
    pytest.importorskip("transformers")
    ours = random_rwkv(seed=1)
    hf = to_hf_rwkv(ours)
    hf.save_pretrained(tmp_path)  # before any forward: HF's eval rescaling has not touched the weights
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    p = load_pretrained(tmp_path)
    assert p.format == "hf" and p.tokenizer is not None
    assert (p.model.config.att_dim, p.model.config.ffn_dim, p.model.config.n_layer) == (C, 48, L)
    with torch.no_grad():
        assert_close(p.model(torch.tensor([TOKENS]))[0], ours(torch.tensor([TOKENS]))[0], atol=0, rtol=0, name="hf folder logits")


def test_version_detection_and_refusal(tmp_path):
    sd = to_official_rwkv(random_rwkv())
    assert rwkv_pth_version(sd)[0] == 4
    v5 = {k: v for k, v in sd.items() if "time_first" not in k}
    v5["blocks.0.att.ln_x.weight"] = torch.ones(C)
    v5["blocks.0.att.time_faaaa"] = torch.ones(4, 8)
    v6 = dict(v5, **{"blocks.0.att.time_maa_x": torch.ones(1, 1, C)})
    v7 = {"emb.weight": sd["emb.weight"], "blocks.0.att.w0": torch.ones(C), "blocks.0.att.x_r": torch.ones(C)}
    for version, bad, telltale in ((5, v5, "ln_x"), (6, v6, "time_maa_x"), (7, v7, "att.w0")):
        f = tmp_path / f"v{version}.pth"
        torch.save(bad, f)
        with pytest.raises(CheckpointError, match=rf"v{version}\.pth: an RWKV-{version} checkpoint \(keys .*{telltale}.*only RWKV-4"):
            load_pretrained(f)


def test_bad_pth_files(tmp_path):
    sd = to_official_rwkv(random_rwkv())
    extra = dict(sd, **{"blocks.0.att.tiny_q.weight": torch.ones(2, 2)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra\.pth: keys do not match RWKV-4 with 2 layers: missing 0 .*unexpected 1"):
        load_pretrained(tmp_path / "extra.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"junk\.pth: cannot be read with torch.load\(weights_only=True\)"):
        load_pretrained(tmp_path / "junk.pth")
    torch.save({"net": {"x": 1}}, tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match=r"nested\.pth: expected a flat state dict"):
        load_pretrained(tmp_path / "nested.pth")
    torch.save({"foo.weight": torch.ones(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: not an RWKV-LM checkpoint"):
        load_pretrained(tmp_path / "other.pth")


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    small = tmp_path / "small"
    to_official_rwkv(random_rwkv(vocab_size=100), small / "m.pth")
    byte_tokenizer().save(small / "tokenizer.json")
    with pytest.raises(DataError, match=r"small/tokenizer\.json: tokenizer has 258 tokens but the model's embedding has 100 rows"):
        load_pretrained(small / "m.pth")
    world = tmp_path / "world"
    to_official_rwkv(random_rwkv(), world / "m.pth")
    (world / "rwkv_vocab_v20230424.txt").write_text("1 '\\x00' 1\n")
    with pytest.raises(DataError, match="rwkv_vocab_v20230424.txt: the RWKV World tokenizer"):
        load_pretrained(world / "m.pth")


def test_hf_rwkv_folder_bad_input(tmp_path):
    import json

    pytest.importorskip("transformers")
    to_hf_rwkv(random_rwkv(vocab_size=100)).save_pretrained(tmp_path)
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer has 258 tokens but the model's embedding has 100 rows"):
        load_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match=r"config says vocab_size, hidden_size, num_hidden_layers = \(100, 32, 3\), weights have \(100, 32, 2\)"):
        load_pretrained(tmp_path)
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing field 'hidden_size'"):
        load_pretrained(tmp_path)
