"""The LoRA layer (Hu et al. 2021, eq. 3): ``base(x) + (alpha / r) B A dropout(x)`` around a frozen linear.

Plain ``nn.Module`` for plain, fused (several projections in one matrix) and block-diagonal linear
layers; ``rizzearch.training.lora`` wraps models with it and reads/writes PEFT's format.
"""

from __future__ import annotations

import fnmatch
import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------
# The layer


def _block_size(base: nn.Module) -> int | None:
    """Block size of a block-diagonal linear (``weight`` (n, block, block)), else None."""
    w = getattr(base, "weight", None)
    return int(w.shape[1]) if isinstance(w, Tensor) and w.dim() == 3 else None


def _features(base: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear or block-diagonal linear layer."""
    w = base.weight
    if w.dim() == 3:  # (n, block, block)
        return w.shape[0] * w.shape[2], w.shape[0] * w.shape[1]
    return w.shape[1], w.shape[0]


class LoraLinear(nn.Module):
    """``base(x) + (alpha / r) B A dropout(x)`` around a frozen linear layer (see the module docstring).

    ``segments`` splits the output rows into separately adapted projections (a fused layer);
    ``lora_A[i]``: (r, in) and ``lora_B[i]``: (out_i, r) per segment, or (n, r, block) and
    (n, block, r) for a block-diagonal base.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, segments: list[int] | None = None):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        fin, fout = _features(base)
        self.block = _block_size(base)
        self.segments = list(segments) if segments else [fout]
        w = base.weight
        kw = dict(device=w.device, dtype=w.dtype)
        if self.block is not None:
            n, b = w.shape[0], self.block
            shapes = [((n, r, b), (n, b, r))]
        else:
            shapes = [((r, fin), (out, r)) for out in self.segments]
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(a, **kw)) for a, _ in shapes)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(b, **kw)) for _, b in shapes)
        for A in self.lora_A:
            # PEFT's init: kaiming-uniform with a = sqrt(5) over the input features of each map
            bound = 1.0 / math.sqrt(A.shape[-1])
            nn.init.uniform_(A, -bound, bound)

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (read by models for its dtype/device)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta(self, x: Tensor) -> Tensor:
        """``(alpha/r) B A x`` for x (..., in) -> (..., out)."""
        A, B = list(self.lora_A), list(self.lora_B)
        if self.block is not None:
            n, b = A[0].shape[0], self.block
            xh = x.reshape(*x.shape[:-1], n, b)  # (..., n, block)
            u = torch.einsum("...hi,hri->...hr", xh, A[0])  # (..., n, r)
            y = torch.einsum("...hr,hor->...ho", u, B[0])  # (..., n, block)
            return y.reshape(*x.shape[:-1], n * b) * self.scaling
        u, Bs = self._down(x)
        return F.linear(u, Bs)

    def _down(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``u = (alpha/r) A x`` (..., segments r) and the matrix that maps it up: B, or for a fused
        layer the block-diagonal of the B's (one product instead of one per segment and a concatenation).
        The scale multiplies the r-wide ``u``, not the output."""
        A, B = list(self.lora_A), list(self.lora_B)
        u = F.linear(x, A[0] if len(A) == 1 else torch.cat(A)) * self.scaling
        return u, B[0] if len(B) == 1 else torch.block_diag(*B)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        x = self.dropout(x)
        if self.block is not None:
            return y + self.delta(x).to(y.dtype)
        u, B = self._down(x)
        # y + u B^T as one addmm: the add is fused into the product (no output-sized temporaries)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]).to(y.dtype), B.t().to(y.dtype))
        return out.view(y.shape)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The update ``(alpha/r) B A`` in the base weight's layout (fp32 math)."""
        A = [a.float() for a in self.lora_A]
        B = [b.float() for b in self.lora_B]
        if self.block is not None:
            return torch.bmm(B[0], A[0]) * self.scaling  # (n, block, block)
        return torch.cat([b @ a for a, b in zip(A, B)]) * self.scaling  # (out, in)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, segments={self.segments}" + (f", block={self.block}" if self.block else "")


# ----------------------------------------------------------------------------------------------
# Finding and wrapping the targets


def _adaptable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        not isinstance(m, (LoraLinear, nn.Embedding))
        and isinstance(w, Tensor)
        and (isinstance(m, nn.Linear) or (w.dim() == 3 and w.shape[1] == w.shape[2]))
    )


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches a target ``pattern`` (equal, ``.pattern`` suffix, or glob)."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def adaptable_names(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap, with layer indices folded to ``*`` (for error messages)."""
    names = {re.sub(r"\.\d+\.", ".*.", n) for n, m in model.named_modules() if _adaptable(m)}
    return sorted(names)
