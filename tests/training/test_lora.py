"""LoRA adapters for every registered model: equal at init, merge == unmerged, decoding, PEFT-format round trip, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rizzearch.errors import CheckpointError, ConfigError
from rizzearch.models import build_model
from rizzearch.models.base import model_names, tiny_overrides
from rizzearch.testing import assert_close
from rizzearch.training.lora import (
    DEFAULT_TARGETS,
    LoraLinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
)

MODELS = model_names()


def tiny(name: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_model(name, **{**tiny_overrides(name), **over}).eval()


def randomize_adapters(model, seed: int = 1, scale: float = 0.2) -> None:
    """Nonzero B (A is already random): the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            for p in (*m.lora_A, *m.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def tokens(B=2, T=13, V=256, seed=3):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
def test_lora_starts_as_the_base_model_and_only_adapters_train(name):
    model = tiny(name)
    x = tokens()
    ref = model(x)[0]
    apply_lora(model, r=4, alpha=8)
    assert set(DEFAULT_TARGETS) >= {name}
    assert lora_layers(model), "no layer wrapped"
    assert_close(model(x)[0], ref, atol=0, rtol=0, name=f"{name} logits at init")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(model)}
    model.train()
    model(x)[0].float().square().mean().backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            continue
        assert p.grad is None, f"frozen parameter {n} got a gradient"
    assert any(m.lora_B[0].grad.abs().sum() > 0 for m in lora_layers(model).values())


@pytest.mark.parametrize("name", MODELS)
def test_merged_equals_unmerged(name):
    model = tiny(name)
    apply_lora(model, r=4, alpha=16)
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        base_logits = tiny(name)(x)[0]
        unmerged = model(x)[0]
    assert (unmerged - base_logits).abs().max() > 1e-3, "the adapter does not change the output"
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    with torch.no_grad():
        assert_close(model(x)[0], unmerged, atol=1e-5, rtol=1e-5, name=f"{name} merged logits")
    fresh = tiny(name, seed=5)
    fresh.load_state_dict(model.state_dict())  # a merged model is a plain model of its family


@pytest.mark.parametrize("name", MODELS)
def test_decoding_with_adapters_equals_the_full_forward(name):
    model = tiny(name)
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    x = tokens(T=9)
    with torch.no_grad():
        full = model(x)[0]
        logits, state = model(x[:, :5])
        steps = [logits]
        for t in range(5, 9):
            lt, state = model.step(x[:, t], state)
            steps.append(lt[:, None])
    assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4, name=f"{name} prefill+step vs forward")


@pytest.mark.parametrize("name", MODELS)
def test_adapter_round_trip_in_peft_format(name, tmp_path):
    model = tiny(name)
    apply_lora(model, r=4, alpha=8, targets=DEFAULT_TARGETS[name])
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        want = model(x)[0]
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == ("LORA", 4, 8, "tiny")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    other = tiny(name)  # same base weights, no adapter yet
    load_adapter(other, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(other(x)[0], want, atol=1e-6, rtol=1e-6, name=f"{name} logits after load_adapter")
    assert other.lora_config["r"] == 4 and other.lora_config["alpha"] == 8


@pytest.mark.parametrize("name", MODELS)
def test_adapters_disabled_is_the_base_model(name):
    model = tiny(name)
    x = tokens()
    with torch.no_grad():
        base = model(x)[0]
    apply_lora(model, r=2, alpha=4)
    randomize_adapters(model)
    with torch.no_grad(), adapters_disabled(model):
        assert_close(model(x)[0], base, atol=0, rtol=0, name="logits with adapters disabled")
    with torch.no_grad():
        assert (model(x)[0] - base).abs().max() > 1e-3  # back on after the block


def test_training_the_adapter_lowers_the_loss_and_leaves_the_base_alone():
    model = tiny("gpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = tokens(B=4, T=16)
    losses = []
    model.train()
    for _ in range(20):
        logits = model(x[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for k, v in before.items():
        mod, _, leaf = k.rpartition(".")
        wrapped = f"{mod}.base_layer.{leaf}" if isinstance(model.get_submodule(mod), LoraLinear) else k
        assert torch.equal(model.state_dict()[wrapped], v), f"base weight {k} changed"


def test_lora_dropout_only_in_training():
    model = tiny("gpt")
    apply_lora(model, r=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    x = tokens()
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
        assert torch.equal(a, b)
        model.train()
        assert not torch.equal(model(x)[0], a)


def test_xlstm_block_diagonal_layers_get_block_diagonal_adapters():
    model = tiny("xlstm")
    q = model.blocks[0].q_proj
    block = q.weight.shape[1]
    with pytest.raises(ConfigError, match=rf"rank {block + 1} is larger than the {block}x{block} blocks .*q_proj"):
        apply_lora(tiny("xlstm"), r=block + 1, alpha=1, targets=["q_proj"])
    wide = apply_lora(tiny("xlstm"), r=block + 1, alpha=1)  # the defaults skip blocks narrower than r
    assert not any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in lora_layers(wide))
    apply_lora(model, r=block, alpha=1, targets=["q_proj"])
    assert model.blocks[0].q_proj.lora_A[0].shape == (q.weight.shape[0], block, block)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_target_matching_nothing_names_the_pattern_and_the_modules():
    with pytest.raises(ConfigError, match=r"'attn\.nope' matches no module of GPT; adaptable modules: .*blocks\.\*\.attn\.qkv"):
        apply_lora(tiny("gpt"), r=4, alpha=8, targets=["attn.nope"])


def test_rank_larger_than_the_layer():
    with pytest.raises(ConfigError, match=r"rank 65 is larger than layer 'blocks\.0\.attn\.proj' \(64 inputs"):
        apply_lora(tiny("gpt"), r=65, alpha=8, targets=["attn.proj"])


@pytest.mark.parametrize("bad", [dict(r=0), dict(alpha=0.0), dict(dropout=1.0)])
def test_bad_lora_settings(bad):
    with pytest.raises(ConfigError, match="lora"):
        apply_lora(tiny("gpt"), **{"r": 4, "alpha": 8.0, **bad})


def test_tied_head_and_double_application_are_refused():
    with pytest.raises(ConfigError, match="'lm_head' shares its weight"):
        apply_lora(tiny("gpt"), r=4, alpha=8, targets=["lm_head"])
    model = apply_lora(tiny("gpt"), r=4, alpha=8)
    with pytest.raises(ConfigError, match="already has an adapter"):
        apply_lora(model, r=4, alpha=8, targets=["attn.qkv"])


def test_adapter_for_another_base_model_names_key_and_shapes(tmp_path):
    model = apply_lora(tiny("gpt", d_model=128), r=4, alpha=8)
    save_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"base_model\.model\.blocks\.0\.attn\.\w+\.lora_A\.weight has shape \(4, 128\), this model expects \(4, 64\)"):
        load_adapter(tiny("gpt"), tmp_path)
    with pytest.raises(CheckpointError, match=r"adapter module 'blocks\.0\.attn\.\w+' is not a layer of this RWKV model"):
        load_adapter(tiny("rwkv"), tmp_path)


def test_broken_adapter_folders(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json: missing"):
        load_adapter(tiny("gpt"), tmp_path)
    model = apply_lora(tiny("gpt"), r=4, alpha=8)
    save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_adapter(tiny("gpt"), tmp_path)
    save_file({"base_model.model.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 64)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="has lora_A but not its pair"):
        load_adapter(tiny("gpt"), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"\['use_dora'\] are not supported"):
        load_adapter(tiny("gpt"), tmp_path)


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_adapter(tiny("gpt"), tmp_path)
