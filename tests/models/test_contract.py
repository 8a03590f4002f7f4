"""The CausalLM contract, checked for every registered model (DESIGN.md)."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import CheckpointError, ShapeError
from rizzearch.models import build_model, generate, model_names
from rizzearch.models.base import select_state, tiny_overrides
from rizzearch.testing import assert_close

V = 97
B, T = 3, 37


def make(name: str):
    torch.manual_seed(0)
    m = build_model(name, **{**tiny_overrides(name), "vocab_size": V}).eval()
    # randomise every parameter a little so zero-initialised paths are exercised too
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(params=model_names())
def model(request):
    return make(request.param)


def test_forward_equals_prefill_then_step(model):
    x = torch.randint(0, V, (B, T))
    full, _ = model(x)
    assert full.shape == (B, T, V)
    parts = []
    logits, state = model(x[:, :7])  # prefill
    parts.append(logits)
    logits, state = model(x[:, 7:20], state)  # a second chunk
    parts.append(logits)
    for t in range(20, T):  # then token by token
        logits, state = model.step(x[:, t], state)
        parts.append(logits[:, None])
    assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4, name="prefill+step logits")


@pytest.mark.parametrize("length", [1, 9, 37])
def test_prefill_is_the_forward_last_position(model, length):
    """``prefill`` == ``forward``'s last position with an equivalent state (the next step agrees), from
    the empty state and after one, with and without gradient (the fused inference paths), padded."""
    x = torch.randint(0, V, (B, length))
    mask = torch.ones(B, length, dtype=torch.long)
    mask[0, : length // 2] = 0  # a left-padded row
    nxt = torch.randint(0, V, (B,))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            _, before = model(torch.randint(0, V, (B, 4)))
            for state, am in ((None, None), (before, None), (None, mask)):
                full, st_full = model(x, state, attention_mask=am)
                last, st_last = model.prefill(x, state, attention_mask=am)
                assert last.shape == (B, V)
                assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5, name=f"prefill logits, T={length}, grad={grad}")
                a, _ = model.step(nxt, st_full)
                b, _ = model.step(nxt, st_last)
                assert_close(b, a, atol=1e-5, rtol=1e-5, name=f"step after prefill, T={length}, grad={grad}")


def test_prefill_runs_the_head_on_the_last_position_only(model):
    """Inside ``prefill`` the LM head multiplies one row per sequence (with and without gradient);
    ``forward`` still gets every position, after a failed prefill too, and so does another model
    run while this one prefills."""
    head = model.lm_head if hasattr(model, "lm_head") else model.head
    rows = []
    hook = head.register_forward_hook(lambda mod, inp, out: rows.append(out.numel() // V))
    x = torch.randint(0, V, (B, 9))
    try:
        with torch.no_grad():
            model.prefill(x)
        model.prefill(x)
        assert rows == [B, B], f"head rows in prefill: {rows}"
        with pytest.raises(ShapeError):
            model.prefill(x[0])  # (T,) tokens: refused inside prefill
        assert model(x)[0].shape == (B, 9, V)
        other = make(model_names()[0])  # a second model, run from inside this one's prefill
        seen = []
        pre = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(other(x)[0].shape), with_kwargs=True)
        try:
            model.prefill(x)
        finally:
            pre.remove()
        assert seen == [(B, 9, V)]
    finally:
        hook.remove()


def test_init_state_is_the_empty_prefix(model):
    x = torch.randint(0, V, (B, 11))
    a, _ = model(x)
    b, _ = model(x, model.init_state(B))
    assert_close(b, a, atol=1e-5, rtol=1e-5, name="logits with init_state")


@pytest.mark.parametrize("length", [1, 2, 5, 64, 131])
def test_any_length(model, length):
    """Any T (1, not a multiple of the chunk, several chunks) gives the logits of the recurrence:
    the sequence forward equals two forwards that carry the state across an odd split point, and
    its last position equals one ``step`` after the rest; and it is causal (changing the last token
    changes no earlier logit, but does change the last)."""
    x = torch.randint(0, V, (2, length))
    logits, _ = model(x)
    assert logits.shape == (2, length, V)
    state = model.init_state(2)
    if length > 1:
        a = length // 2 + 1 if length > 2 else 1
        first, state_a = model(x[:, :a])
        second, _ = model(x[:, a:], state_a)
        assert_close(torch.cat([first, second], 1), logits, atol=1e-4, rtol=1e-4, name=f"split forward, T={length}")
        _, state = model(x[:, :-1])
    last, _ = model.step(x[:, -1], state)
    assert_close(last, logits[:, -1], atol=1e-4, rtol=1e-4, name=f"last step, T={length}")
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % V
    changed, _ = model(y)
    assert_close(changed[:, :-1], logits[:, :-1], atol=1e-5, rtol=1e-5, name="logits before the changed last token")
    assert not torch.allclose(changed[:, -1], logits[:, -1]), "the last token does not reach its own logits"


def test_left_padding_leaves_state_unchanged(model):
    x = torch.randint(0, V, (B, 19))
    pad = 6
    padded = torch.cat([torch.randint(0, V, (B, pad)), x], 1)
    mask = torch.cat([torch.zeros(B, pad, dtype=torch.long), torch.ones(B, 19, dtype=torch.long)], 1)
    ref, ref_state = model(x)
    got, state = model(padded, attention_mask=mask)
    assert_close(got[:, pad:], ref, atol=1e-4, rtol=1e-4, name="logits after padding")
    nxt = torch.randint(0, V, (B,))
    a, _ = model.step(nxt, ref_state)
    b, _ = model.step(nxt, state)
    assert_close(b, a, atol=1e-4, rtol=1e-4, name="next-step logits after padding")


def test_mixed_padding_in_batch(model):
    """Rows with different pad lengths decode like their unpadded selves."""
    rows = [torch.randint(0, V, (n,)) for n in (9, 14, 5)]
    L = max(len(r) for r in rows)
    padded = torch.stack([torch.cat([torch.zeros(L - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(L - len(r)), torch.ones(len(r))]) for r in rows]).long()
    got = generate(model, padded, 6, attention_mask=mask)
    for i, r in enumerate(rows):
        want = generate(model, r[None], 6)
        assert torch.equal(got[i], want[0]), f"row {i}: padded generation differs"


def test_greedy_generation_is_deterministic(model):
    prompt = torch.randint(0, V, (2, 5))
    a = generate(model, prompt, 12)
    b = generate(model, prompt, 12)
    assert a.shape == (2, 12)
    assert torch.equal(a, b)
    # greedy == argmax of the full forward over the generated sequence
    seq = torch.cat([prompt, a], 1)
    logits, _ = model(seq)
    assert torch.equal(logits[:, 4:-1].argmax(-1), a)


def test_beam_search_one_beam_is_greedy_and_beams_score_higher(model):
    prompt = torch.randint(0, V, (2, 4))
    greedy = generate(model, prompt, 6)
    beam = generate(model, prompt, 6, num_beams=4)

    def seq_logp(cont):
        seq = torch.cat([prompt, cont], 1)
        lp = model(seq)[0].log_softmax(-1)[:, 3:-1]
        return lp.gather(-1, cont[..., None])[..., 0].sum(-1)

    assert (seq_logp(beam) >= seq_logp(greedy) - 1e-4).all()


def test_sampling_is_seeded(model):
    prompt = torch.randint(0, V, (2, 4))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = generate(model, prompt, 8, temperature=1.0, top_k=10, top_p=0.9, generator=g())
    b = generate(model, prompt, 8, temperature=1.0, top_k=10, top_p=0.9, generator=g())
    assert torch.equal(a, b)


def test_state_reorders_by_batch_index(model):
    x = torch.randint(0, V, (B, 9))
    _, state = model(x)
    idx = torch.tensor([2, 0, 1])
    nxt = torch.randint(0, V, (B,))
    a, _ = model.step(nxt[idx], select_state(state, idx))
    b, _ = model.step(nxt, state)
    assert_close(a, b[idx], name="reordered step logits")


def test_bad_input_is_named(model):
    with pytest.raises(ShapeError, match="tokens"):
        model(torch.randint(0, V, (5,)))
    with pytest.raises(ShapeError, match="attention_mask"):
        model(torch.randint(0, V, (2, 5)), attention_mask=torch.ones(2, 4))


def test_incompatible_state_dict_is_named(model):
    """load_state_dict raises RizzErrors naming the tensor (wrong shape) or the keys (missing), for every model."""
    name = model.registry_name
    wide = build_model(name, **{**tiny_overrides(name), "vocab_size": V, "d_model": 32})
    with pytest.raises(ShapeError, match=r"state_dict\['[\w.]+'\]: expected shape \([\d, ]+\), got \([\d, ]+\)"):
        model.load_state_dict(wide.state_dict())
    sd = model.state_dict()
    dropped = next(iter(sd))
    with pytest.raises(CheckpointError, match=rf"missing \['{dropped}'\]"):
        model.load_state_dict({k: v for k, v in sd.items() if k != dropped})
    model.load_state_dict(sd)  # its own weights load


@pytest.mark.parametrize("name", model_names())
def test_config_round_trips_through_a_plain_dict_and_bad_keys_are_named(name):
    """What a checkpoint's meta.json stores (``config_to_dict``, tuples as JSON lists) rebuilds the same
    config; an unknown key or a value of the wrong type is a ConfigError naming the key."""
    import json

    from rizzearch.errors import ConfigError
    from rizzearch.models.base import config_from_dict, config_to_dict, get_model_class

    model = make(name)
    cls = get_model_class(name)[1]
    stored = json.loads(json.dumps(config_to_dict(model.config)))
    assert config_from_dict(cls, stored) == model.config
    with pytest.raises(ConfigError, match="unknown key.*'d_modle'"):
        config_from_dict(cls, {**stored, "d_modle": 3})
    with pytest.raises(ConfigError, match=r"\.d_model: expected int, got 'abc'"):
        config_from_dict(cls, {**stored, "d_model": "abc"})
    with pytest.raises(ConfigError, match=r"\.vocab_size: expected int, got True"):
        config_from_dict(cls, {**stored, "vocab_size": True})


def test_checkpoint_with_an_unknown_config_key_is_named(tmp_path):
    """meta.json's config dict is rebuilt with the plain typed constructor: a key the config does not
    have is a CheckpointError naming the file and the key."""
    import json

    from rizzearch.training import checkpoint as ckpt_io

    model = make("gpt")
    ckpt = ckpt_io.save_checkpoint(tmp_path / "checkpoints", 1, model, ckpt_io.model_meta(model), None)
    meta = json.loads((ckpt / ckpt_io.META_FILE).read_text())
    ckpt_io.load_checkpoint(ckpt, tokenizer=False)  # as saved, it loads
    meta["config"]["n_layers"] = 2
    (ckpt / ckpt_io.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.json.*unknown key.*'n_layers'"):
        ckpt_io.load_checkpoint(ckpt, tokenizer=False)
