"""Torch helpers of ``rag.generators.PretrainedGenerator``: the torch thread count while generating
(torch is imported on first use, as in ``rag.generators``)."""

from __future__ import annotations


def get_threads() -> int:
    import torch

    return torch.get_num_threads()


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
