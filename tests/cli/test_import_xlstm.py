"""``rizz import`` of an official xLSTM-7B checkpoint folder (the ``xlstm.xlstm_large`` layout:
config.yaml or a config.json of ``xLSTMLargeConfig`` fields, model.safetensors or model_0/1 shards),
written here from a random small official ``xLSTMLarge``, exactly as a downloaded one is read."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rizzearch.cli import main
from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import ConfigError
from rizzearch.models import generate, load_pretrained
from rizzearch.testing import assert_close
from rizzearch.training.checkpoint import load_checkpoint
from rizzearch.training.importer import import_checkpoint

pytest.importorskip("xlstm")
pytest.importorskip("mlstm_kernels")
pytestmark = [pytest.mark.anchors, pytest.mark.filterwarnings("ignore")]

V = 300
KERNELS = dict(
    chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native", step_kernel="native",
    mode="inference", autocast_kernel_dtype="float32", inference_state_dtype="float32",
)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official model and two folders of it: config.yaml + model.safetensors (+ tokenizer.json),
    and config.json + model_0/model_1.safetensors shards."""
    import yaml
    from safetensors.torch import save_file
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    torch.manual_seed(0)
    ref = xLSTMLarge(xLSTMLargeConfig(embedding_dim=64, num_heads=4, num_blocks=2, vocab_size=V, chunk_size=16,
                                      return_last_states=True, **KERNELS))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    ref.eval()
    root = tmp_path_factory.mktemp("xlstm_sources")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    fields = dataclasses.asdict(ref.config)
    yaml_dir, json_dir = root / "yaml", root / "json"
    yaml_dir.mkdir()
    json_dir.mkdir()
    save_file(sd, str(yaml_dir / "model.safetensors"))
    (yaml_dir / "config.yaml").write_text(yaml.safe_dump(fields))
    byte_tokenizer().save(yaml_dir / "tokenizer.json")
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, str(json_dir / "model_0.safetensors"))
    save_file({k: sd[k] for k in keys[len(keys) // 2 :]}, str(json_dir / "model_1.safetensors"))
    (json_dir / "config.json").write_text(json.dumps(fields))
    return ref, {"yaml": yaml_dir, "json": json_dir}


@pytest.mark.parametrize("layout", ["yaml", "json"])
def test_import_official_folder_then_generate(layout, official, tmp_path, capsys):
    ref, folders = official
    run = tmp_path / "run"
    assert main(["import", str(folders[layout]), "--out", str(run)]) == 0
    capsys.readouterr()
    model, tok, meta = load_checkpoint(run)
    assert meta["source_format"] == "xlstm-official" and meta["model"] == "xlstm_large"
    x = torch.randint(0, V, (2, 21))  # not a multiple of the chunk size
    with torch.no_grad():
        want, _ = ref(x)
        got, _ = model.eval()(x)
    assert_close(got, want, atol=1e-4, rtol=1e-4, name=f"logits of the imported {layout} folder vs official")
    again = load_pretrained(run)  # the run folder's own config.yaml is not mistaken for an official one
    with torch.no_grad():  # the same path as ``got`` (no gradient: the fused C kernels): the same bits
        assert again.format == "run" and torch.equal(again.model(x)[0], got)
    if layout == "yaml":  # the tokenizer came along: generate from the run folder
        assert tok is not None
        assert main(["generate", "--checkpoint", str(run), "--prompt", "The quick", "--max_new_tokens", "5", "--temperature", "0"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        ids = tok.encode("The quick")
        expected = generate(model, torch.tensor([ids]), 5, temperature=0.0)
        assert printed == tok.decode(ids + expected[0].tolist()).strip().splitlines()[-1]


def test_official_folder_unknown_key_is_named(official, tmp_path, capsys):
    import yaml

    ref, _ = official
    folder = tmp_path / "bad"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({**dataclasses.asdict(ref.config), "slstm_at": [1]}))
    with pytest.raises(ConfigError, match=r"bad/config\.yaml: unknown xLSTM config key\(s\) \['slstm_at'\]"):
        import_checkpoint(str(folder), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert main(["import", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the resolved config the command prints
    assert err.startswith("rizz import: error: ") and "config.yaml" in err and "'slstm_at'" in err
    (folder / "config.yaml").unlink()
    (folder / "config.json").write_text(json.dumps({**dataclasses.asdict(ref.config), "mlstm_backend": "x"}))
    with pytest.raises(ConfigError, match=r"bad/config\.json: unknown xLSTM config key\(s\) \['mlstm_backend'\]"):
        load_pretrained(folder)
