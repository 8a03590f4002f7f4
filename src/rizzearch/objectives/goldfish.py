"""Goldfish loss (Hans et al. 2024, "Be like a Goldfish, Don't Memorize!").

The goldfish loss is next-token cross-entropy over a *subset* of positions (paper Eq. 2):

    L_goldfish = -(1 / |G|) sum_{t : G_t = 1} log p(x_{t+1} | x_{<=t}),

where the goldfish mask ``G`` drops about 1 in ``k`` positions. Dropped tokens are never used as
targets, so the model cannot learn to reproduce a long passage verbatim: at every dropped
position it has to guess. With a *hashed* mask (paper Sec. 3.1) the same text is dropped the same
way wherever it appears (another row, another offset, a duplicate document), so repeating the
passage for many epochs never reveals the dropped tokens.

``goldfish_mask(targets, strategy, k, h)`` returns the bool mask of **kept** positions (``True`` =
trained on). Strategies:

- ``static``: drop every k-th position of a row (positions k-1, 2k-1, ... counted from 0).
- ``random``: drop each position independently with probability 1/k, drawn from a CPU
  ``torch.Generator`` seeded with ``seed`` (identical on every device).
- ``hash``: drop position t when a hash of the h *preceding* targets ``targets[t-h .. t-1]``
  (the h tokens just before the token at t) falls below 1/k. The hash is a polynomial
  (Rabin-Karp) hash modulo the Mersenne prime 2^31 - 1 over per-token 32-bit mixes, followed by
  a 32-bit mix; it is order-sensitive, uses only int64 arithmetic that never overflows (every
  product is < 2^63 and every 32-bit step is masked explicitly), so CPU and CUDA agree bit for
  bit, and it is computed with one cumulative sum for any h (no loop over positions or over h).
- ``product``: the reference code's semantics, kept for comparison with the published numbers:
  the product of the h target ids *ending at* position t, modulo 1,000,003, indexes a seeded
  table of uniform numbers and t is dropped when the entry is below 1/k. Known weaknesses: the
  key is order-insensitive (any permutation of a window gets the same decision), a window that
  contains token id 0 (or any multiple of 1,000,003) always maps to key 0, and the target itself
  is part of the key. We reduce modulo 1,000,003 after every factor (the exact product modulo);
  a product taken in int64 *before* the modulo wraps around 2^64 for long windows and large ids
  and so gives different keys than the exact one.

For every strategy, ignored targets (``ignore_index``) and protected ids (special tokens) are
never dropped. For ``hash``/``product``, positions whose window does not fit in the row
(fewer than h preceding tokens; for ``product`` fewer than h-1) or contains an ignored target are
never dropped either, since their context is unknown.

``k = None`` (or 0) means the standard loss: ``goldfish_cross_entropy`` then returns exactly
``rizzearch.objectives.lm.cross_entropy``.

This module is pure (targets and logits in). The training loop's ``loss_fn`` that runs the model is
``rizzearch.training.losses.GoldfishLoss``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rizzearch.errors import ConfigError, ShapeError
from rizzearch.objectives.lm import IGNORE_INDEX, cross_entropy

STRATEGIES = ("static", "random", "hash", "product")

# -- hash constants ------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_P = 2_147_483_647  # Mersenne prime 2^31 - 1: modulus of the polynomial hash
_BASE = 0x5BD1E995 % _P  # polynomial base (any value in [2, P-1] works)
_BASE_INV = pow(_BASE, -1, _P)
# odd multipliers < 2^31, so a 32-bit value times a multiplier stays < 2^63 (no int64 overflow)
_C1 = 0x7FEB352D
_C2 = 0x21F0AAAD
# -- product (reference) constants ---------------------------------------------------------------
PRODUCT_TABLE_SIZE = 1_000_003


@dataclass(frozen=True)
class GoldfishConfig:
    """Goldfish loss settings (Hans et al. 2024).

    Args:
        k: drop about 1 in k target tokens (k >= 2); None or 0 trains on every token (standard loss).
        h: context width of the hashed mask: a position's decision depends on the h tokens before it.
        strategy: which tokens to drop: hash (h preceding tokens, the paper's choice), static (every
            k-th position), random (independent coin flips) or product (the reference code's
            order-insensitive product hash, for comparison with the published results).
        seed: seed of the hash salt, of the product table and of the random masks.
        protected_ids: token ids that are never dropped (special tokens such as end-of-text are
            always protected by ``rizz train``).
    """

    k: int | None = 4
    h: int = 13
    strategy: Literal["static", "random", "hash", "product"] = "hash"
    seed: int = 0
    protected_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_args(self.strategy, self.k, self.h, where="goldfish.")

    @property
    def enabled(self) -> bool:
        return bool(self.k)


def _check_args(strategy: str, k, h: int, where: str = "") -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}strategy: expected one of {list(STRATEGIES)}, got {strategy!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise ConfigError(f"{where}k: expected an integer >= 2 (or None/0 for the standard loss), got {k!r}")
    if k is not None and k != 0 and not 2 <= k < 2**31:
        raise ConfigError(f"{where}k: must be >= 2 (drop 1 in k tokens) and < 2^31, or None/0 for the standard loss, got {k}")
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
        raise ConfigError(f"{where}h: the hash context width must be an integer >= 1, got {h!r}")


# ----------------------------------------------------------------------------------------------
# Integer hashing (int64 tensors holding 32-bit values; nothing ever overflows)


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit mixer (xorshift-multiply, lowbias32 family) on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """``_mix32`` on one Python int (the scalar reference)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def _salts(seed: int) -> tuple[int, int]:
    s = int(seed) & ((1 << 64) - 1)
    return _mix32_int(s ^ (s >> 32) ^ 0x9E3779B9), _mix32_int((s * 2 + 1) ^ (s >> 32) ^ 0x85EBCA6B)


@functools.lru_cache(maxsize=16)
def _powers(n: int, device: str) -> tuple[Tensor, Tensor]:
    """(BASE^t mod P, BASE^-t mod P) for t = 0..n-1 as int64 tensors on ``device``."""
    t = torch.arange(n, dtype=torch.int64)
    out = []
    for base in (_BASE, _BASE_INV):  # square-and-multiply over the bits of t (vectorised over t)
        result = torch.ones(n, dtype=torch.int64)
        b = base
        e = t.clone()
        while bool((e > 0).any()):
            result = torch.where((e & 1).bool(), result * b % _P, result)
            b = b * b % _P
            e = e >> 1
        out.append(result.to(device))
    return out[0], out[1]


@functools.lru_cache(maxsize=4)
def _product_table(seed: int, device: str) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(PRODUCT_TABLE_SIZE, generator=g).to(device)


def hash_keys(targets: Tensor, h: int, seed: int = 0) -> Tensor:
    """32-bit hash of the h targets before each position: (B, T) int64, valid for t >= h.

    key_t = mix32( (sum_{j=1..h} g(y_{t-j}) * BASE^(j-1)) mod P  XOR salt2 ),
    g(y) = mix32(y XOR salt1) mod P. Entries t < h are meaningless (no full window).
    Computed as a windowed difference of one cumulative sum: sum_i g_i BASE^-i, rescaled.
    """
    targets = targets.long()
    B, T = targets.shape
    salt1, salt2 = _salts(seed)
    pw, inv = _powers(T + 1, str(targets.device))
    g = _mix32(targets.clamp_min(0) ^ salt1) % _P  # (B, T), each < 2^31
    w = g * inv[:T] % _P  # g_i * BASE^-i mod P, < 2^31
    s = F.pad(torch.cumsum(w, dim=1), (1, 0))  # (B, T+1): s[:, j] = sum_{i<j} w_i  (< 2^31 * T)
    keys = torch.zeros_like(targets)
    if T > h:
        win = (s[:, h:T] - s[:, : T - h]) % _P  # (B, T-h): positions t = h..T-1, tokens t-h..t-1
        poly = win * pw[h - 1 : T - 1] % _P  # times BASE^(t-1)
        keys[:, h:] = _mix32(poly ^ salt2)
    return keys


def hash_keys_reference(row: Sequence[int], h: int, seed: int = 0) -> list[int | None]:
    """Plain-Python reference of ``hash_keys`` for one row (None where t < h)."""
    salt1, salt2 = _salts(seed)
    out: list[int | None] = []
    for t in range(len(row)):
        if t < h:
            out.append(None)
            continue
        acc = 0
        for j in range(1, h + 1):
            g = _mix32_int(max(int(row[t - j]), 0) ^ salt1) % _P
            acc = (acc + g * pow(_BASE, j - 1, _P)) % _P
        out.append(_mix32_int(acc ^ salt2))
    return out


def product_keys(targets: Tensor, h: int) -> Tensor:
    """(prod_{j=0..h-1} y_{t-j}) mod 1,000,003 for each position t >= h-1; (B, T) int64."""
    x = targets.long().clamp_min(0) % PRODUCT_TABLE_SIZE
    B, T = x.shape
    keys = torch.zeros_like(x)
    if T >= h:
        prod = x[:, h - 1 :].clone()  # factor j = 0 (the target itself)
        for j in range(1, h):  # h factors; loop over the window, vectorised over positions
            prod = prod * x[:, h - 1 - j : T - j] % PRODUCT_TABLE_SIZE
        keys[:, h - 1 :] = prod
    return keys


def _window_has(flags: Tensor, width: int, last_offset: int) -> Tensor:
    """For each t: does ``flags`` hold anywhere in [t - width + 1 - last_offset, t - last_offset]?

    Positions whose window starts before 0 are reported True (the window does not fit).
    """
    B, T = flags.shape
    c = F.pad(torch.cumsum(flags.to(torch.int32), dim=1), (1, 0))  # (B, T+1)
    out = torch.ones(B, T, dtype=torch.bool, device=flags.device)
    first = width - 1 + last_offset  # first position whose window fits
    if T > first:
        hi = c[:, first - last_offset + 1 : T - last_offset + 1]
        lo = c[:, : T - first]
        out[:, first:] = (hi - lo) > 0
    return out


def goldfish_mask(
    targets: Tensor,
    strategy: str,
    k: int | None,
    h: int = 13,
    ignore_index: int = IGNORE_INDEX,
    protected_ids: Sequence[int] = (),
    seed: int = 0,
) -> Tensor:
    """Bool mask of **kept** positions (True = the target is trained on), same shape as ``targets``.

    Args:
        targets: (B, T) integer next-token targets (``ignore_index`` where nothing is trained).
        strategy: "static", "random", "hash" or "product" (module docstring).
        k: drop about 1 in k positions (k >= 2); None or 0 keeps every position.
        h: context width for "hash" (h preceding tokens) and "product" (h ids ending at t).
        ignore_index: target value of ignored positions (never dropped).
        protected_ids: token ids that are never dropped (special tokens).
        seed: hash salt / product table seed / random-mask seed.
    """
    _check_args(strategy, k, h)
    if targets.dim() != 2:
        raise ShapeError(f"goldfish_mask: targets must have shape (B, T), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ShapeError(f"goldfish_mask: targets must be an integer tensor, got {targets.dtype}")
    B, T = targets.shape
    device = targets.device
    if not k:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    y = targets.long()
    ignored = y == ignore_index
    if strategy == "static":
        pos = torch.arange(T, device=device)
        drop = ((pos + 1) % k == 0).expand(B, T)
    elif strategy == "random":
        g = torch.Generator().manual_seed(int(seed))
        drop = (torch.rand(B, T, generator=g, dtype=torch.float64) < 1.0 / k).to(device)
    elif strategy == "hash":
        keys = hash_keys(y, h, seed)
        drop = (keys * k < (1 << 32)) & ~_window_has(ignored, h, last_offset=1)
    else:  # product
        table = _product_table(int(seed), str(device))
        drop = (table[product_keys(y, h)] < 1.0 / k) & ~_window_has(ignored, h, last_offset=0)
    drop = drop & ~ignored
    if len(protected_ids):
        prot = torch.as_tensor(list(protected_ids), dtype=torch.int64, device=device)
        drop = drop & ~torch.isin(y, prot)
    return ~drop


def goldfish_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    config: GoldfishConfig,
    ignore_index: int = IGNORE_INDEX,
    *,
    seed: int | None = None,
) -> tuple[Tensor, dict]:
    """Goldfish loss (paper Eq. 2): mean cross-entropy over kept, non-ignored positions.

    Metrics (all for the same batch): ``loss`` (kept tokens, the trained loss), ``all_token_loss``
    (every non-ignored token, i.e. the standard loss), ``dropped_token_loss`` (dropped tokens
    only; NaN when none was dropped), ``dropped_fraction`` and ``tokens`` (kept tokens).
    ``config.k`` None/0 returns ``lm.cross_entropy`` unchanged (the standard loss, exactly).
    ``seed`` overrides ``config.seed`` (used to vary ``random`` masks between steps).
    logits: (B, T, V); targets: (B, T).
    """
    if not config.enabled:
        loss, metrics = cross_entropy(logits, targets, ignore_index)
        return loss, {**metrics, "all_token_loss": metrics["loss"], "dropped_token_loss": float("nan"), "dropped_fraction": 0.0}
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ShapeError(f"goldfish_cross_entropy: logits (B, T, V) and targets (B, T) expected, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    kept = goldfish_mask(targets, config.strategy, config.k, config.h, ignore_index, config.protected_ids, config.seed if seed is None else seed)
    valid = targets != ignore_index
    n_valid = valid.sum()
    if int(n_valid) == 0:
        raise ShapeError("goldfish_cross_entropy: every target is ignored (no tokens to train on)")
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="none").view_as(targets)
    keep = kept & valid
    dropped = valid & ~kept
    n_keep, n_drop = keep.sum(), dropped.sum()
    # every position dropped (tiny rows): the loss is 0 with no gradient signal, never NaN
    loss = (per_token * keep).sum() / n_keep.clamp_min(1)
    with torch.no_grad():
        all_loss = (per_token * valid).sum() / n_valid
        drop_loss = torch.where(n_drop > 0, (per_token * dropped).sum() / n_drop.clamp_min(1), float("nan"))  # no host sync
    metrics = {
        "loss": loss.detach(),
        "all_token_loss": all_loss,
        "dropped_token_loss": drop_loss,
        "dropped_fraction": (n_drop.float() / n_valid.float()),
        "tokens": n_keep.detach(),
    }
    return loss, metrics
