"""Activation checkpointing per block: the same gradients (dropout included) for every registered model, less saved memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rizzearch.errors import ConfigError
from rizzearch.models import build_model
from rizzearch.models.base import get_model_class, model_names, tiny_overrides
from rizzearch.testing import assert_close
from rizzearch.training.lora import apply_lora
from rizzearch.training.memory import checkpoint_blocks, is_checkpointed

MODELS = model_names()


def tiny(name: str, **over):
    _, cfg_cls = get_model_class(name)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    if "dropout" in fields:
        over.setdefault("dropout", 0.2)  # so the recompute must replay the RNG
    torch.manual_seed(0)
    return build_model(name, **{**tiny_overrides(name), **over}).train()


def loss_and_grads(model, x, seed=7):
    torch.manual_seed(seed)
    logits = model(x[:, :-1])[0]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward outside checkpointed regions (unique storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)[0].float().sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_gives_the_same_gradients(name):
    x = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    model = tiny(name)
    loss0, g0 = loss_and_grads(model, x)
    checkpoint_blocks(model)
    assert is_checkpointed(model)
    loss1, g1 = loss_and_grads(model, x)
    assert_close(loss1, loss0, atol=1e-6, rtol=0, name=f"{name} loss")
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for n in g0:
        assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-6, name=f"{name} grad {n}")
    assert list(model.state_dict()) == list(tiny(name).state_dict())  # names unchanged
    checkpoint_blocks(model, enabled=False)
    assert not is_checkpointed(model)


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_with_lora_gives_the_same_adapter_gradients(name):
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    model = apply_lora(tiny(name), r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    _, g0 = loss_and_grads(model, x)
    _, g1 = loss_and_grads(checkpoint_blocks(model), x)
    assert g0.keys() == g1.keys() and all(".lora_" in n for n in g0)
    for n in g0:
        assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-6, name=f"{name} grad {n}")


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_keeps_fewer_activations(name):
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    over = dict(dropout=0.0) if "dropout" in {f.name for f in dataclasses.fields(get_model_class(name)[1])} else {}
    model = tiny(name, **over)
    full = saved_bytes(model, x)
    ckpt = saved_bytes(checkpoint_blocks(model), x)
    assert ckpt < 0.5 * full, f"{name}: {ckpt} bytes saved with checkpointing vs {full} without"


def test_inference_and_decoding_skip_the_checkpoint():
    model = checkpoint_blocks(tiny("gpt", dropout=0.0)).eval()
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(x)[0]
        _, state = model(x[:, :5])
        step, _ = model.step(x[:, 5], state)
    assert_close(step, full[:, 5], atol=1e-5, rtol=1e-5, name="step logits")


def test_a_model_without_blocks_is_a_clear_error():
    with pytest.raises(ConfigError, match="has no 'blocks' ModuleList"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------
# In the training loop (--train.checkpointing blocks)


def test_loop_with_checkpointing_equals_without(tmp_path):
    from rizzearch.data.batches import RandomWindows
    from rizzearch.training.losses import lm_loss
    from rizzearch.training.loop import TrainConfig, train

    data = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))
    runs = {}
    for mode in ("none", "blocks"):
        model = tiny("gpt", dropout=0.1)
        cfg = TrainConfig(steps=3, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, checkpointing=mode)
        res = train(model, lm_loss, RandomWindows(data, 4, 16, seed=3), cfg, tmp_path / mode, progress=False)
        assert not is_checkpointed(model)  # the loop undoes it at the end
        runs[mode] = (model, [h["loss"] for h in res.history], res.history)
    assert_close(torch.tensor(runs["blocks"][1]), torch.tensor(runs["none"][1]), atol=1e-6, rtol=0, name="loss curve")
    for (n, a), b in zip(runs["none"][0].state_dict().items(), runs["blocks"][0].state_dict().values()):
        assert_close(b, a, atol=1e-6, rtol=1e-6, name=n)
    assert all(h["peak_mem_mb"] > 0 and h["tokens_per_s"] > 0 for h in runs["blocks"][2])


def test_bad_checkpointing_value():
    from rizzearch.training.loop import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.checkpointing: expected one of \['none', 'blocks'\], got 'layers'"):
        TrainConfig(checkpointing="layers")
