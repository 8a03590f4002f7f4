"""The tokenizer stored in a GGUF file's ``tokenizer.ggml.*`` fields, as an HF ``tokenizers`` object.

GGUF keeps a BPE vocabulary as parallel arrays (``tokens``, ``token_type``, ``merges``) plus the
ids of bos/eos/pad and the name of the pre-tokenizer (``tokenizer.ggml.pre``), i.e. which split
regex the original HF tokenizer used. ``tokenizer_from_gguf_fields`` rebuilds the byte-level BPE
(GPT-2 style, Radford et al. 2019 sec. 2.2) with that pre-tokenizer, adds the control and
user-defined tokens as special tokens, and wraps it in our ``Tokenizer`` with the file's ids.
"""

from __future__ import annotations

from rizzearch.data.tokenizer import Tokenizer
from rizzearch.errors import DataError

# token_type values (llama.cpp's llama_token_type): 3 = control, 4 = user defined
CONTROL, USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the split regex of the original tokenizer (None: GPT-2's, inside ByteLevel)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "default": ("gpt2", None),
    "gpt2": ("gpt2", None),
    "smollm": ("digits+gpt2", None),
    "starcoder": ("digits+gpt2", None),
    "refact": ("digits+gpt2", None),
    "llama-bpe": ("regex", _LLAMA3),
    "llama3": ("regex", _LLAMA3),
    "smaug-bpe": ("regex", _LLAMA3),
    "qwen2": ("regex", _QWEN2),
}


def _pre_tokenizer(pre: str, where: str):
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        raise DataError(f"{where}: tokenizer.ggml.pre = {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    kind, regex = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "regex")
    if kind == "gpt2":
        return byte_level
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, byte_level])


def tokenizer_from_gguf_fields(fields: dict, where: str = "gguf") -> Tokenizer:
    """Our Tokenizer from a GGUF file's ``tokenizer.ggml.*`` field values (plain Python values)."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise DataError(
            f"{where}: tokenizer.ggml.model = {kind!r} is not supported (only byte-level BPE, 'gpt2'; "
            "SentencePiece 'llama' vocabularies are not)"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise DataError(f"{where}: tokenizer.ggml.tokens / tokenizer.ggml.merges missing")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise DataError(f"{where}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"), where)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens(special)
    eos = fields.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise DataError(f"{where}: tokenizer.ggml.eos_token_id missing")
    return Tokenizer(
        tok,
        eos_id=int(eos),
        pad_id=fields.get("tokenizer.ggml.padding_token_id"),
        bos_id=fields.get("tokenizer.ggml.bos_token_id"),
        chat_template=fields.get("tokenizer.chat_template"),
    )
