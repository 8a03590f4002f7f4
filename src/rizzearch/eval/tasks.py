"""Synthetic tasks of the xLSTM study: parity (state tracking) and MQAR (associative recall).

Both tasks are ordinary next-token problems over a tiny vocabulary, so *any* registered CausalLM
trains on them with the shared loop (``rizzearch.training.loop.train`` with
``rizzearch.training.losses.lm_loss``) and is scored by the same accuracy functions.

**Parity** (Deletang et al. 2023, "Neural Networks and the Chomsky Hierarchy", the regular-language
task of xLSTM paper section 4.1 / figure 4): the input is a random bit string; at every position
the target is the parity of the bits so far (``EVEN`` or ``ODD``). Training uses lengths in
``[min_len, max_len]``; the test uses longer strings and scores the prediction after the *last*
bit (the task's answer), whose chance level is 0.5. A recurrent model with memory mixing (sLSTM)
can flip one state bit per 1 and so extrapolates to any length; attention and the mLSTM (no
memory mixing) cannot represent the flip and fail beyond the training lengths.

**MQAR**, multi-query associative recall (Arora et al. 2023, "Zoology"; xLSTM paper figure 5):
``k1 v1 k2 v2 ... kN vN q1 a1 q2 a2 ... qN aN`` where the queries are the N keys in a random
order and ``a_i`` is the value bound to ``q_i``. Only the positions of the query keys are scored
(the model must output ``a_i`` there); everything else has target ``-100``.

Batches are pure functions of ``(seed, position)`` (BatchSource protocol: ``next_batch``,
``state_dict``, ``load_state_dict``), so a resumed run sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rizzearch.errors import ConfigError
from rizzearch.models.base import eval_mode

IGNORE = -100

# parity vocabulary
BIT0, BIT1, EVEN, ODD = 0, 1, 2, 3
PARITY_VOCAB = 4


def _gen(seed: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + position * 7919 + 4242) % (2**63 - 1))


# ----------------------------------------------------------------------------------------------
# Parity


def parity_batch(batch_size: int, min_len: int, max_len: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random bit strings of lengths in [min_len, max_len], right-padded, with running-parity targets.

    Returns {"input_ids": (B, max_len), "targets": (B, max_len), "lengths": (B,)}; targets are
    ``EVEN``/``ODD`` at real positions and ``-100`` on padding.
    """
    if not 1 <= min_len <= max_len:
        raise ConfigError(f"parity: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    bits = torch.randint(0, 2, (batch_size, max_len), generator=generator)
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator)
    real = torch.arange(max_len)[None, :] < lengths[:, None]  # (B, T)
    bits = bits * real  # padding reads as 0 bits; it is never scored
    targets = torch.where(real, EVEN + bits.cumsum(1) % 2, torch.full_like(bits, IGNORE))
    return {"input_ids": bits + BIT0, "targets": targets, "lengths": lengths}


class _SeededBatches:
    """A BatchSource whose batch number ``p`` is drawn from a generator seeded by ``(seed, p)``, so
    its position is its whole state (saved in checkpoints, resumed bit for bit)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.position = 0

    def _make(self, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def next_batch(self) -> dict[str, Tensor]:
        b = self._make(_gen(self.seed, self.position))
        self.position += 1
        return b

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class ParityData(_SeededBatches):
    """BatchSource of parity training batches (see ``parity_batch``)."""

    def __init__(self, batch_size: int, min_len: int, max_len: int, seed: int = 0):
        super().__init__(seed)
        self.batch_size, self.min_len, self.max_len = batch_size, min_len, max_len
        parity_batch(1, min_len, max_len, _gen(seed, 0))  # validate the lengths now

    def _make(self, generator: torch.Generator) -> dict[str, Tensor]:
        b = parity_batch(self.batch_size, self.min_len, self.max_len, generator)
        return {"input_ids": b["input_ids"], "targets": b["targets"]}


@torch.no_grad()
def parity_accuracy(
    model, lengths, n_per_length: int = 256, batch_size: int = 128, seed: int = 12345, device: str | torch.device = "cpu"
) -> dict[int, float]:
    """Accuracy of the parity answer (the prediction after the last bit) for strings of each length.

    The answer is read as ``argmax`` over the two answer tokens (EVEN, ODD); chance is 0.5.
    """
    out = {}
    with eval_mode(model):
        for L in lengths:
            g = _gen(seed, int(L))
            correct = 0
            for s in range(0, n_per_length, batch_size):
                n = min(batch_size, n_per_length - s)
                b = parity_batch(n, int(L), int(L), g)
                logits, _ = model(b["input_ids"].to(device))
                pred = EVEN + logits[:, -1, EVEN : ODD + 1].argmax(-1)
                correct += int((pred.cpu() == b["targets"][:, -1]).sum())
            out[int(L)] = correct / n_per_length
    return out


# ----------------------------------------------------------------------------------------------
# MQAR


@dataclass(frozen=True)
class MQARSpec:
    """Layout of an MQAR problem.

    Args:
        n_pairs: key-value pairs per sequence (all keys are queried once, in a random order).
        n_keys: size of the key alphabet (token ids 0 .. n_keys-1).
        n_values: size of the value alphabet (token ids n_keys .. n_keys+n_values-1).
    """

    n_pairs: int = 8
    n_keys: int = 32
    n_values: int = 32

    def __post_init__(self):
        if self.n_pairs < 1 or self.n_pairs > self.n_keys:
            raise ConfigError(f"mqar: n_pairs must be in 1..n_keys ({self.n_keys}), got {self.n_pairs}")
        if self.n_values < 2:
            raise ConfigError(f"mqar: n_values must be >= 2, got {self.n_values}")

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        return 4 * self.n_pairs


def mqar_batch(batch_size: int, spec: MQARSpec, generator: torch.Generator) -> dict[str, Tensor]:
    """One batch of MQAR sequences -> {"input_ids": (B, 4N), "targets": (B, 4N)}."""
    B, N = batch_size, spec.n_pairs
    keys = torch.rand(B, spec.n_keys, generator=generator).argsort(-1)[:, :N]  # N distinct keys per row
    values = spec.n_keys + torch.randint(0, spec.n_values, (B, N), generator=generator)
    order = torch.rand(B, N, generator=generator).argsort(-1)  # query order
    q, a = keys.gather(1, order), values.gather(1, order)
    ids = torch.stack([keys, values], 2).reshape(B, 2 * N)  # k1 v1 k2 v2 ...
    ids = torch.cat([ids, torch.stack([q, a], 2).reshape(B, 2 * N)], 1)  # ... q1 a1 q2 a2 ...
    targets = torch.full_like(ids, IGNORE)
    targets[:, 2 * N :: 2] = a  # predict a_i at the position of q_i
    return {"input_ids": ids, "targets": targets}


class MQARData(_SeededBatches):
    """BatchSource of MQAR batches (see ``mqar_batch``)."""

    def __init__(self, batch_size: int, spec: MQARSpec = MQARSpec(), seed: int = 0):
        super().__init__(seed)
        self.batch_size, self.spec = batch_size, spec

    def _make(self, generator: torch.Generator) -> dict[str, Tensor]:
        return mqar_batch(self.batch_size, self.spec, generator)


@torch.no_grad()
def mqar_scores(
    model, spec: MQARSpec = MQARSpec(), n: int = 512, batch_size: int = 128, seed: int = 54321, device: str | torch.device = "cpu"
) -> Tensor:
    """Per-sequence fraction of queries answered correctly (argmax over the whole vocabulary) -> (n,).

    Sequences come from the stream ``(seed, 10**6)``, which training sources (positions counted
    from 0) never reach; different ``seed``s give disjoint held-out splits (the study selects
    its learning rate on one and reports another). Per-sequence scores let a bootstrap resample
    sequences (queries inside one sequence are not independent).
    """
    g = _gen(seed, 10**6)
    out = []
    with eval_mode(model):
        for s in range(0, n, batch_size):
            b = mqar_batch(min(batch_size, n - s), spec, g)
            logits, _ = model(b["input_ids"].to(device))
            keep = b["targets"] != IGNORE  # (B, T): the N query positions of each row
            hit = (logits.argmax(-1).cpu() == b["targets"]) & keep
            out.append(hit.sum(1).float() / keep.sum(1).float())  # (B,)
    return torch.cat(out)


def mqar_accuracy(
    model, spec: MQARSpec = MQARSpec(), n: int = 512, batch_size: int = 128, seed: int = 54321, device: str | torch.device = "cpu"
) -> float:
    """Fraction of queries answered correctly on held-out data (every sequence has ``n_pairs`` queries)."""
    return float(mqar_scores(model, spec, n, batch_size, seed, device).mean())
