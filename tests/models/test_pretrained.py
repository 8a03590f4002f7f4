"""load_pretrained / save_pretrained: HF folders, GGUF files (written here with the gguf writer), run folders, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from rizzearch.data.gguf import tokenizer_from_gguf_fields
from rizzearch.errors import CheckpointError, ConfigError, DataError, ShapeError
from rizzearch.models import build_model, load_pretrained, save_pretrained
from rizzearch.models.gguf import gguf_name, permute_qk
from rizzearch.models.hf_llama import state_dict_to_hf
from rizzearch.testing import assert_close

gguf = pytest.importorskip("gguf")

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def vocab_fields(pad: bool = True) -> dict:
    """tokenizer.ggml.* fields of a tiny byte-level BPE with its own special tokens (none of ours)."""
    from rizzearch.data.tokenizer import _bytes_to_unicode

    symbols = [_bytes_to_unicode()[b] for b in range(256)]
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIALS + symbols + merged
    f = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 3,
        "tokenizer.chat_template": TEMPLATE,
    }
    if pad:
        f["tokenizer.ggml.padding_token_id"] = 1
    return f


def tiny(vocab: int, **kw):
    torch.manual_seed(0)
    m = build_model("llama", vocab_size=vocab, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=96,
                    rope_theta=5000.0, norm_eps=1e-5, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_gguf_fields(vocab_fields())


def test_gguf_vocabulary_tokenizes_and_names_its_ids(tok):
    assert tok.is_pretrained and (tok.eos_id, tok.pad_id, tok.bos_id) == (3, 1, 0)
    ids = tok.encode("<|im_start|> the cat 2024")
    assert ids[0] == 2 and tok.decode(ids) == "<|im_start|> the cat 2024"
    assert tok.token(ids[1]) == "Ġthe"  # merges applied in order: Ġ t, h e, Ġt he
    assert len([i for i in ids if tok.token(i) in "2024"]) == 4  # smollm splits digits one by one
    assert set(tok.special_ids) == {0, 1, 2, 3}
    assert tok.chat_template == TEMPLATE


def test_tokenizer_without_pad_pads_with_eos():
    t = tokenizer_from_gguf_fields(vocab_fields(pad=False))
    assert t.pad_id == t.eos_id == 3


def test_tokenizer_with_out_of_range_eos_is_named():
    f = vocab_fields()
    f["tokenizer.ggml.eos_token_id"] = 10_000
    with pytest.raises(DataError, match="eos_id = 10000 is outside the vocabulary"):
        tokenizer_from_gguf_fields(f)


# ----------------------------------------------------------------------------------------------
# HF folders


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tok):
    model = tiny(tok.vocab_size, tie_embeddings=False)
    folder = tmp_path_factory.mktemp("hf")
    save_pretrained(model, tok, folder)
    return model, folder


def test_hf_folder_has_the_files(hf_folder):
    _, folder = hf_folder
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / f).is_file(), f
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE and tcfg["eos_token"] == "<|im_end|>"


def test_hf_folder_round_trips(hf_folder, tok):
    model, folder = hf_folder
    p = load_pretrained(folder)
    assert p.format == "hf" and p.chat_template == TEMPLATE
    assert (p.tokenizer.eos_id, p.tokenizer.pad_id, p.tokenizer.bos_id) == (3, 1, 0)
    x = torch.randint(0, tok.vocab_size, (2, 13))
    with torch.no_grad():
        assert_close(p.model(x)[0], model(x)[0], atol=0, rtol=0, name="reloaded logits")
    assert p.tokenizer.encode("the cat") == tok.encode("the cat")


@pytest.mark.anchors
def test_transformers_loads_our_folder(hf_folder, tok):
    transformers = pytest.importorskip("transformers")
    model, folder = hf_folder
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(0, tok.vocab_size, (2, 13))
    with torch.no_grad():
        assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4, name="transformers logits of our folder")
    htok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>the theatre in 1999 <|im_end|>"
    assert htok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert htok.eos_token_id == tok.eos_id and htok.pad_token_id == tok.pad_id
    msgs = [{"role": "user", "content": "hi"}]
    assert htok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_sharded_safetensors_and_bin(tmp_path, hf_folder):
    from safetensors.torch import save_file

    model, folder = hf_folder
    sd = state_dict_to_hf(model.state_dict(), model.config)
    names = sorted(sd)
    shard = tmp_path / "sharded"
    shard.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (shard / f).write_bytes((folder / f).read_bytes())
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(shard / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        want = model(x)[0]
        assert torch.equal(load_pretrained(shard).model(x)[0], want)
        (shard / "model.safetensors.index.json").unlink()
        for f in shard.glob("*.safetensors"):
            f.unlink()
        torch.save(sd, shard / "pytorch_model.bin")
        assert torch.equal(load_pretrained(shard).model(x)[0], want)


def test_dtype_bf16(hf_folder):
    _, folder = hf_folder
    p = load_pretrained(folder, dtype="bfloat16")
    assert next(p.model.parameters()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Run folders


def test_run_folder(tmp_path, tok):
    from rizzearch.training.checkpoint import model_meta, save_checkpoint

    model = tiny(tok.vocab_size)
    save_checkpoint(tmp_path / "checkpoints", 5, model, model_meta(model), None)
    tok.save(tmp_path / "tokenizer.json")
    p = load_pretrained(tmp_path)
    assert p.format == "run" and p.chat_template == TEMPLATE and p.tokenizer.eos_id == 3
    assert p.model.lm_head.weight is p.model.embed.weight  # tying survives
    x = torch.randint(0, tok.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(p.model(x)[0], model(x)[0])


# ----------------------------------------------------------------------------------------------
# GGUF files


def write_gguf(path, model, fields: dict, qtype=None, arch: str = "llama", override: dict | None = None):
    """Write ``model`` as llama.cpp's converter would: q/k rows permuted, matrices in ``qtype`` (None: F32)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_token_merges(fields["tokenizer.ggml.merges"])
    w.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(fields["tokenizer.chat_template"])
    for name, t in state_dict_to_hf(model.state_dict(), cfg).items():
        a = t.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = permute_qk(a, cfg.n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = permute_qk(a, cfg.n_kv_head)
        kind = (override or {}).get(name)
        if kind is not None:
            w.add_tensor(gguf_name(name), a.astype(np.float64))
        elif qtype is not None and a.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_float_round_trip_is_exact(tmp_path):
    model = tiny(len(vocab_fields()["tokenizer.ggml.tokens"]))
    p = load_pretrained(write_gguf(tmp_path / "m.gguf", model, vocab_fields()))
    assert p.format == "gguf" and p.chat_template == TEMPLATE and p.tokenizer.eos_id == 3
    assert p.model.config == model.config
    for (k, a), b in zip(model.state_dict().items(), p.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("qname,tol", [("Q8_0", 0.1), ("Q4_1", 1.0)])
def test_gguf_quantized_round_trip(tmp_path, qname, tol):
    qtype = getattr(gguf.GGMLQuantizationType, qname)
    model = tiny(len(vocab_fields()["tokenizer.ggml.tokens"]))
    p = load_pretrained(write_gguf(tmp_path / "q.gguf", model, vocab_fields(), qtype=qtype))
    cfg = model.config
    theirs = state_dict_to_hf(p.model.state_dict(), cfg)
    changed = 0
    for name, t in state_dict_to_hf(model.state_dict(), cfg).items():
        w = t.numpy()
        if w.ndim == 1:
            assert np.array_equal(theirs[name].numpy(), w), name
            continue
        heads = cfg.n_head if "q_proj" in name else cfg.n_kv_head if "k_proj" in name else None
        if heads:  # quantized in llama.cpp's row order, read back in ours
            want = w.reshape(heads, 2, -1, w.shape[1]).swapaxes(1, 2).reshape(w.shape)  # interleaved rows
            want = gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
            want = want.reshape(heads, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        else:
            want = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        np.testing.assert_array_equal(theirs[name].numpy(), want, err_msg=name)
        changed += not np.array_equal(want, w)
    assert changed > 0  # the quantization did change the weights
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        got, want = p.model(x)[0], model(x)[0]
    assert_close(got, want, atol=tol * want.std().item(), rtol=0, name=f"{qname} logits vs float")


def test_gguf_unknown_tensor_type_is_named(tmp_path):
    model = tiny(len(vocab_fields()["tokenizer.ggml.tokens"]))
    path = write_gguf(tmp_path / "f64.gguf", model, vocab_fields(), override={"model.norm.weight": "F64"})
    with pytest.raises(CheckpointError, match=r"f64.gguf: tensor 'output_norm.weight' has type F64, not supported"):
        load_pretrained(path)


def test_truncated_gguf_is_named(tmp_path):
    model = tiny(len(vocab_fields()["tokenizer.ggml.tokens"]))
    path = write_gguf(tmp_path / "t.gguf", model, vocab_fields())
    data = path.read_bytes()
    for cut in (len(data) // 2, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="t.gguf"):
            load_pretrained(path)


def test_gguf_unsupported_architecture_is_named(tmp_path):
    model = tiny(len(vocab_fields()["tokenizer.ggml.tokens"]))
    path = write_gguf(tmp_path / "g.gguf", model, vocab_fields(), arch="gemma")
    with pytest.raises(ConfigError, match=r"g.gguf: general.architecture = 'gemma' is not supported; supported: llama, qwen2"):
        load_pretrained(path)


# ----------------------------------------------------------------------------------------------
# Bad HF folders


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_pretrained(tmp_path / "nope")


def _copy(folder, dest):
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_unsupported_architecture_is_named(tmp_path, hf_folder):
    folder = _copy(hf_folder[1], tmp_path / "gpt2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: architecture 'GPT2LMHeadModel' .* not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_pretrained(folder)


def test_config_weight_mismatch_names_tensor_and_shapes(tmp_path, hf_folder):
    folder = _copy(hf_folder[1], tmp_path / "wide")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\) but the config implies \(128, 64\)"):
        load_pretrained(folder)


def test_truncated_safetensors_is_named(tmp_path, hf_folder):
    folder = _copy(hf_folder[1], tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted or truncated"):
        load_pretrained(folder)


def test_save_pretrained_refuses_other_models(tmp_path, tok):
    with pytest.raises(ConfigError, match="GPT has no HF format"):
        save_pretrained(build_model("gpt", n_layer=1, d_model=32, n_head=2), tok, tmp_path)


def test_pretrained_tokenizer_save_load_keeps_ids_and_template(tmp_path, tok):
    from rizzearch.data.tokenizer import Tokenizer, byte_tokenizer

    tok.save(tmp_path / "tokenizer.json")
    back = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (back.eos_id, back.pad_id, back.bos_id, back.chat_template) == (3, 1, 0, TEMPLATE)
    assert back.encode("<|im_start|> the cat") == tok.encode("<|im_start|> the cat")
    ours = byte_tokenizer()  # our own tokenizer keeps <|endoftext|> / <|pad|>, nothing else written
    ours.save(tmp_path / "ours" / "tokenizer.json")
    assert not (tmp_path / "ours" / "tokenizer_config.json").exists()
    again = Tokenizer.load(tmp_path / "ours")
    assert (again.eot_id, again.pad_id, again.is_pretrained) == (0, 1, False)


def test_tokenizer_without_eos_is_named():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from rizzearch.data.tokenizer import Tokenizer

    hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    with pytest.raises(DataError, match=re.escape("lacks the special token '<|endoftext|>'")):
        Tokenizer(hf)
    with pytest.raises(DataError, match="no eos_token"):
        Tokenizer.from_special_tokens(hf, {}, where="x/tokenizer_config.json")
    with pytest.raises(DataError, match="eos_token '</s>' is not in the vocabulary"):
        Tokenizer.from_special_tokens(hf, {"eos_token": "</s>"})
    t = Tokenizer.from_special_tokens(hf, {"eos_token": {"content": "b"}})
    assert (t.eos_id, t.pad_id, t.bos_id) == (1, 1, None)
