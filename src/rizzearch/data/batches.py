"""Deterministic batch sources: the only way data enters the training loop.

A *BatchSource* has ``next_batch() -> dict[str, Tensor]`` (one **global** batch, rows on dim 0),
``state_dict()`` and ``load_state_dict()``. Each batch is a pure function of (seed, position), so
the position saved in a checkpoint resumes the exact data stream, and the loop can split one global
batch into micro-batches (gradient accumulation) or ranks (DDP) without changing what is trained on.

- ``RandomWindows``: random windows of a token stream (language-model pretraining).
- ``RowBatches``: epochs over the rows of fixed tensors (documents, preference pairs, tasks).
- ``EvalWindows``: a fixed list of consecutive windows for evaluation.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from rizzearch.errors import DataError


class BatchSource(Protocol):
    def next_batch(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EvalSource(Protocol):
    def batches(self) -> Iterator[dict[str, Tensor]]: ...


def _generator(seed: int, position: int) -> torch.Generator:
    # distinct, reproducible stream per (seed, position)
    return torch.Generator().manual_seed((seed * 1_000_003 + position * 7919 + 12345) % (2**63 - 1))


def _check_sizes(where: str, batch_size: int, seq_len: int | None = None) -> None:
    if batch_size < 1:
        raise DataError(f"{where}: batch_size must be >= 1, got {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise DataError(f"{where}: seq_len must be >= 1, got {seq_len}")


def _as_arrays(tokens) -> list:
    if isinstance(tokens, (list, tuple)):
        return [t for t in tokens]
    return [tokens]


def _window(arr, start: int, length: int) -> Tensor:
    chunk = arr[start : start + length]
    if isinstance(chunk, Tensor):
        return chunk.long()
    return torch.from_numpy(np.asarray(chunk, dtype=np.int64))


class RandomWindows:
    """Random ``seq_len + 1`` windows of a token stream -> {"input_ids", "targets"} (B, T).

    ``tokens`` is one 1-D array/tensor or a list of them (memmap shards); a window never crosses
    shards, and shards are chosen in proportion to their usable length.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0):
        _check_sizes("RandomWindows", batch_size, seq_len)
        self.shards = _as_arrays(tokens)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.position = 0
        usable = [max(len(s) - seq_len, 0) for s in self.shards]  # number of valid start offsets
        if sum(usable) == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise DataError(f"token stream too short: need more than seq_len + 1 = {seq_len + 1} tokens, longest shard has {longest}")
        self._weights = torch.tensor(usable, dtype=torch.float64)
        self._usable = usable

    def next_batch(self) -> dict[str, Tensor]:
        g = _generator(self.seed, self.position)
        self.position += 1
        shard_ids = torch.multinomial(self._weights, self.batch_size, replacement=True, generator=g)
        rows = []
        for sid in shard_ids.tolist():
            start = int(torch.randint(0, self._usable[sid], (1,), generator=g))
            rows.append(_window(self.shards[sid], start, self.seq_len + 1))
        w = torch.stack(rows)  # (B, T+1)
        return {"input_ids": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise DataError(f"data state is for seed {state.get('seed')}, this sampler uses seed {self.seed}")
        self.position = int(state["position"])


class RowBatches:
    """Epochs over the rows of ``tensors`` (all with the same dim 0), reshuffled each epoch.

    The stream of rows is the concatenation of per-epoch permutations, so every batch is full and
    ``position`` (rows consumed) fully determines what comes next.
    """

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, seed: int = 0, shuffle: bool = True):
        _check_sizes("RowBatches", batch_size)
        if not tensors:
            raise DataError("RowBatches needs at least one tensor")
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"RowBatches: tensors differ in number of rows: {sizes}")
        self.n = next(iter(sizes.values()))
        if self.n == 0:
            raise DataError("RowBatches: no rows")
        self.tensors, self.batch_size, self.seed, self.shuffle = tensors, batch_size, seed, shuffle
        self.position = 0
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            if self.shuffle:
                self._perm_cache = {epoch: torch.randperm(self.n, generator=_generator(self.seed, epoch))}
            else:
                self._perm_cache = {epoch: torch.arange(self.n)}
        return self._perm_cache[epoch]

    @property
    def epoch(self) -> float:
        return self.position / self.n

    def next_batch(self) -> dict[str, Tensor]:
        idx = []
        for s in range(self.position, self.position + self.batch_size):
            idx.append(int(self._perm(s // self.n)[s % self.n]))
        self.position += self.batch_size
        index = torch.tensor(idx)
        return {k: v.index_select(0, index) for k, v in self.tensors.items()}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "rows": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("rows") != self.n:
            raise DataError(f"data state (seed {state.get('seed')}, {state.get('rows')} rows) does not match this source (seed {self.seed}, {self.n} rows)")
        self.position = int(state["position"])


class EvalWindows:
    """Consecutive non-overlapping windows from the start of a token stream (fixed eval set)."""

    def __init__(self, tokens, batch_size: int, seq_len: int, max_batches: int | None = None, bytes_per_token: float | None = None):
        _check_sizes("EvalWindows", batch_size, seq_len)
        self.shards = [s for s in _as_arrays(tokens) if len(s) > seq_len]
        self.batch_size, self.seq_len, self.max_batches = batch_size, seq_len, max_batches
        self.bytes_per_token = bytes_per_token
        if not self.shards:
            raise DataError(f"evaluation tokens too short: need more than {seq_len + 1} tokens")

    def windows(self) -> Iterator[Tensor]:
        for s in self.shards:
            for start in range(0, len(s) - self.seq_len, self.seq_len):
                yield _window(s, start, self.seq_len + 1)

    def batches(self) -> Iterator[dict[str, Tensor]]:
        rows: list[Tensor] = []
        count = 0
        for w in self.windows():
            rows.append(w)
            if len(rows) == self.batch_size:
                yield self._pack(rows)
                rows, count = [], count + 1
                if self.max_batches is not None and count >= self.max_batches:
                    return
        if rows:
            yield self._pack(rows)

    @staticmethod
    def _pack(rows: Sequence[Tensor]) -> dict[str, Tensor]:
        w = torch.stack(list(rows))
        return {"input_ids": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}


def split_batch(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """Split a global batch into ``parts`` equal micro-batches along dim 0."""
    n = next(iter(batch.values())).shape[0]
    if n % parts:
        raise DataError(f"batch of {n} rows does not split into {parts} equal parts")
    size = n // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]
