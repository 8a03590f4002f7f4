"""Parity with TRL: our ORPO loss and metrics == ``trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics``.

A tiny random Llama (built locally, no hub access), a byte-level tokenizer wrapped for
transformers, one batch of pairs of different lengths; fp32; ``nll_mode="prompt+response"`` (what
TRL computes). Values must agree to 1e-6, and so must the parameter gradients of the loss.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from rizzearch.data.preference import PreferencePair, encode_pairs  # noqa: E402
from rizzearch.data.tokenizer import byte_tokenizer  # noqa: E402
from rizzearch.objectives.orpo import TRL_METRICS  # noqa: E402
from rizzearch.testing import assert_close  # noqa: E402
from rizzearch.training.preference import orpo_batch_loss  # noqa: E402

pytestmark = pytest.mark.anchors

LAM = 0.25
ROWS = [
    {"prompt": "Q: 2+2=", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Q: capital of France?", "chosen": " Paris, of course.", "rejected": " Rome"},
    {"prompt": "Hello there, how", "chosen": " are you", "rejected": " is it going today?"},
    {"prompt": "List three colours:", "chosen": " red, green, blue", "rejected": " red"},
]


class _HFAsCausalLM(torch.nn.Module):
    """Our model contract (tokens -> (logits, state)) over a transformers causal LM."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, tokens, state=None, attention_mask=None):
        return self.hf(tokens, attention_mask=attention_mask).logits, None


@pytest.fixture(scope="module")
def trl_and_batch(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning on import
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = byte_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.to_json()), eos_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_id, eos_token_id=tok.eot_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg).float().eval()
    args = ORPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=LAM, max_length=128, bf16=False, report_to=[], use_cpu=True,
                      remove_unused_columns=False, gradient_checkpointing=False, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS), processing_class=hf_tok)
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    ours = encode_pairs([PreferencePair((("user", r["prompt"]),), r["chosen"], r["rejected"]) for r in ROWS], tok, _Verbatim(), max_length=128)
    return trainer, model, trl_batch, ours.tensors


class _Verbatim:
    """Prompt and responses exactly as given (TRL tokenizes the raw strings)."""

    def render_prompt(self, messages):
        return messages[0][1]

    def render_response(self, text):
        return text


def test_same_tokens_as_trl(trl_and_batch):
    _, _, trl_batch, ours = trl_and_batch
    for side in ("chosen", "rejected"):
        for i in range(len(ROWS)):
            att = ours[f"{side}_attention_mask"][i]
            trl_att = trl_batch[f"{side}_attention_mask"][i].bool()
            assert ours[f"{side}_input_ids"][i][att].tolist() == trl_batch[f"{side}_input_ids"][i][trl_att].tolist()
            labels = trl_batch[f"{side}_labels"][i]
            assert ours[f"{side}_input_ids"][i][ours[f"{side}_response_mask"][i]].tolist() == labels[labels != -100].tolist()


def test_loss_metrics_and_gradients_match_trl(trl_and_batch):
    trainer, model, trl_batch, ours = trl_and_batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch)
    trl_grads = torch.autograd.grad(trl_loss, list(model.parameters()))

    loss, metrics = orpo_batch_loss(_HFAsCausalLM(model), ours, lam=LAM, nll_mode="prompt+response")
    grads = torch.autograd.grad(loss, list(model.parameters()))

    assert_close(loss.detach(), trl_loss.detach(), atol=1e-6, rtol=1e-6, name="loss")
    for trl_name, our_name in TRL_METRICS.items():
        assert_close(torch.tensor(float(metrics[our_name])), torch.tensor(trl_metrics[trl_name]), atol=1e-6, rtol=1e-6,
                     name=f"{our_name} vs TRL {trl_name}")
    for (name, _), g, tg in zip(model.named_parameters(), grads, trl_grads):
        assert_close(g, tg, atol=1e-6, rtol=1e-5, name=f"grad {name}")
