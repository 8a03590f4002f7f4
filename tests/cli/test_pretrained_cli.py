"""Every command on a pretrained model: --init of train/generate/eval/memorization, generate --chat,
rizz chat (streaming, history), rizz export --format hf, and the bad input of these paths.

The model is a tiny random Llama saved as an HF folder with its own byte-level BPE (no <|pad|> of
ours) and a ChatML template (``conftest.tiny_hf``, built by ``pretrained_fixtures``); SmolLM2 runs are in test_smollm2_cli.py."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from pretrained_fixtures import save_tiny, tiny_tokenizer

from rizzearch.cli import main
from rizzearch.errors import ConfigError, DataError
from rizzearch.models import generate, load_pretrained
from rizzearch.training.chat import StreamDecoder, chat_prompt_ids

TRAIN = ["--data.seq_len", "32", "--data.eval_batches", "1", "--train.batch_size", "2", "--train.log_every", "2",
         "--train.eval_every", "2", "--train.ckpt_every", "2", "--progress", "false"]


def err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def greedy_answer(model, tok, messages, n: int) -> str:
    ids = chat_prompt_ids(tok, messages, "test")
    out = generate(model, torch.tensor([ids]), n, eos_id=tok.eos_id)[0].tolist()
    return tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out, skip_special_tokens=True)


def test_generate_and_eval_take_an_hf_folder_with_init(tiny_hf, capsys):
    folder, model, tok = tiny_hf
    assert main(["generate", "--init", str(folder), "--prompt", "the cat", "--max_new_tokens", "6", "--temperature", "0"]) == 0
    ids = tok.encode("the cat")
    want = tok.decode(ids + generate(model, torch.tensor([ids]), 6)[0].tolist())
    assert capsys.readouterr().out.strip() == want.strip()
    # --checkpoint is the same option
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "the cat", "--max_new_tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    assert main(["eval", "--init", str(folder), "--seq_len", "16", "--batch_size", "2", "--max_batches", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == str(folder) and out["val_tokens"] == 64 and 4.0 < out["val_loss"] < 7.0


def test_generate_chat_renders_one_user_turn_and_stops_at_eos(tiny_hf, capsys):
    folder, model, tok = tiny_hf
    want = greedy_answer(model, tok, [{"role": "user", "content": "hi there"}], 8).strip()
    assert main(["generate", "--init", str(folder), "--prompt", "hi there", "--chat", "true", "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == want
    # a bare --chat (no value) is --chat true, wherever it stands
    assert main(["generate", "--init", str(folder), "--chat", "--prompt", "hi there", "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == want
    assert main(["generate", "--init", str(folder), "--prompt", "hi there", "--max_new_tokens", "8", "--temperature", "0", "--chat"]) == 0
    assert capsys.readouterr().out.strip() == want


def test_chat_streams_answers_and_keeps_the_history(tiny_hf, capsys, monkeypatch):
    from rizzearch.training.chat import chat

    folder, model, tok = tiny_hf
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nthe cat\n/exit\nnever read\n"))
    messages = chat(init=str(folder), max_new_tokens=5)
    out = capsys.readouterr().out
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "the cat"
    first = greedy_answer(model, tok, messages[:1], 5)
    second = greedy_answer(model, tok, messages[:3], 5)  # the prompt holds the first exchange
    assert [messages[1]["content"], messages[3]["content"]] == [first, second]
    assert out == f"{first}\n{second}\n"
    # end of input ends it as /exit does
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert len(chat(init=str(folder), max_new_tokens=5, system="be brief")) == 3


def test_stream_decoder_prints_multibyte_characters_once_complete():
    tok = tiny_tokenizer()
    text = "héllo 😀 the end"
    ids = tok.encode(text)
    assert len(ids) > len(text) - 3  # byte tokens: é and 😀 span several ids
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # it waited inside a character


def test_train_init_saves_the_tokenizer_and_resumes_bit_for_bit(tiny_hf, tmp_path):
    folder, _, tok = tiny_hf
    base = ["train", "--init", str(folder), *TRAIN]
    assert main([*base, "--out", str(tmp_path / "a"), "--train.steps", "4"]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--train.steps", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--train.steps", "4", "--resume", "true"]) == 0
    a, b = (tmp_path / r / "checkpoints" / "step_00000004" / "model.safetensors" for r in "ab")
    assert a.read_bytes() == b.read_bytes()
    strip = lambda f: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "elapsed_s", "peak_mem_mb")} for x in f.read_text().splitlines()]  # noqa: E731
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    # the run folder carries the model's own tokenizer and chat template; it loads as a pretrained source
    cfg = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template and cfg["eos_token"] == "<|im_end|>"
    pre = load_pretrained(tmp_path / "a")
    assert pre.chat_template == tok.chat_template and pre.tokenizer.eos_id == tok.eos_id
    assert pre.model.registry_name == "llama"
    # and the weights changed from the initial ones
    assert not torch.equal(pre.model.lm_head.weight, load_pretrained(folder).model.lm_head.weight)
    # a run folder is an --init source too: fine-tuning goes on from its weights and tokenizer
    assert main(["train", "--init", str(tmp_path / "a"), *TRAIN, "--out", str(tmp_path / "c"), "--train.steps", "2"]) == 0
    assert json.loads((tmp_path / "c" / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template


def test_train_init_with_lora_keeps_only_adapters_and_rebuilds_the_base_from_init(tiny_hf, tmp_path):
    """A LoRA fine-tune of a pretrained source: checkpoints hold the adapters only; resume and reload
    rebuild the base from --init (not a random model) and give the same weights as one run."""
    from rizzearch.training.checkpoint import load_checkpoint

    folder, _, _ = tiny_hf
    base = ["train", "--init", str(folder), *TRAIN, "--lora.r", "2", "--lora.alpha", "4"]
    assert main([*base, "--out", str(tmp_path / "a"), "--train.steps", "4"]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--train.steps", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--train.steps", "4", "--resume", "true"]) == 0
    a, b = (tmp_path / r / "checkpoints" / "step_00000004" / "model.safetensors" for r in "ab")
    assert a.read_bytes() == b.read_bytes()
    from safetensors.torch import load_file

    assert all(".lora_" in k for k in load_file(str(a)))
    model, _, _ = load_checkpoint(tmp_path / "a")
    pretrained = load_pretrained(folder).model
    x = torch.randint(0, pretrained.config.vocab_size, (1, 9))
    base_w = dict(pretrained.named_parameters())
    for name, p in model.named_parameters():
        if ".lora_" not in name and name.replace(".base.", ".") in base_w:
            assert torch.equal(p, base_w[name.replace(".base.", ".")]), name
    assert not torch.allclose(model(x)[0], pretrained(x)[0])  # the trained adapters change the logits


def test_train_init_refuses_our_tokenizer_options_and_another_model(tiny_hf, tmp_path, capsys):
    folder, _, _ = tiny_hf
    base = ["train", "--init", str(folder), *TRAIN, "--out", str(tmp_path / "r"), "--train.steps", "2"]
    assert main([*base, "--data.tokenizer", "byte"]) == 2
    assert "data.tokenizer cannot be combined with --init" in err(capsys)
    assert main([*base, "--data.vocab_size", "512"]) == 2
    assert "data.vocab_size cannot be combined with --init" in err(capsys)
    assert main([*base, "--model", "gpt"]) == 2
    line = err(capsys)
    assert "'gpt' given, but --init" in line and "'llama' model" in line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unknown_source_names_the_accepted_kinds(tmp_path, capsys):
    for cmd in (["generate"], ["eval"], ["train", "--train.steps", "1"], ["chat"]):
        assert main([*cmd, "--init", str(tmp_path / "nope")]) == 2
        line = err(capsys)
        assert "nope: not found" in line and "HF model folder" in line and ".gguf" in line and "smollm2" in line
    assert main(["memorization", "--init", str(tmp_path / "nope"), "--documents", str(tmp_path)]) == 2
    assert "nope: not found" in err(capsys)
    assert main(["generate", "--init", "a", "--checkpoint", "b"]) == 2
    assert "give one model source" in err(capsys)
    assert main(["generate"]) == 2
    assert "no model given" in err(capsys)


def test_a_chat_template_that_raises_names_its_source(tmp_path, capsys):
    save_tiny(tmp_path / "m", template="{{ raise_exception('system messages only') }}")
    assert main(["generate", "--init", str(tmp_path / "m"), "--prompt", "x", "--chat", "true"]) == 2
    line = err(capsys)
    assert str(tmp_path / "m") in line and "chat template" in line and "system messages only" in line
    save_tiny(tmp_path / "n", template=None)
    assert main(["generate", "--init", str(tmp_path / "n"), "--prompt", "x", "--chat", "true"]) == 2
    assert "has no chat template" in err(capsys)


def test_chat_prompt_ids_without_template_is_a_config_error():
    with pytest.raises(ConfigError, match="no chat template"):
        chat_prompt_ids(tiny_tokenizer(template=None), [{"role": "user", "content": "x"}], "src")
    with pytest.raises(DataError, match="src: chat template"):
        t = tiny_tokenizer(template="{{ raise_exception('nope') }}")
        chat_prompt_ids(t, [{"role": "user", "content": "x"}], "src")


def test_memorization_takes_an_hf_folder(tiny_hf, tmp_path, capsys):
    folder, _, _ = tiny_hf
    docs = tmp_path / "docs.txt"
    docs.write_text("the cat sat on the mat and then the cat ran away\n\nin the end the hat was in a tin box again\n")
    assert main(["memorization", "--init", str(folder), "--documents", str(docs), "--prompt_tokens", "4", "--new_tokens", "4",
                 "--num_beams", "1", "--out", str(tmp_path / "m"), "--progress", "false"]) == 0
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["documents"]["train"] == 2


@pytest.mark.anchors
def test_export_hf_of_a_trained_run_loads_in_transformers_with_the_same_logits(tiny_hf, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    folder, _, tok = tiny_hf
    assert main(["train", "--init", str(folder), *TRAIN, "--out", str(tmp_path / "run"), "--train.steps", "2"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ours = load_pretrained(tmp_path / "run")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the cat in the hat"
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x)[0], theirs(x).logits, atol=1e-4, rtol=1e-4)
    assert hf_tok.chat_template == tok.chat_template


def test_export_names_the_formats(tiny_hf, tmp_path, capsys):
    folder, _, _ = tiny_hf
    assert main(["export", "--checkpoint", str(folder), "--format", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "unknown export format 'gguf'; formats: hf" in err(capsys)
    tiny_gpt = ["--model_config.n_layer", "1", "--model_config.d_model", "32", "--model_config.n_head", "2",
                "--data.tokenizer", "byte", "--train.steps", "1"]
    assert main(["train", *tiny_gpt, *TRAIN, "--out", str(tmp_path / "gpt")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "gpt"), "--out", str(tmp_path / "y")]) == 2
    assert "a 'gpt' model has no 'hf' form; export format hf exists for the Llama family" in err(capsys)
    assert not (tmp_path / "y").exists()
