"""The lm-eval adapter (model "rizz"): a local WikiText-2 perplexity task gives rizz eval's perplexity,
loglikelihood / generate_until equal direct computations, and over-long requests are refused."""

from __future__ import annotations

import json
import math
from importlib.resources import files

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from rizzearch.data.tokenizer import byte_tokenizer  # noqa: E402
from rizzearch.errors import ConfigError  # noqa: E402
from rizzearch.eval.lm_eval_adapter import RizzLM  # noqa: E402
from rizzearch.models import build_model, generate, save_pretrained  # noqa: E402
from rizzearch.models.convert import to_official_rwkv  # noqa: E402
from rizzearch.training.importer import import_checkpoint  # noqa: E402

TASK = """task: rizz_wikitext2_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def randomised(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) if "time_mix" in name else torch.randn_like(p) * 0.2 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def rwkv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    to_official_rwkv(randomised(build_model("rwkv", vocab_size=300, d_model=32, n_layer=2), 0), root / "src" / "m.pth")
    byte_tokenizer().save(root / "src" / "tokenizer.json")
    import_checkpoint(str(root / "src" / "m.pth"), str(root / "run"))
    return root / "run"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = randomised(build_model("llama", vocab_size=300, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64, max_seq_len=64), 1)
    save_pretrained(model, byte_tokenizer(), folder)
    return folder


def wikitext_text(n_chars: int = 600) -> str:
    text = (files("rizzearch.corpora") / "text" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    return text.strip()[:n_chars]


def test_wikitext_perplexity_equals_rizz_eval(rwkv_run, tmp_path, monkeypatch):
    """lm-eval's loglikelihood_rolling (state carried over chunks of 64 tokens) == rizz eval over one window."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rizzearch.training.recipes import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    text = wikitext_text()
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "rizz_wikitext2_tiny.yaml").write_text(TASK.format(data=tmp_path / "docs.jsonl"))
    res = lm_eval.simple_evaluate(
        model="rizz", model_args=f"checkpoint={rwkv_run},chunk=64", tasks=["rizz_wikitext2_tiny"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )["results"]["rizz_wikitext2_tiny"]
    n_bytes = len(text.encode("utf-8"))
    logprob = -res["bits_per_byte,none"] * math.log(2) * n_bytes

    # rizz eval on "<|endoftext|>" + text: the same tokens predicted from the same context
    (tmp_path / "eval.txt").write_text("<|endoftext|>" + text, encoding="utf-8")
    n_tokens = len(byte_tokenizer().encode(text))
    ours = evaluate(str(rwkv_run), source=str(tmp_path / "eval.txt"), split="all", val_fraction=0.0, seq_len=n_tokens, batch_size=1)
    assert ours["val_tokens"] == n_tokens
    assert math.exp(-logprob / n_tokens) == pytest.approx(ours["val_ppl"], rel=1e-5)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-logprob / len(text.split())), rel=1e-6)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_and_generate_equal_direct_computation(llama_folder):
    lm = RizzLM(checkpoint=str(llama_folder))
    tok, model = lm.tok, lm.model
    ctx, cont = "The cat", " sat on the mat"
    [(ll, greedy)] = lm.loglikelihood([req("loglikelihood", ctx, cont)])
    ids = tok.encode(ctx + cont)
    n = len(tok.encode(cont))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1], -1)
    picked = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert ll == pytest.approx(float(picked[-n:].sum()), rel=1e-5)
    assert greedy == bool((logp.argmax(-1)[-n:] == torch.tensor(ids[-n:])).all())

    [out] = lm.generate_until([req("generate_until", ctx, {"until": ["\n\n"], "max_gen_toks": 8})])
    want = generate(model, torch.tensor([tok.encode(ctx)]), 8, temperature=0.0)
    full = tok.decode(want[0].tolist())
    assert out == full.split("\n\n")[0] and len(out) <= len(full)


def test_rolling_windows_for_attention_models(llama_folder):
    """max_seq_len 64 < the text: lm-eval's disjoint windows, each its own forward pass; a big max_length gives one pass."""
    text = wikitext_text(200)
    windowed = RizzLM(checkpoint=str(llama_folder)).loglikelihood_rolling([req("loglikelihood_rolling", text)])[0]
    one_pass = RizzLM(checkpoint=str(llama_folder), max_length=10_000).loglikelihood_rolling([req("loglikelihood_rolling", text)])[0]
    assert math.isfinite(windowed) and windowed != pytest.approx(one_pass, rel=1e-6)
    lm = RizzLM(checkpoint=str(llama_folder), max_length=10_000)
    ids = [lm.tok.eot_id] + lm.tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids]))[0][0, :-1], -1)
    assert one_pass == pytest.approx(float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum()), rel=1e-5)


def test_requests_longer_than_the_context_are_refused(llama_folder):
    lm = RizzLM(checkpoint=str(llama_folder))
    long = "x" * 100
    with pytest.raises(ConfigError, match=r"loglikelihood request .*: 10\d tokens, longer than the model's context max_seq_len=64"):
        lm.loglikelihood([req("loglikelihood", long, " y")])
    with pytest.raises(ConfigError, match=r"generate_until request .*max_gen_toks=60.*max_seq_len=64"):
        lm.generate_until([req("generate_until", "hello", {"until": ["\n"], "max_gen_toks": 60})])
    with pytest.raises(ConfigError, match="chunk must be >= 1"):
        RizzLM(checkpoint=str(llama_folder), chunk=0)
