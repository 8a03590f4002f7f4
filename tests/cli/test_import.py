"""``rizz import``: an HF llama folder and an RWKV-4 .pth become run folders that generate / eval read."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rizzearch.cli import main
from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.models import build_model, generate, load_pretrained, save_pretrained
from rizzearch.models.convert import to_official_rwkv
from rizzearch.training.checkpoint import load_checkpoint
from rizzearch.training.importer import import_checkpoint

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def random_weights(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) if "time_mix" in name else torch.randn_like(p) * 0.2 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    tok = byte_tokenizer()
    llama = random_weights(build_model("llama", vocab_size=300, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64, tie_embeddings=True))
    save_pretrained(llama, tok, root / "hf")
    rwkv = random_weights(build_model("rwkv", vocab_size=300, d_model=32, n_layer=2), seed=1)
    to_official_rwkv(rwkv, root / "rwkv" / "RWKV-4-tiny.pth")
    tok.save(root / "rwkv" / "tokenizer.json")
    (root / "text.txt").write_text(TEXT)
    return {"hf": root / "hf", "pth": root / "rwkv" / "RWKV-4-tiny.pth", "text": root / "text.txt"}


@pytest.mark.parametrize("kind", ["hf", "pth"])
def test_import_then_generate_and_eval(kind, sources, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["import", str(sources[kind]), "--out", str(run)]) == 0
    for f in ("config.yaml", "tokenizer.json", "checkpoints/latest.json", "checkpoints/step_00000000/model.safetensors"):
        assert (run / f).is_file(), f
    pre = load_pretrained(sources[kind])
    model, tok, meta = load_checkpoint(run)
    assert meta["source_format"] == ("hf" if kind == "hf" else "rwkv-pth")
    x = torch.tensor([tok.encode("The quick brown")])
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[0], pre.model(x)[0])  # same weights, bit for bit
    capsys.readouterr()

    assert main(["generate", "--checkpoint", str(run), "--prompt", "The quick", "--max_new_tokens", "6", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    ids = tok.encode("The quick")
    want = generate(pre.model, torch.tensor([ids]), 6, temperature=0.0)
    assert printed == tok.decode(ids + want[0].tolist()).strip().splitlines()[-1]

    assert main(["eval", "--checkpoint", str(run), "--source", str(sources["text"]), "--seq_len", "32", "--batch_size", "2", "--max_batches", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["val_tokens"] == 128 and math.isfinite(result["val_loss"])
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))


def test_import_refuses_bad_input_and_keeps_existing_runs(sources, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        import_checkpoint(str(sources["pth"]), str(run))
    assert (run / "notes.txt").read_text() == "mine"
    bad = tmp_path / "v5.pth"
    torch.save({"emb.weight": torch.ones(3, 2), "blocks.0.att.ln_x.weight": torch.ones(2)}, bad)
    with pytest.raises(CheckpointError, match="RWKV-5"):
        import_checkpoint(str(bad), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="dtype"):
        import_checkpoint(str(sources["pth"]), str(tmp_path / "new"), dtype="int3")
