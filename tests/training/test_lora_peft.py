"""PEFT parity for the llama family: our adapters load into transformers + peft with the same logits, and back."""

from __future__ import annotations

import pytest
import torch

from rizzearch.models import build_model
from rizzearch.models.base import tiny_overrides
from rizzearch.testing import assert_close
from rizzearch.training.lora import apply_lora, load_adapter, lora_layers, lora_parameters, save_adapter

pytest.importorskip("rizzearch.models.llama", reason="the llama family is not in this checkout")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.anchors

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(**over):
    torch.manual_seed(0)
    return build_model("llama", **{**tiny_overrides("llama"), **over}).eval()


def hf_of(model):
    from rizzearch.models.convert import to_hf_llama

    return to_hf_llama(model)


def train_a_little(model, steps=3):
    opt = torch.optim.AdamW(lora_parameters(model), lr=5e-2)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    model.train()
    for _ in range(steps):
        logits = model(x[:, :-1])[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("over", [{}, {"tie_embeddings": False, "qkv_bias": True}])
def test_peft_loads_an_adapter_trained_by_rizzearch(over, tmp_path):
    model = apply_lora(base(**over), r=4, alpha=8)
    train_a_little(model)
    assert all(m.lora_B[0].abs().max() > 0 for m in lora_layers(model).values())
    save_adapter(model, tmp_path, base_model="tiny-llama")
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(x)[0]
        hf = hf_of(base(**over))
        plain = hf(input_ids=x).logits
        peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
        theirs = peft_model(input_ids=x).logits
    assert (ours - plain).abs().max() > 1e-3, "the adapter changes nothing: the test could not fail"
    assert_close(theirs, ours, atol=1e-4, rtol=1e-4, name="peft logits vs ours")


@pytest.mark.parametrize("targets", [ALL, ["q_proj", "v_proj"]])
def test_an_adapter_made_with_peft_loads_into_our_model(targets, tmp_path):
    hf = hf_of(base())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, cfg).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(tmp_path))
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(7))
    ours = load_adapter(base(), tmp_path)
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
        assert (theirs - base()(x)[0]).abs().max() > 1e-3
        assert_close(ours(x)[0], theirs, atol=1e-4, rtol=1e-4, name=f"our logits with a peft adapter on {targets}")


def test_save_merged_writes_a_plain_hf_folder_with_the_adapter_folded_in(tmp_path):
    import transformers

    from rizzearch.training.lora import save_merged

    from rizzearch.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    model = apply_lora(base(vocab_size=tok.vocab_size), r=4, alpha=8)
    train_a_little(model)
    save_merged(model, tok, tmp_path / "hf")
    assert lora_layers(model), "the model itself keeps its adapters"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert_close(hf(input_ids=x).logits, model(x)[0], atol=1e-4, rtol=1e-4, name="merged export vs adapted model")
