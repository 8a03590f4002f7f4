"""rizzearch models inside EleutherAI's lm-evaluation-harness, as model ``"rizz"``.

lm-eval (0.4.x) finds models only through its own registry (``lm_eval.api.registry.register_model``;
it has no entry-point discovery), so importing this module registers ``"rizz"``. Run the harness
through the module, which registers and then hands its arguments to lm-eval's own CLI::

    python -m rizzearch.eval.lm_eval_adapter run --model rizz --model_args checkpoint=RUN \\
        --tasks wikitext --include_path my_tasks/

or from Python: ``import rizzearch.eval.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="rizz", ...)``.

``checkpoint`` is anything ``load_pretrained`` reads: a run folder (``rizz import`` / ``rizz train``),
an HF folder, a .gguf, an RWKV-4 .pth, ``smollm2``. Requests run one at a time (batch 1). Other
model args: ``device`` (a CUDA device without CUDA falls back to the CPU with a warning, since
lm-eval's CLI defaults to ``cuda:0``), ``max_length`` (context limit override), ``chunk`` (tokens per
forward call when the state is carried), ``dtype``.

- ``loglikelihood``: log p(continuation | context), summed, and whether it is the greedy continuation.
- ``loglikelihood_rolling``: log p(text) with the first token predicted from the end-of-text token.
  Models without a context limit (RWKV, xLSTM, our GPT) read the text in chunks of ``chunk`` tokens
  and carry their state across chunks, so memory stays constant with the length of the text;
  models with one (Llama ``max_seq_len``, or ``max_length=``) use lm-eval's disjoint rolling windows.
- ``generate_until``: greedy (or sampled, ``do_sample``/``temperature``) until a stop string or
  ``max_gen_toks``.

A ``loglikelihood`` or ``generate_until`` request longer than a model's context limit is refused
with an error naming the request, its token count and the limit.
"""

from __future__ import annotations

import torch

from rizzearch.errors import ConfigError

try:  # lm-eval is the optional extra ``lmeval``
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    LM, register_model = object, None


class RizzLM(LM):
    """An lm-eval ``LM`` over one of our models; see the module docstring."""

    def __init__(self, checkpoint: str, device: str = "cpu", max_length: int | None = None, chunk: int = 512, dtype: str | None = None, **_unused):
        from rizzearch.models.pretrained import load_pretrained

        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes device cuda:0 unless told otherwise; like its HF model, run on the CPU
            import sys

            print(f"rizz lm-eval model: device {device!r} requested but torch has no CUDA; using cpu", file=sys.stderr)
            device = "cpu"
        pre = load_pretrained(checkpoint, dtype=dtype, device=device)
        if pre.tokenizer is None:
            raise ConfigError(f"{checkpoint}: no tokenizer next to the checkpoint; lm-eval needs one")
        self.model, self.tok, self.source, self._device = pre.model, pre.tokenizer, pre.source, torch.device(device)
        limit = max_length if max_length is not None else getattr(self.model.config, "max_seq_len", None)
        self.max_length = int(limit) if limit is not None else None
        self.chunk = int(chunk)
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {chunk}")

    # ------------------------------------------------------------------------------------------
    # scoring

    @torch.no_grad()
    def _token_logprobs(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(tokens[i+1] | tokens[:i+1]), is-argmax) for every i, each (len(tokens) - 1,).

        The sequence is read in chunks with the model's state carried across them (constant
        memory for recurrent models)."""
        lps, greedy, state = [], [], None
        x = torch.tensor(tokens, device=self._device)
        for start in range(0, len(tokens) - 1, self.chunk):
            inp, tgt = x[start : start + self.chunk], x[start + 1 : start + 1 + self.chunk]
            inp = inp[: len(tgt)]
            logits, state = self.model(inp[None], state=state)  # (1, t, V)
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            lps.append(logp.gather(-1, tgt[:, None])[:, 0])
            greedy.append(logp.argmax(-1) == tgt)
        return torch.cat(lps), torch.cat(greedy)

    def _check_length(self, n: int, what: str) -> None:
        if self.max_length is not None and n > self.max_length:
            raise ConfigError(
                f"lm-eval {what}: {n} tokens, longer than the model's context max_seq_len={self.max_length} "
                f"({self.source}); use a task with shorter inputs or a recurrent model"
            )

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split as lm-eval's own models split them."""
        if context == "":
            return [self.tok.eot_id], self.tok.encode(continuation)
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            tokens = ctx + cont
            self._check_length(len(tokens) - 1, f"loglikelihood request {context[:40]!r}...")
            lp, greedy = self._token_logprobs(tokens)
            n = len(cont)
            out.append((float(lp[-n:].sum()) if n else 0.0, bool(greedy[-n:].all()) if n else True))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            ids = self.tok.encode(text)
            if self.max_length is None:  # one pass, state carried across chunks
                out.append(float(self._token_logprobs([self.tok.eot_id] + ids)[0].sum()))
                continue
            total = 0.0
            windows = get_rolling_token_windows(ids, prefix_token=self.tok.eot_id, max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                lp, _ = self._token_logprobs(ctx + cont)
                total += float(lp[-len(cont):].sum())
            out.append(total)
        return out

    # ------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def _generate_one(self, context: str, until: list[str], max_gen: int, temperature: float) -> str:
        ids = self.tok.encode(context) or [self.tok.eot_id]
        self._check_length(len(ids) + max_gen, f"generate_until request {context[:40]!r}... (+ max_gen_toks={max_gen})")
        logits, state = self.model.prefill(torch.tensor([ids], device=self._device))  # (1, V)
        new = []
        for _ in range(max_gen):
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1)[:, 0]
            else:
                nxt = logits.argmax(-1)
            if int(nxt) == self.tok.eos_id:
                break
            new.append(int(nxt))
            text = self.tok.decode(new)
            if any(u in text for u in until):
                break
            logits, state = self.model.step(nxt, state)
        text = self.tok.decode(new)
        cut = min((text.index(u) for u in until if u in text), default=len(text))
        return text[:cut]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            out.append(self._generate_one(context, until, int(kwargs.get("max_gen_toks", 256)), temperature))
        return out


if register_model is not None:
    register_model("rizz")(RizzLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with ``--model rizz`` registered."""
    import sys

    if register_model is None:
        raise ConfigError("lm-eval is not installed: pip install 'rizzearch[lmeval]' (or pip install lm-eval)")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
