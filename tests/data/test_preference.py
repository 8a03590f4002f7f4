"""Preference data: JSONL and HH-RLHF parsing, malformed rows, chat template, truncation budget."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from rizzearch import corpora
from rizzearch.data.preference import (
    ChatTemplate,
    PreferencePair,
    check_budget,
    encode_pairs,
    parse_hh_dialogue,
    read_preferences,
    validate_batch,
)
from rizzearch.data.tokenizer import byte_tokenizer
from rizzearch.errors import ConfigError, DataError, ShapeError


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_reads_pairs_jsonl_with_string_and_message_prompts(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": " Hello.", "rejected": "Go away."},
        "",
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}], "chosen": "Hey", "rejected": "No"},
    ])
    pairs, problems = read_preferences(f)
    assert problems == []
    assert pairs[0].messages == (("user", "Hi?"),) and pairs[0].chosen == "Hello."
    assert pairs[1].messages == (("system", "Be kind."), ("user", "Hi?"))
    assert pairs[1].where.endswith("p.jsonl:3")


@pytest.mark.parametrize("row,field,problem", [
    ("{not json", None, "not valid JSON"),
    ('["a"]', None, "expected a JSON object"),
    ({"chosen": "a", "rejected": "b", "prompt": ""}, "prompt", "empty"),
    ({"prompt": "q", "rejected": "b"}, "chosen", "missing"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen", "empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "rejected", "identical to chosen"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0]", "expected"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, row, field, problem):
    f = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        read_preferences(f, format="pairs")
    msg = str(e.value)
    assert f"{f}:2" in msg and problem in msg
    if field:
        assert f"field {field!r}" in msg
    pairs, problems = read_preferences(f, format="pairs", on_error="skip")
    assert len(pairs) == 1 and len(problems) == 1 and f"{f}:2" in problems[0]


def test_nothing_usable_and_missing_file(tmp_path):
    f = _write(tmp_path / "x.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match="no usable preference pairs.*identical"):
        read_preferences(f, on_error="skip")
    with pytest.raises(DataError, match="not found"):
        read_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="on_error"):
        read_preferences(f, on_error="ignore")


def test_hh_format(tmp_path):
    dialogue = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    rows = [
        {"chosen": dialogue + " Fine, thanks.", "rejected": dialogue + " Go away."},
        {"chosen": dialogue + " Fine.", "rejected": "\n\nHuman: Other\n\nAssistant: x"},
        {"chosen": dialogue + " ", "rejected": dialogue + " Go away."},
    ]
    f = tmp_path / "hh.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write("".join(json.dumps(r) + "\n" for r in rows))
    pairs, problems = read_preferences(f, on_error="skip")
    assert len(pairs) == 1
    p = pairs[0]
    assert p.messages == (("user", "Hi there"), ("assistant", "Hello!"), ("user", "How are you?"))
    assert (p.chosen, p.rejected) == ("Fine, thanks.", "Go away.")
    assert "hh.jsonl.gz:2: field 'rejected'" in problems[0] and "differs" in problems[0]
    assert "hh.jsonl.gz:3: field 'chosen': empty final Assistant response" in problems[1]


def test_bundled_hh_rlhf_split_reports_its_bad_rows():
    path = corpora.path("hh-rlhf-harmless-test")
    pairs, problems = read_preferences("hh-rlhf-harmless-test", on_error="skip", limit=120)
    assert len(pairs) == 120
    assert any(p.startswith(f"{path}:87: field 'chosen'") for p in problems)
    assert all(p.chosen != p.rejected and p.messages for p in pairs)
    with pytest.raises(DataError, match=":87: field 'chosen'"):
        read_preferences("hh-rlhf-harmless-test", on_error="raise", limit=120)


def test_parse_hh_dialogue():
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant: b") == [("user", "a"), ("assistant", "b")]


def test_chat_template_rendering():
    t = ChatTemplate()
    msgs = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye?"))
    assert t.render_prompt(msgs) == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye?\nAssistant:"
    assert t.render_response("Bye.") == " Bye."


def test_encoding_masks_and_shared_prompt(tok):
    pairs = [PreferencePair((("user", "Hi"),), "Hello!", "No"), PreferencePair((("user", "Sky colour?"),), "Blue", "Green")]
    ps = encode_pairs(pairs, tok, "chat", max_length=64)
    t = ps.tensors
    for i, pr in enumerate(pairs):
        prompt = tok.encode("User: " + pr.messages[0][1] + "\nAssistant:")
        for side in ("chosen", "rejected"):
            att, resp = t[f"{side}_attention_mask"][i], t[f"{side}_response_mask"][i]
            ids = t[f"{side}_input_ids"][i]
            assert ids[: len(prompt)].tolist() == prompt and not resp[: len(prompt)].any()
            want = tok.encode(" " + getattr(pr, side)) + [tok.eot_id]
            assert ids[resp].tolist() == want
            assert int(att.sum()) == len(prompt) + len(want)
            assert (ids[~att] == tok.pad_id).all()
    validate_batch(t)


def test_truncation_budget_never_empties_a_response(tok):
    long_prompt = "word " * 100
    pairs = [PreferencePair((("user", long_prompt),), "x" * 50, "short")]
    ps = encode_pairs(pairs, tok, "chat", max_length=40, max_response_length=12)
    t = ps.tensors
    assert int(t["chosen_attention_mask"].sum()) <= 40 and int(t["rejected_attention_mask"].sum()) <= 40
    assert int(t["chosen_response_mask"].sum()) == 12  # cut to the per-response budget
    assert t["rejected_input_ids"][0][t["rejected_response_mask"][0]].tolist() == tok.encode(" short") + [tok.eot_id]
    # the prompt keeps its end (most recent text) and at least one token
    prompt_len = int((t["chosen_attention_mask"][0] & ~t["chosen_response_mask"][0]).sum())
    assert prompt_len == 40 - 12
    assert tok.decode(t["chosen_input_ids"][0][:prompt_len].tolist()).endswith("word \nAssistant:")
    assert ps.stats["truncated_prompts"] == 1 and ps.stats["truncated_responses"] == 1


def test_budget_checked_at_config_time():
    assert check_budget(100, None) == 50
    for bad in (0, 100, 150):
        with pytest.raises(ConfigError, match="max_response_length"):
            check_budget(100, bad)
    with pytest.raises(ConfigError, match="max_length"):
        check_budget(1, None)


def test_identical_after_truncation_is_reported(tok):
    pairs = [PreferencePair((("user", "q"),), "same start then A", "same start then B", "f.jsonl:7"),
             PreferencePair((("user", "q"),), "yes", "no", "f.jsonl:8")]
    with pytest.raises(DataError, match="f.jsonl:7: field 'rejected': identical to chosen after truncation"):
        encode_pairs(pairs, tok, "chat", max_length=64, max_response_length=5)
    ps = encode_pairs(pairs, tok, "chat", max_length=64, max_response_length=5, on_error="skip")
    assert len(ps) == 1 and ps.stats["dropped"] == 1


def test_split_and_validate_batch(tok):
    pairs = [PreferencePair((("user", f"q{i}"),), f"a{i}", f"b{i}") for i in range(20)]
    ps = encode_pairs(pairs, tok, "plain", max_length=16)
    train, val = ps.split(0.25, seed=0)
    assert len(train) == 15 and len(val) == 5
    assert not set(p.messages for p in train.pairs) & set(p.messages for p in val.pairs)
    bad = dict(ps.tensors)
    bad["chosen_response_mask"] = bad["chosen_response_mask"] & bad["chosen_attention_mask"].logical_not()
    with pytest.raises(ShapeError, match="all-masked"):
        validate_batch(bad)
    with pytest.raises(ConfigError, match="template"):
        encode_pairs(pairs, tok, "fancy")
    assert torch.equal(ps.subset([3]).tensors["chosen_input_ids"][0][:4], ps.tensors["chosen_input_ids"][3][:4])


# ----------------------------------------------------------------------------------------------
# A pretrained tokenizer with its own chat template (and no pad token)

LLAMA3ISH = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
             "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _templated_tokenizer(template=LLAMA3ISH):
    from rizzearch.data.gguf import tokenizer_from_gguf_fields
    from rizzearch.data.tokenizer import _bytes_to_unicode

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tokens = specials + [_bytes_to_unicode()[b] for b in range(256)]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [3] * 4 + [1] * 256, "tokenizer.ggml.merges": [],
              "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    if template is not None:
        fields["tokenizer.chat_template"] = template
    return tokenizer_from_gguf_fields(fields)


def test_templated_tokenizer_pairs_start_with_the_template_rendering_and_pad_with_eos():
    from rizzearch.data.chat import apply_chat_template

    tok = _templated_tokenizer()
    assert tok.token(tok.pad_id) == "<|eot_id|>"  # no pad token of its own (and none of ours)
    pairs = [PreferencePair((("system", "be kind"), ("user", "hi")), "hello there", "go away"),
             PreferencePair((("user", "2+2?"),), "4", "five, probably")]
    ps = encode_pairs(pairs, tok, max_length=128)  # template "auto": the model's own
    for i, pr in enumerate(pairs):
        prompt = tok.encode(apply_chat_template(tok, [{"role": r, "content": c} for r, c in pr.messages], add_generation_prompt=True))
        assert prompt[0] == tok.bos_id and tok.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        for s in ("chosen", "rejected"):
            want = prompt + tok.encode(getattr(pr, s)) + [tok.eos_id]
            ids = ps.tensors[f"{s}_input_ids"][i]
            n = int(ps.tensors[f"{s}_attention_mask"][i].sum())
            assert ids[:n].tolist() == want
            assert (ids[n:] == tok.eos_id).all()  # padding is the eos id
            resp = ps.tensors[f"{s}_response_mask"][i]
            assert resp[len(prompt):n].all() and not resp[:len(prompt)].any()
    # "chat" keeps today's plain format; "model" without a template is refused
    plain = encode_pairs(pairs, tok, template="chat", max_length=128)
    assert tok.decode(plain.tensors["chosen_input_ids"][1][:10].tolist()).startswith("User: 2+2?")
    with pytest.raises(ConfigError, match="no chat template"):
        encode_pairs(pairs, _templated_tokenizer(None), template="model")


def test_a_template_that_raises_is_named():
    tok = _templated_tokenizer("{{ raise_exception('only user turns') }}")
    tok.chat_template_source = "model.gguf: chat template"
    with pytest.raises(DataError, match="model.gguf: chat template.*only user turns"):
        encode_pairs([PreferencePair((("user", "x"),), "a", "b")], tok)
