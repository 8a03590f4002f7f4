"""RWKV-4: a linear-time RNN language model that trains in parallel (Peng et al. 2023).

Architecture (the paper's Sec. 3; names follow the official RWKV-LM v4 code and HF transformers):

    x = ln0(emb(tokens))
    per block:  x = x + TimeMix(ln1(x));  x = x + ChannelMix(ln2(x))
    logits = head(ln_out(x))

- Token shift (eqs. 11-13, 16-17): every mixing layer sees ``lerp(x_{t-1}, x_t, mu)`` with a
  learned per-channel ``mu`` (``time_mix_*``); ``x_{t-1}`` of the first token comes from the state.
- Time mixing (eqs. 11-15): ``r, k, v`` projections of the shifted inputs, ``wkv`` (eq. 14, see
  ``rizzearch.ops.wkv``), output ``W_o (sigmoid(r) * wkv)``.
- Channel mixing (eqs. 16-18): ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2``.

State (everything needed to continue; batch on dim 0, one entry per layer)::

    {"att_x": [L x (B, C)]  last input of each time-mix (token shift),
     "num", "den", "max": [L x (B, A)]  WKV numerator / denominator / max exponent (float32),
     "ffn_x": [L x (B, C)]  last input of each channel-mix}

Padding (``attention_mask == 0``) leaves the state unchanged: padded steps neither decay nor add
to the WKV state, and the token shift skips them, so left-padded rows decode like unpadded rows.

Initialisation follows RWKV-LM v4neo (``RWKV_TimeMix``/``RWKV_ChannelMix`` and
``generate_init_weight``): time_decay ``-5 + 8 (h/(A-1))^(0.7 + 1.3 l/(L-1))``, time_first
``log(0.3) + zigzag``, layer-dependent time_mix curves, zero ``att.key/receptance/output`` and
``ffn.value/receptance``, orthogonal others (gain sqrt(out/in) when out > in, head x0.5), and a
small uniform embedding. (HF's ``_init_weights`` sets time_first to all ones: a bug we do not copy.)

Decoding (one token, no grad) runs the recurrent form: on CPU in float32 one fused C call for the
whole model, multi-threaded (``rizzearch.ops.wkv.fused_step``, on the parameters themselves),
otherwise an eager step on weights cached until a parameter changes, with r/k/v as one batched
matmul after one ``addcmul`` for the three token-shift lerps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rizzearch.errors import ShapeError
from rizzearch.models.base import CausalLM, register_model
from rizzearch.ops.wkv import EMPTY_MAX, MAX_FUSED_BATCH, FusedModel, decode_library, fused_step, wkv

STATE_KEYS = ("att_x", "num", "den", "max", "ffn_x")


@dataclass(frozen=True)
class RWKVConfig:
    """RWKV-4 language model configuration.

    Args:
        vocab_size: number of token ids.
        n_layer: number of blocks (time mix + channel mix).
        d_model: residual stream width (HF ``hidden_size``, official ``n_embd``).
        d_att: width of r/k/v and the WKV state (HF ``attention_hidden_size``); None = d_model.
        d_ffn: hidden width of the channel mix (HF ``intermediate_size``); None = 4 * d_model.
        norm_eps: LayerNorm epsilon (ln0, ln1, ln2, ln_out).
        tie_embeddings: share the embedding and the head weights (RWKV-4 does not).
        emb_init: embeddings start uniform in [-emb_init, emb_init] (RWKV's small-embedding init).
    """

    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 128
    d_att: int | None = None
    d_ffn: int | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    emb_init: float = 1e-4

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("d_att", "d_ffn"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")

    @property
    def att_dim(self) -> int:
        return self.d_att or self.d_model

    @property
    def ffn_dim(self) -> int:
        return self.d_ffn or 4 * self.d_model


# ----------------------------------------------------------------------------------------------
# Helpers


def token_shift(x: Tensor, prev: Tensor, mask: Tensor | None) -> Tensor:
    """x_{t-1} for every t. x: (B, T, C), prev: (B, C) the input before x[:, 0].

    With ``mask`` (B, T) bool, x_{t-1} is the last *unmasked* input before t (or ``prev``).
    """
    if mask is None:
        return torch.cat([prev[:, None], x[:, :-1]], 1)
    B, T, C = x.shape
    pos = torch.arange(T, device=x.device).expand(B, T)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).cummax(1).values  # (B, T) last live index <= t
    src = torch.cat([last.new_full((B, 1), -1), last[:, :-1]], 1)  # (B, T) last live index < t
    gathered = x.gather(1, src.clamp_min(0)[..., None].expand(B, T, C))  # (B, T, C)
    return torch.where((src >= 0)[..., None], gathered, prev[:, None])


def last_live(x: Tensor, prev: Tensor, mask: Tensor | None) -> Tensor:
    """The input at the last unmasked position of each row (or ``prev``). x: (B, T, C) -> (B, C)."""
    if mask is None:
        return x[:, -1]
    any_live = mask.any(1)  # (B,)
    T = x.shape[1]
    idx = torch.where(mask, torch.arange(T, device=x.device), -1).amax(1).clamp_min(0)  # (B,)
    picked = x[torch.arange(x.shape[0], device=x.device), idx]  # (B, C)
    return torch.where(any_live[:, None], picked, prev)


def _orthogonal_(weight: Tensor, gain: float) -> None:
    """nn.init.orthogonal_ computed in float32 on CPU (works for any dtype/device)."""
    w = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.orthogonal_(w, gain=gain)
    with torch.no_grad():
        weight.copy_(w)


# ----------------------------------------------------------------------------------------------
# Blocks


class TimeMix(nn.Module):
    """Token shift + r, k, v + WKV + sigmoid(r) gate + output projection (eqs. 11-15)."""

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, A = cfg.d_model, cfg.att_dim
        self.layer_id = layer_id
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_v = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def forward(self, x: Tensor, prev_x: Tensor, wkv_state, mask: Tensor | None):
        xx = token_shift(x, prev_x, mask)  # (B, T, C)
        k = self.key(torch.lerp(xx, x, self.time_mix_k))  # (B, T, A)
        v = self.value(torch.lerp(xx, x, self.time_mix_v))
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r))
        y, wkv_state = wkv(self.time_decay, self.time_first, k, v, wkv_state, mask)
        out = self.output(torch.sigmoid(r) * y)
        return out, last_live(x, prev_x, mask), wkv_state


class ChannelMix(nn.Module):
    """Token shift + squared-ReLU MLP gated by sigmoid(r) (eqs. 16-18)."""

    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        C, Fd = cfg.d_model, cfg.ffn_dim
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x: Tensor, prev_x: Tensor, mask: Tensor | None):
        xx = token_shift(x, prev_x, mask)  # (B, T, C)
        k = torch.square(torch.relu(self.key(torch.lerp(xx, x, self.time_mix_k))))  # (B, T, F)
        r = torch.sigmoid(self.receptance(torch.lerp(xx, x, self.time_mix_r)))
        return r * self.value(k), last_live(x, prev_x, mask)


class Block(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer_id: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x: Tensor, st: dict, mask: Tensor | None):
        a, att_x, wkv_state = self.att(self.ln1(x), st["att_x"], (st["num"], st["den"], st["max"]), mask)
        x = x + a
        f, ffn_x = self.ffn(self.ln2(x), st["ffn_x"], mask)
        x = x + f
        num, den, mx = wkv_state
        return x, {"att_x": att_x, "num": num, "den": den, "max": mx, "ffn_x": ffn_x}


# ----------------------------------------------------------------------------------------------
# The model


@register_model("rwkv", RWKVConfig, tiny=dict(n_layer=2, d_model=64))
class RWKV(CausalLM):
    """RWKV-4 language model (see the module docstring for the state and the init)."""

    def __init__(self, config: RWKVConfig):
        super().__init__()
        self.config = config
        C = config.d_model
        self.emb = nn.Embedding(config.vocab_size, C)
        self.ln0 = nn.LayerNorm(C, eps=config.norm_eps)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(C, eps=config.norm_eps)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.emb.weight
        self._decode_cache: tuple | None = None  # see _decode_weights
        self._fused_cache: tuple | None = None  # (parameter data pointers, FusedModel), see _fused_model
        self._slots: list | None = None
        self.init_weights()

    # -- init ---------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """RWKV-LM v4neo init (see module docstring)."""
        cfg = self.config
        L, C, A = cfg.n_layer, cfg.d_model, cfg.att_dim
        ramp = torch.arange(C, dtype=torch.float32) / C  # i / C
        h = torch.arange(A, dtype=torch.float32)
        zigzag = ((h + 1) % 3 - 1) * 0.5  # 0, 0.5, -0.5, ...
        for i, block in enumerate(self.blocks):
            r01 = i / (L - 1) if L > 1 else 0.0  # 0 -> 1 over depth
            r10 = 1.0 - i / L  # 1 -> ~0
            att, ffn = block.att, block.ffn
            att.time_decay.copy_(-5 + 8 * (h / max(A - 1, 1)) ** (0.7 + 1.3 * r01))
            att.time_first.copy_(math.log(0.3) + zigzag)
            att.time_mix_k.copy_(ramp**r10)
            att.time_mix_v.copy_(ramp**r10 + 0.3 * r01)
            att.time_mix_r.copy_(ramp ** (0.5 * r10))
            ffn.time_mix_k.copy_(ramp**r10)
            ffn.time_mix_r.copy_(ramp**r10)
            for lin in (att.key, att.receptance, att.output, ffn.value, ffn.receptance):
                lin.weight.zero_()
            _orthogonal_(att.value.weight, 1.0)
            _orthogonal_(ffn.key.weight, math.sqrt(cfg.ffn_dim / C) if cfg.ffn_dim > C else 1.0)
            for ln in (block.ln1, block.ln2):
                ln.reset_parameters()
        for ln in (self.ln0, self.ln_out):
            ln.reset_parameters()
        nn.init.uniform_(self.emb.weight, -cfg.emb_init, cfg.emb_init)
        if not cfg.tie_embeddings:
            V = cfg.vocab_size
            _orthogonal_(self.head.weight, 0.5 * (math.sqrt(V / C) if V > C else 1.0))

    # -- state --------------------------------------------------------------------------------

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        cfg = self.config
        device = device if device is not None else self.emb.weight.device
        dtype = dtype if dtype is not None else self.emb.weight.dtype
        L, C, A = cfg.n_layer, cfg.d_model, cfg.att_dim

        def zeros(n, dt):
            return torch.zeros(batch_size, n, device=device, dtype=dt)

        return {
            "att_x": [zeros(C, dtype) for _ in range(L)],
            "num": [zeros(A, torch.float32) for _ in range(L)],
            "den": [zeros(A, torch.float32) for _ in range(L)],
            "max": [torch.full((batch_size, A), EMPTY_MAX, device=device, dtype=torch.float32) for _ in range(L)],
            "ffn_x": [zeros(C, dtype) for _ in range(L)],
        }

    def _check_state(self, state, B: int) -> None:
        cfg = self.config
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ShapeError(f"state: expected an RWKV state dict with keys {list(STATE_KEYS)} (from RWKV.init_state), found {found}")
        for key in STATE_KEYS:
            if len(state[key]) != cfg.n_layer:
                raise ShapeError(f"state[{key!r}]: expected {cfg.n_layer} layers, found {len(state[key])} (state from another config?)")
            width = cfg.d_model if key.endswith("_x") else cfg.att_dim
            s = state[key][0]  # every layer has the same widths; one check per key keeps decoding cheap
            if tuple(s.shape) != (B, width):
                raise ShapeError(
                    f"state[{key!r}][0]: expected shape {(B, width)}, found {tuple(s.shape)} (state from another config or batch size?)"
                )

    # -- forward ------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, state=None, attention_mask: Tensor | None = None):
        """tokens (B, T) -> logits (B, T, V) and the state after the last (unpadded) token."""
        self._check_tokens(tokens, attention_mask)
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B, tokens.device)
        else:
            self._check_state(state, B)
        mask = self._padding_mask(attention_mask)
        if T == 1 and not torch.is_grad_enabled() and self._plain_projections():
            return self._decode(tokens[:, 0], state, mask)
        x = self.ln0(self.emb(tokens))  # (B, T, C)
        new = {k: [] for k in STATE_KEYS}
        for i, block in enumerate(self.blocks):
            x, st = block(x, {k: state[k][i] for k in STATE_KEYS}, mask)
            for k in STATE_KEYS:
                new[k].append(st[k])
        logits = self.head(self.ln_out(x))  # (B, T, V)
        return logits, new

    # -- decoding -----------------------------------------------------------------------------

    def _plain_projections(self) -> bool:
        """Whether every projection is a plain ``nn.Linear``: the decode engines read their weights
        directly, so layers wrapped by adapters (``training.lora``) decode through the block path."""
        return all(
            type(m) is nn.Linear
            for b in self.blocks
            for m in (b.att.key, b.att.value, b.att.receptance, b.att.output, b.ffn.key, b.ffn.receptance, b.ffn.value)
        )

    def clear_decode_cache(self) -> None:
        """Drop the cached decoding weights so the next decode step rebuilds them.

        Not needed after optimizer steps, ``load_state_dict``, ``.to()`` or in-place edits under
        ``torch.no_grad()``: parameter version counters and data pointers catch those. Edits through
        ``param.data`` bypass the version counter (PyTorch does not track them), so call this after them.
        """
        self._decode_cache = None
        self._fused_cache = None

    def _params(self) -> list:
        """The current parameters, re-read from every module's slot (re-assigned parameters are seen)."""
        if self._slots is None:
            self._slots = [(mod._parameters, name) for mod in self.modules() for name, p in mod._parameters.items() if p is not None]
        params = [slots.get(name) for slots, name in self._slots]
        if any(p is None for p in params):  # a parameter was removed: rescan
            self._slots = None
            return self._params()
        return params

    def _param_key(self) -> tuple:
        """``(id, version, data pointer)`` of every parameter slot: decode caches keyed on it are
        rebuilt after in-place optimizer updates, ``load_state_dict``, ``.to()`` and re-assigned
        parameters."""
        params = self._params()
        return (tuple(map(id, params)), tuple(p._version for p in params), tuple(p.data_ptr() for p in params))

    def _decode_weights(self) -> list:
        """Per-layer eager decode weights (stacked, transposed), cached until a parameter changes."""
        key = self._param_key()
        if self._decode_cache is not None and self._decode_cache[0] == key:
            return self._decode_cache[1]
        layers = []
        with torch.no_grad():
            for block in self.blocks:
                att, ffn = block.att, block.ffn
                layers.append(
                    dict(
                        mix_att=torch.stack([att.time_mix_r, att.time_mix_k, att.time_mix_v])[:, None],  # (3, 1, C)
                        w_att=torch.stack([att.receptance.weight.T, att.key.weight.T, att.value.weight.T]).contiguous(),  # (3, C, A)
                        w_out=att.output.weight.T.contiguous(),  # (A, C)
                        # exponent offsets added to (p, k, p, k): output pair (p, u + k), update pair (p - w, k)
                        offsets=torch.stack([torch.zeros_like(att.time_first), att.time_first, -torch.exp(att.time_decay), torch.zeros_like(att.time_first)]).float()[:, None],  # (4, 1, A)
                        mix_ffn=torch.stack([ffn.time_mix_k, ffn.time_mix_r])[:, None],  # (2, 1, C)
                        w_key=ffn.key.weight.T.contiguous(),  # (C, F)
                        w_rec=ffn.receptance.weight.T.contiguous(),  # (C, C)
                        w_val=ffn.value.weight.T.contiguous(),  # (F, C)
                        ln1=(block.ln1.weight, block.ln1.bias, block.ln1.eps),
                        ln2=(block.ln2.weight, block.ln2.bias, block.ln2.eps),
                    )
                )
        self._decode_cache = (key, layers)
        return layers

    def _fused_model(self, token: Tensor, state: dict, mask: Tensor | None):
        """The fused C kernel (``rizzearch.ops.wkv``) and the model's pointers when they apply, else None."""
        if (
            mask is not None
            or token.device.type != "cpu"
            or token.shape[0] > MAX_FUSED_BATCH
            or self.emb.weight.dtype != torch.float32
            or state["att_x"][0].dtype != torch.float32
        ):
            return None
        lib = decode_library()
        if lib is None:
            return None
        # The kernel reads the parameters in place, so in-place updates need no rebuild; new storage
        # (load_state_dict(assign=True), .to(), re-assigned parameters) or a change to a value it
        # derived or copied (-exp(time_decay)) does.
        ptrs = tuple(p.data_ptr() for p in self._params())
        cache = self._fused_cache
        if cache is None or cache[0] != ptrs or not cache[1].is_current():
            self._fused_cache = cache = (ptrs, FusedModel(self))
        return lib, cache[1]

    def _decode(self, token: Tensor, state: dict, mask: Tensor | None):
        """One token per row without autograd: the recurrent form with few, large ops per layer."""
        fused = self._fused_model(token, state, mask)
        if fused is not None:  # one C call for the whole model
            logits, new = fused_step(*fused, token, state)
            return logits[:, None], new
        C = self.config.d_model
        x = self.ln0(self.emb(token))  # (B, C)
        new = {k: [] for k in STATE_KEYS}
        for i, lw in enumerate(self._decode_weights()):
            # time mix: the three token-shift lerps and projections as one addcmul and one bmm
            xx = F.layer_norm(x, (C,), *lw["ln1"][:2], lw["ln1"][2])
            sx = state["att_x"][i]
            mixed = torch.addcmul(sx, lw["mix_att"], xx - sx)  # (3, B, C)
            r, k, v = torch.bmm(mixed, lw["w_att"]).float()  # 3 x (B, A)
            a, b, p = state["num"][i], state["den"][i], state["max"][i]
            # eq. 14 one step: output exponents (p, u + k) and update exponents (p - w, k), max-stabilised
            ex = (torch.stack([p, k, p, k]) + lw["offsets"]).view(2, 2, *p.shape)  # (out/update, old/new, B, A)
            q = ex.amax(1, keepdim=True)  # (2, 1, B, A)
            e = (ex - q).exp_()  # (2, 2, B, A)
            e_old, e_new = e.unbind(1)  # 2 x (2, B, A)
            nd = e_old[:, None] * torch.stack([a, b])  # (out/update, num/den, B, A)
            num, den = nd.unbind(1)
            num.addcmul_(e_new, v)
            den.add_(e_new)
            y = (nd[0, 0] / nd[0, 1]).to(x.dtype)
            x = torch.addmm(x, torch.sigmoid(r.to(x.dtype)) * y, lw["w_out"])
            # channel mix
            xx2 = F.layer_norm(x, (C,), *lw["ln2"][:2], lw["ln2"][2])
            sx2 = state["ffn_x"][i]
            mk, mr = torch.addcmul(sx2, lw["mix_ffn"], xx2 - sx2)  # 2 x (B, C)
            kk = torch.relu(mk @ lw["w_key"]).square_()  # (B, F)
            x = torch.addcmul(x, torch.sigmoid(mr @ lw["w_rec"]), kk @ lw["w_val"])
            st = {"att_x": xx, "num": nd[1, 0], "den": nd[1, 1], "max": q[1, 0], "ffn_x": xx2}
            if mask is not None:
                m = mask[:, 0:1]  # (B, 1)
                st = {key: torch.where(m, val, state[key][i]) for key, val in st.items()}
            for key in STATE_KEYS:
                new[key].append(st[key])
        logits = self.head(self.ln_out(x))  # (B, V)
        return logits[:, None], new

    # -- sizes --------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int) -> float:
        """6 N over matmul weights (+ the head) + ~20 element ops per WKV channel per layer (no T term)."""
        cfg = self.config
        return super().flops_per_token(seq_len) + 3 * 20.0 * cfg.n_layer * cfg.att_dim
